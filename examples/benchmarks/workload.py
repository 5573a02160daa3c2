"""What the benchmarks measure: the model under test and the peers that adapt it.

The model is a randomly initialised ``LlamaForCausalLM`` with realistic shapes (default hidden 1024,
intermediate 2816, 16 heads, 4 layers, vocab 8192). Every weight KaSA adapts (all Linear layers but the output
head) is replaced by a long-tail weight ``W = U diag(s) V^T`` with ``s`` geometric from 1 down to ``1 / cond``
(default cond 1e4), the shape of a trained matrix's spectrum: decomposition accuracy and the cost of the
deflation in ``kasa_trl.decomposition`` depend on it, Gaussian-initialised weights would flatter both. ``U``
and ``V`` are Haar-random orthogonal matrices, one per shape, each layer's a row permutation with random signs of
it (orthogonal too): only the spectrum and the shape matter to the decomposition, and this builds the 4-layer
model in seconds instead of minutes of QR on a busy 2-core CPU.

The base is built once, saved (``save_pretrained``) in a cache directory and loaded fresh by every measurement,
in another process where needed (memory, ZeRO-3). Loaded weights are copied into anonymous memory
(``from_pretrained`` memory-maps safetensors lazily): every peer starts from the same resident base.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

# The peers every benchmark speaks of, by their table names.
KASA_IN_PLACE = "kasa_trl in_place"
KASA_NON_DESTRUCTIVE = "kasa_trl non_destructive"
PEFT_LORA = "PEFT LoRA"
PEFT_KASA = "PEFT KaSA"
KASA_BASE_MODES = {KASA_IN_PLACE: "in_place", KASA_NON_DESTRUCTIVE: "non_destructive"}


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of the benchmark Llama and of its adapters."""

    hidden: int = 1024
    intermediate: int = 2816
    heads: int = 16
    layers: int = 4
    vocab: int = 8192
    r: int = 16
    spectrum: str = "long_tail"  # or "gaussian": the default random initialisation, untouched
    cond: float = 1e4
    seed: int = 0

    QUICK = {"hidden": 64, "intermediate": 176, "heads": 4, "layers": 2, "vocab": 512, "r": 4}

    @property
    def lora_alpha(self) -> int:
        return 2 * self.r

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# -- the model -----------------------------------------------------------------------------------------------


def llama_config(spec: ModelSpec):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _haar(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """(rows, cols) with orthonormal columns, Haar-distributed (QR of a Gaussian with the sign fix)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def adapted_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers KaSA and PEFT adapt with ``all-linear``: every one but the output head."""
    head = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def build_base(spec: ModelSpec) -> nn.Module:
    """The benchmark Llama in float32, with long-tail weights on every adapted layer (see the module docstring)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(llama_config(spec)).eval()
    if spec.spectrum == "gaussian":
        return model
    gen = torch.Generator().manual_seed(spec.seed + 1)
    bases: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for module in adapted_linears(model).values():
            out_features, in_features = module.weight.shape
            k = min(out_features, in_features)
            if (out_features, in_features) not in bases:
                s = torch.logspace(0, -math.log10(spec.cond), k, dtype=torch.float64)
                bases[(out_features, in_features)] = (
                    _haar(out_features, k, gen),
                    s,
                    _haar(in_features, k, gen),
                )
            u, s, v = bases[(out_features, in_features)]
            # A signed row permutation of an orthonormal-column matrix keeps its columns orthonormal.
            pu = torch.randperm(out_features, generator=gen)
            pv = torch.randperm(in_features, generator=gen)
            su = torch.randint(0, 2, (out_features, 1), generator=gen, dtype=torch.float64) * 2 - 1
            sv = torch.randint(0, 2, (in_features, 1), generator=gen, dtype=torch.float64) * 2 - 1
            w = ((su * u[pu]) * s) @ (sv * v[pv]).T
            module.weight.copy_(w.to(module.weight.dtype))
    return model


def base_dir(spec: ModelSpec, cache_dir: str | os.PathLike) -> Path:
    """The saved base of ``spec`` under ``cache_dir``, built and saved on first use."""
    path = Path(cache_dir) / f"llama-{spec.key()}"
    if not (path / "config.json").is_file():
        model = build_base(spec)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir))
        model.save_pretrained(tmp)
        (tmp / "spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
        os.replace(tmp, path)
    return path


def load_base(path: str | os.PathLike, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A fresh copy of the saved base, resident in memory (not memory-mapped), in ``dtype`` on ``device``."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.to(device, copy=True)
    model.config.use_cache = False
    return model.eval()


def random_batch(spec: ModelSpec, batch: int, seq: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, spec.vocab, (batch, seq), generator=gen).to(device)


# -- the peers -----------------------------------------------------------------------------------------------


def kasa_config(spec: ModelSpec, base_mode: str = "in_place", method: str = "auto"):
    from kasa_trl import KaSAConfig

    # Default regularizer weights = PEFT's KasaConfig defaults (beta 1e-4, gamma 1e-3), summed over layers.
    return KaSAConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        target_modules="all-linear",
        base_mode=base_mode,
        decomposition_method=method,
    )


def peft_config(spec: ModelSpec, kasa: bool):
    from peft import KasaConfig, LoraConfig

    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        kasa_config=KasaConfig() if kasa else None,
    )


def adapt_kasa(
    model: nn.Module, spec: ModelSpec, base_mode: str = "in_place", method: str = "auto"
) -> nn.Module:
    """``model`` adapted by ``kasa_trl.apply_kasa`` with the benchmark's configuration."""
    import kasa_trl

    return kasa_trl.apply_kasa(model, kasa_config(spec, base_mode, method))


def apply_peer(model: nn.Module, peer: str, spec: ModelSpec) -> nn.Module:
    """``model`` adapted as ``peer`` (one of the four peer names), ready to train."""
    if peer in KASA_BASE_MODES:
        return adapt_kasa(model, spec, KASA_BASE_MODES[peer])
    if peer in (PEFT_LORA, PEFT_KASA):
        from peft import get_peft_model

        return get_peft_model(model, peft_config(spec, kasa=peer == PEFT_KASA))
    raise ValueError(f"unknown peer {peer!r}: one of {[*KASA_BASE_MODES, PEFT_LORA, PEFT_KASA]}")


def adapter_params(model: nn.Module) -> list[nn.Parameter]:
    """The adapter's own parameters (kasa_trl's ``adapter_params()``, or PEFT's ``lora_*``), in model order."""
    from kasa_trl import kasa_layers

    layers = kasa_layers(model)
    if layers:
        return [p for layer in layers.values() for p in layer.adapter_params().values()]
    return [p for n, p in model.named_parameters() if "lora_" in n]


def randomize_adapter(model: nn.Module, seed: int) -> nn.Module:
    """Random non-zero adapter weights (N(0, 0.02^2)), as after some training: a fresh adapter is a no-op."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_params(model):
            param.copy_((torch.randn(param.shape, generator=gen) * 0.02).to(param.dtype))
    return model


def adapted_names(model: nn.Module) -> list[str]:
    """Qualified names (relative to the transformer) of the layers an adapter wraps, to check peers agree."""
    from kasa_trl import kasa_layers

    names = list(kasa_layers(model))
    if not names:
        names = [n.rsplit(".base_layer", 1)[0] for n, _ in model.named_modules() if n.endswith(".base_layer")]
    return sorted(n[n.index("layers.") :] for n in names)
