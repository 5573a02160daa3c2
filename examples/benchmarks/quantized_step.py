"""KaSA on a 4-bit base against PEFT LoRA on the same 4-bit base: one training step's time, peak memory, and the
adapter's initialization time, side by side in one run.

The base is a randomly initialised Llama (default hidden 1024, intermediate 2816, 4 layers, vocab 8192), saved
once and loaded for every measurement as users load a QLoRA base: ``from_pretrained(dir,
quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=...))``. Both peers adapt every Linear but the LM head with
rank ``r`` and train with AdamW; KaSA runs in ``non_destructive`` mode (the only one on a quantized base) with its
two regularizers, as ``KaSATrainer`` trains.

* step time: both peers live in this process and alternate step by step (so neither always runs first or in the
  same slot of a noisy machine); the ratio is the median of the per-repetition ratios;
* peak memory: each peer in a fresh process (a forkserver that has imported the libraries), the process's peak
  resident memory (``VmHWM``, reset after loading and adapting) over the training steps, median over repetitions;
* init time: ``apply_kasa`` (decomposing each dequantized weight) against ``get_peft_model``, in those processes;
* what dominates: ``torch.profiler`` of one step of each peer, the ops with the most self time.

Self-contained (it shares nothing with ``examples/benchmarks/common.py``). Usage::

    python examples/benchmarks/quantized_step.py            # CPU, the default shapes (a few minutes)
    python examples/benchmarks/quantized_step.py --quick    # tiny shapes: a smoke test in seconds
    python examples/benchmarks/quantized_step.py --device cuda --compute_dtype bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

KASA = "kasa_trl non_destructive (4-bit)"
LORA = "PEFT LoRA (4-bit)"
PEERS = (KASA, LORA)
GOALS = {"memory": 1.05, "step": 1.10}
QUICK = {
    "hidden": 64,
    "intermediate": 176,
    "heads": 4,
    "layers": 2,
    "vocab": 512,
    "r": 4,
    "seq": 32,
    "repeats": 3,
}


# -- the base and the peers ------------------------------------------------------------------------------------


def base_dir(args: argparse.Namespace) -> Path:
    """The saved full-precision base for these shapes (built once, cached in the temp folder)."""
    key = f"h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}-s{args.seed}"
    path = Path(tempfile.gettempdir()) / "kasa_trl_bench_quantized" / key
    if not (path / "config.json").is_file():
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.heads,
            max_position_embeddings=max(256, args.seq),
            tie_word_embeddings=False,
        )
        torch.manual_seed(args.seed)
        LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_4bit(path: Path, args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, args.compute_dtype),
    )
    device_map = "cpu" if args.device == "cpu" else {"": torch.device(args.device).index or 0}
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, device_map=device_map
    )
    return model.train()  # bitsandbytes' training path (its CPU eval kernel repacks the weights)


class Trainee:
    """One peer's 4-bit model, adapter, optimizer and step; ``init_seconds`` is the adapter's initialization."""

    def __init__(self, peer: str, path: Path, args: argparse.Namespace, batch: torch.Tensor) -> None:
        self.peer, self.batch, self.session = peer, batch, None
        model = load_4bit(path, args)
        start = time.perf_counter()
        if peer == KASA:
            from kasa_trl import KaSAConfig, apply_kasa, attach_kasa_regularization

            model = apply_kasa(model, KaSAConfig(r=args.r, lora_alpha=2 * args.r))
            self.session = attach_kasa_regularization(model)
        else:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear")
            model = get_peft_model(model, config)
        _sync(args.device)
        self.init_seconds = time.perf_counter() - start
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if self.session is not None:
            self.session.begin()
        loss = self.model(input_ids=self.batch, labels=self.batch).loss
        if self.session is not None:
            loss = self.session.finish(loss)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def random_batch(args: argparse.Namespace) -> torch.Tensor:
    gen = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- step time and profile (this process) ----------------------------------------------------------------------


def time_steps(trainees: dict[str, Trainee], args: argparse.Namespace) -> dict[str, list[float]]:
    """Per peer, the seconds of each timed step; the peers alternate, in a rotating order."""
    for trainee in trainees.values():  # warm-up: allocator, kernels, optimizer state
        for _ in range(2):
            trainee.step()
    times: dict[str, list[float]] = {peer: [] for peer in trainees}
    order = list(trainees)
    for rep in range(args.repeats):
        shift = rep % len(order)
        for peer in order[shift:] + order[:shift]:
            _sync(args.device)
            start = time.perf_counter()
            trainees[peer].step()
            _sync(args.device)
            times[peer].append(time.perf_counter() - start)
    return times


def profile_step(trainee: Trainee, top: int = 6) -> list[dict[str, Any]]:
    """The ops with the most self time in one step of ``trainee``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        trainee.step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total}
        for e in events[:top]
    ]


# -- memory (a fresh process per peer) -----------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(peer: str, path: str, args_dict: dict) -> dict[str, Any]:
    args = argparse.Namespace(**args_dict)
    torch.set_num_threads(args.threads)
    trainee = Trainee(peer, Path(path), args, random_batch(args))
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    result: dict[str, Any] = {"init_seconds": trainee.init_seconds, "trainable_params": trainee.trainable}
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result["before_mb"] = torch.cuda.memory_allocated() / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux >= 4.0)
            f.write("5")
        result["before_mb"] = _status_kb("VmRSS") / 1024
    for _ in range(args.memory_steps):
        trainee.step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mb"] = _status_kb("VmHWM") / 1024
    result["training_mb"] = result["peak_mb"] - result["before_mb"]
    return result


def _worker_entry(queue, *worker_args) -> None:
    try:
        queue.put(memory_worker(*worker_args))
    except BaseException as e:  # report, do not hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})
        raise


def memory_context():
    """A forkserver that has imported the libraries; its processes free every allocation of 64 KiB or more back to
    the system (``MALLOC_MMAP_THRESHOLD_``), so the RSS peak is the peak of live memory, not of the allocator's
    cache."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers.models.llama.modeling_llama", "peft", "kasa_trl"])
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        mp.forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    return ctx


def measure_memory(ctx, path: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    runs: dict[str, list[dict]] = {peer: [] for peer in PEERS}
    for rep in range(args.memory_repeats):
        shift = rep % len(PEERS)
        for peer in PEERS[shift:] + PEERS[:shift]:
            queue = ctx.Queue()
            proc = ctx.Process(target=_worker_entry, args=(queue, peer, str(path), vars(args)))
            proc.start()
            result = queue.get()
            proc.join()
            if "error" in result:
                raise RuntimeError(f"memory worker for {peer} failed: {result['error']}")
            print(f"  memory {peer}: peak {result['peak_mb']:.1f} MB", file=sys.stderr, flush=True)
            runs[peer].append(result)
    return {
        peer: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for peer, results in runs.items()
    }


# -- the run ---------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    path = base_dir(args)
    ctx = memory_context() if args.memory_repeats else None
    batch = random_batch(args)
    trainees = {peer: Trainee(peer, path, args, batch) for peer in PEERS}
    times = time_steps(trainees, args)
    step_ratio = statistics.median(k / p for k, p in zip(times[KASA], times[LORA], strict=True))
    profiles = {peer: profile_step(trainee) for peer, trainee in trainees.items()}
    trainable = {peer: trainee.trainable for peer, trainee in trainees.items()}
    del trainees
    gc.collect()
    memory = measure_memory(ctx, path, args) if ctx is not None else {}
    result: dict[str, Any] = {
        "shapes": {
            k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "vocab", "r", "batch", "seq")
        },
        "device": args.device,
        "compute_dtype": args.compute_dtype,
        "threads": args.threads,
        "trainable_params": trainable,
        "step_seconds": {peer: statistics.median(t) for peer, t in times.items()},
        "step_ratio": step_ratio,
        "profile": profiles,
    }
    if memory:
        result["memory"] = memory
        result["memory_ratio"] = memory[KASA]["peak_mb"] / memory[LORA]["peak_mb"]
        result["init_seconds"] = {peer: memory[peer]["init_seconds"] for peer in PEERS}
    result["goals"] = {
        "step <= 1.10x": step_ratio <= GOALS["step"],
        **({"memory <= 1.05x": result["memory_ratio"] <= GOALS["memory"]} if memory else {}),
    }
    return result


def report(result: dict[str, Any]) -> str:
    lines = [
        f"shapes {result['shapes']}, {result['device']}, compute {result['compute_dtype']}, "
        f"{result['threads']} threads",
        "| peer | trainable params | step (s, median) | peak memory (MB) | training memory (MB) | init (s) |",
        "|---|---|---|---|---|---|",
    ]
    for peer in PEERS:
        memory = result.get("memory", {}).get(peer, {})
        lines.append(
            f"| {peer} | {result['trainable_params'][peer]:,} | {result['step_seconds'][peer]:.4f} | "
            f"{memory.get('peak_mb', float('nan')):.1f} | {memory.get('training_mb', float('nan')):.1f} | "
            f"{memory.get('init_seconds', float('nan')):.3f} |"
        )
    lines.append(f"step ratio KaSA / LoRA: {result['step_ratio']:.3f} (goal <= {GOALS['step']})")
    if "memory_ratio" in result:
        lines.append(
            f"peak memory ratio KaSA / LoRA: {result['memory_ratio']:.3f} (goal <= {GOALS['memory']})"
        )
    for peer, ops in result["profile"].items():
        top = ", ".join(f"{op['op']} {op['share']:.0%}" for op in ops[:4])
        lines.append(f"one step of {peer}, most self time: {top}")
    lines.append("goals met: " + ", ".join(f"{goal}: {ok}" for goal, ok in result["goals"].items()))
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny shapes, few repetitions: a smoke test in seconds"
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--compute_dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10, help="timed steps per peer")
    p.add_argument("--memory_repeats", type=int, default=2, help="memory processes per peer (0: skip memory)")
    p.add_argument("--memory_steps", type=int, default=3, help="training steps in each memory process")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.memory_repeats = min(args.memory_repeats, 1)
    result = run(args)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
