import os
import sys
from pathlib import Path

import pytest
import torch

from kasa_trl.tiny import build_tiny_gpt2, build_tiny_llama

VOCAB = 97

# The tests run tiny models: a second thread only adds synchronization (and contention on a shared 2-core box).
torch.set_num_threads(1)

# DeepSpeed compiles its CPU op on first use under torch's extensions folder. The tests (and every process they
# start) build it inside the virtual environment instead of the user's ~/.cache/torch_extensions, which other
# environments share: a build killed there leaves a lock that makes every later DeepSpeed run wait forever.
if sys.prefix != sys.base_prefix:
    os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")


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
