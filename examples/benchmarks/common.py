"""What the benchmarks share: the model under test, the peers, timing with alternation and medians, the output.

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

Timing: ``alternate`` runs the peers in a rotating order in every repetition, so no peer always runs first
(cold caches) or in the same slot of a noisy machine; ratios are the median of the per-repetition ratios.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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


def add_common_args(parser: argparse.ArgumentParser, *, repeats: int, quick_repeats: int = 1) -> None:
    """The options every benchmark script takes."""
    g = parser.add_argument_group("model and run")
    g.add_argument(
        "--quick", action="store_true", help="tiny shapes, 1-2 repetitions: a smoke test in seconds (CI)"
    )
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="auto: fp32 on CPU, bf16 on CUDA",
    )
    g.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; 2 with --quick)")
    g.add_argument("--hidden", type=int, default=None, help="hidden size (default 1024)")
    g.add_argument("--intermediate", type=int, default=None, help="MLP size (default 2816)")
    g.add_argument("--heads", type=int, default=None, help="attention heads (default 16)")
    g.add_argument("--vocab", type=int, default=None, help="vocabulary (default 8192)")
    g.add_argument(
        "--r", type=int, default=None, help="adapter rank, also the number of components removed (default 16)"
    )
    g.add_argument(
        "--spectrum",
        choices=["long_tail", "gaussian"],
        default="long_tail",
        help="spectrum of the adapted weights",
    )
    g.add_argument(
        "--cond", type=float, default=1e4, help="condition number of the long-tail weights (default 1e4)"
    )
    g.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"repetitions (default {repeats}; {quick_repeats} with --quick)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's, i.e. the cores; 1 with --quick)",
    )
    g.add_argument(
        "--cache-dir", default=None, help="where the base model is saved (default: a temporary directory)"
    )
    g.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    parser.set_defaults(_repeats=(repeats, quick_repeats))


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    values = dict(ModelSpec.QUICK) if args.quick else {}
    for field in ("hidden", "intermediate", "heads", "layers", "vocab", "r"):
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    return ModelSpec(**values, spectrum=args.spectrum, cond=args.cond, seed=args.seed)


def repeats_from_args(args: argparse.Namespace) -> int:
    default, quick = args._repeats
    return args.repeats if args.repeats is not None else (quick if args.quick else default)


def setup_run(args: argparse.Namespace) -> tuple[ModelSpec, torch.device, torch.dtype]:
    """Threads, device and dtype of a run; the spec of its model."""
    # --quick runs on one thread: tiny ops on two spin-waiting OpenMP threads of a busy CPU cost 100x more.
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return spec_from_args(args), device, dtype


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


class BaseCache:
    """A cache directory for the saved bases: the given one, or a temporary one removed at exit."""

    def __init__(self, cache_dir: str | None) -> None:
        self._tmp = None if cache_dir else tempfile.TemporaryDirectory(prefix="kasa_bench_")
        self.path = Path(cache_dir or self._tmp.name)
        self.path.mkdir(parents=True, exist_ok=True)

    def base(self, spec: ModelSpec) -> Path:
        return base_dir(spec, self.path)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


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


def apply_peer(model: nn.Module, peer: str, spec: ModelSpec) -> nn.Module:
    """``model`` adapted as ``peer`` (one of the four peer names), ready to train."""
    if peer in KASA_BASE_MODES:
        from kasa_trl import apply_kasa

        return apply_kasa(model, kasa_config(spec, KASA_BASE_MODES[peer]))
    if peer in (PEFT_LORA, PEFT_KASA):
        from peft import get_peft_model

        return get_peft_model(model, peft_config(spec, kasa=peer == PEFT_KASA))
    raise ValueError(f"unknown peer {peer!r}")


def adapted_names(model: nn.Module) -> list[str]:
    """Qualified names (relative to the transformer) of the layers an adapter wraps, to check peers agree."""
    from kasa_trl import kasa_layers

    names = list(kasa_layers(model))
    if not names:
        names = [n.rsplit(".base_layer", 1)[0] for n, _ in model.named_modules() if n.endswith(".base_layer")]
    return sorted(n[n.index("layers.") :] for n in names)


def random_batch(spec: ModelSpec, batch: int, seq: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, spec.vocab, (batch, seq), generator=gen).to(device)


# -- timing --------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``, with the device synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def timed_cpu(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of ``fn()``. On a shared CPU the CPU time is the
    steadier figure: it leaves out the time spent waiting for a core (not the cost of sharing caches)."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def alternate(
    names: Sequence[str], measure: Callable[[str, int], float], repeats: int, *, log: bool = True
) -> dict[str, list[float]]:
    """``measure(name, rep)`` for every peer in every repetition, the order rotating by one each repetition."""
    names = list(names)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            times[name].append(measure(name, rep))
            if log:
                print(f"  rep {rep + 1}/{repeats} {name}: {times[name][-1]:.4g}", file=sys.stderr, flush=True)
    return times


def cprofile(fn: Callable[[], Any], top: int = 12) -> dict[str, Any]:
    """cProfile of ``fn()``: total time and the functions (torch builtins included) with the most own time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, func), (_, ncalls, tottime, cumtime, _) in sorted(
        stats.stats.items(), key=lambda kv: kv[1][2], reverse=True
    )[:top]:
        where = func if filename == "~" else f"{Path(filename).name}:{line}({func})"
        rows.append({"function": where, "calls": ncalls, "own_s": tottime, "cum_s": cumtime})
    return {"total_s": stats.total_tt, "top_own_time": rows}


def cprofile_summary(profile: dict[str, Any], n: int = 6) -> str:
    top = "; ".join(f"{r['function']} {r['own_s']:.3f}s/{r['calls']}" for r in profile["top_own_time"][:n])
    return f"{profile['total_s']:.3f} s total; own time: {top}"


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> dict[str, Any]:
    """Median (and range) of ``numerator / denominator`` over the repetitions, each rep with its own pair."""
    ratios = [a / b for a, b in zip(times[numerator], times[denominator], strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "per_rep": ratios}


def stats(values: Sequence[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": list(values)}


def goal(
    figure: str, peer: str, target: str, measured: float, met: bool, unit: str = "x", note: str = ""
) -> dict:
    """One row of the goals table: ``measured`` is the median ratio (or other figure) compared with ``target``."""
    return {
        "figure": figure,
        "peer": peer,
        "goal": target,
        "measured": measured,
        "unit": unit,
        "met": bool(met),
        "note": note,
    }


# -- output --------------------------------------------------------------------------------------------------


def environment(device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
    from importlib.metadata import version

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min": os.getloadavg()[0],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def goals_markdown(goals: Sequence[dict]) -> str:
    rows = []
    for g in goals:
        measured = (
            f"{g['measured']:.3g}{g['unit']}" if isinstance(g["measured"], float) else str(g["measured"])
        )
        rows.append(
            [g["figure"], g["peer"], g["goal"], measured, "met" if g["met"] else "NOT met", g.get("note", "")]
        )
    return markdown(["figure", "peer", "goal", "measured (median)", "", "note"], rows)


def finish(result: dict[str, Any], json_path: str | None) -> dict[str, Any]:
    """Print the benchmark's tables, write its JSON; returns ``result``."""
    print(f"\n## {result['benchmark']}\n")
    print(result["table"])
    if result.get("goals"):
        print()
        print(goals_markdown(result["goals"]))
    for note in result.get("notes", []):
        print(f"\n- {note}")
    env = result["environment"]
    print(
        f"\n({env['device']}, {env['dtype']}, torch {env['torch']}, peft {env['peft']}, {env['torch_threads']} threads "
        f"on {env['cpu_count']} cores, load average {env['loadavg_1min']:.1f})",
        flush=True,
    )
    if json_path:
        write_json(json_path, result)
    return result


def write_json(path: str | os.PathLike, data: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
