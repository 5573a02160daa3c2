import pytest
import torch

from kasa_trl.tiny import build_tiny_gpt2, build_tiny_llama

VOCAB = 97

# The tests run tiny models: a second thread only adds synchronization (and contention on a shared 2-core box).
torch.set_num_threads(1)


@pytest.fixture
def tiny_llama():
    return build_tiny_llama(VOCAB, seed=0).eval()


@pytest.fixture
def tiny_gpt2():
    return build_tiny_gpt2(VOCAB, seed=0).eval()


@pytest.fixture
def input_ids():
    return torch.randint(4, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def randomize_adapters(model, seed: int = 0) -> None:
    """Give every KaSA layer non-trivial factors so dW != 0."""
    from kasa_trl import kasa_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in kasa_layers(model).values():
            for param in layer.adapter_params().values():
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.1)
