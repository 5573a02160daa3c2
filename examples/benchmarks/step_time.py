"""Training step time and peak memory: kasa_trl (both base modes, regularizers on) vs PEFT LoRA and PEFT KaSA.

A raw loop, no Trainer: the same batch every step, ``torch.optim.AdamW`` over the trainable parameters, one step
= ``zero_grad`` + forward (``labels`` = inputs) + backward + ``optimizer.step()``. The peers:

- ``PEFT LoRA``: ``get_peft_model(LoraConfig(r, all-linear))``, task loss only;
- ``PEFT KaSA``: ``LoraConfig(kasa_config=KasaConfig())``, loss = task loss + ``model._get_kasa_loss()``;
- ``kasa_trl in_place`` / ``kasa_trl non_destructive``: ``apply_kasa``, the regularizers through the trainer's
  path: ``session = attach_penalties(model, weights, reduction)``, ``session.begin(1.0)``, ``loss =
  session.finish(task_loss)``;
- ``kasa_trl in_place, no reg`` (diagnostic): the same without the session, to price the regularizers.

Same r, alpha, targets (checked) and dtype; default regularizer weights equal PEFT's (beta 1e-4, gamma 1e-3).
Time: every peer's model is built once, warmed up by one step, then each repetition runs ``--steps`` steps of
every peer in a rotating order; a repetition's figure is the median step, a ratio the median over repetitions of
the per-repetition ratio. The default, one step per peer and 30 repetitions, pairs steps seconds apart: on a shared
machine whose load changes over seconds, blocks of several steps per peer gave per-repetition ratios from 0.8 to
1.2. Wall-clock time decides the goals; the CPU time of the process (all threads) is reported next to it: on a
shared machine it leaves out the time spent waiting for a core.

Memory: each peer in its own fresh process (forked from a server that only imported the libraries, with glibc's
and MKL's caching of freed memory off: see ``MEMORY_ENV``), which loads the base, adapts it, then frees and
trims the heap (``malloc_trim``), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and trains
``--memory-steps`` steps. Reported: the peak RSS of those training steps (``VmHWM``: the whole process, base
weights and libraries included; the goal's figure), the RSS before them and the difference, and ``ru_maxrss``
(the whole process's life, adaptation included). Identical processes agree to ~1 MB. On CUDA:
``torch.cuda.max_memory_allocated`` over the training steps (the goal's figure), after the adapted model is built.

    python examples/benchmarks/step_time.py                  # batch 2 x 256 tokens; minutes on 2 busy cores
    python examples/benchmarks/step_time.py --profile        # + torch.profiler op tables of one step per peer
    python examples/benchmarks/step_time.py --memory-only --memory-repeats 3
    python examples/benchmarks/step_time.py --quick          # seconds (CI)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import measure  # noqa: E402
import workload  # noqa: E402

KASA_NO_REG = "kasa_trl in_place, no reg"
MEMORY_PEERS = [workload.PEFT_LORA, workload.PEFT_KASA, workload.KASA_IN_PLACE, workload.KASA_NON_DESTRUCTIVE]
PEERS = [*MEMORY_PEERS, KASA_NO_REG]
GOAL_VS_LORA = 1.03
GOAL_VS_PEFT_KASA = 1.0
GOAL_MEMORY = 1.02
# The memory processes' allocators. MALLOC_MMAP_THRESHOLD_: glibc serves every allocation of 64 KiB or more (every
# activation) with its own mapping and unmaps it when freed, so the RSS peak is the peak of live memory, not of what
# the allocator kept cached (by default glibc raises that threshold to 32 MiB as tensors are freed, and the RSS of
# two identical runs then differs by tens of MB). MKL_DISABLE_FAST_MM: MKL does not keep the work buffers of the
# decompositions (SVD, eigh) once they are done: ~20 MB that would be billed to KaSA's initialization, not training.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MKL_DISABLE_FAST_MM": "1"}
MEMORY_PRELOAD = ["torch", "transformers.models.llama.modeling_llama", "peft", "kasa_trl"]


class Trainee:
    """One peer's model, optimizer and step."""

    def __init__(
        self, peer: str, base: Path, spec: workload.ModelSpec, dtype, device, batch: torch.Tensor
    ) -> None:
        self.peer = peer
        self.batch = batch
        self.session = None
        model = workload.load_base(base, dtype, device)
        if peer == KASA_NO_REG:
            model = workload.adapt_kasa(model, spec, "in_place")
        else:
            model = workload.apply_peer(model, peer, spec)
        if peer in workload.KASA_BASE_MODES:
            from kasa_trl import get_kasa_config
            from kasa_trl.penalty import attach_penalties

            config = get_kasa_config(model)
            self.session = attach_penalties(model, config.regularizers, config.regularizer_reduction)
        self.model = model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if self.session is not None:
            self.session.begin(1.0)
        loss = self.model(input_ids=self.batch, labels=self.batch).loss
        if self.peer == workload.PEFT_KASA:
            loss = loss + self.model._get_kasa_loss()
        if self.session is not None:
            loss = self.session.finish(loss)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


# -- memory (in a fresh process per peer) --------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(peer: str, base: str, spec: dict, dtype: str, device: str, shape, steps: int, threads: int):
    """In a fresh process: ``peer``'s memory figures over ``steps`` training steps (see the module docstring)."""
    torch.set_num_threads(threads)
    spec_, device_, dtype_ = workload.ModelSpec(**spec), torch.device(device), getattr(torch, dtype)
    trainee = Trainee(peer, Path(base), spec_, dtype_, device_, workload.random_batch(spec_, *shape, device_))
    measure.release_memory()
    result = {"peer": peer, "trainable_params": trainee.trainable}
    if device_.type == "cuda":
        torch.cuda.synchronize(device_)
        torch.cuda.reset_peak_memory_stats(device_)
        result["before_mb"] = torch.cuda.memory_allocated(device_) / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux >= 4.0)
            f.write("5")
        result["before_mb"] = _status_kb("VmRSS") / 1024
    for _ in range(steps):
        trainee.step()
    if device_.type == "cuda":
        torch.cuda.synchronize(device_)
        result["peak_mb"] = torch.cuda.max_memory_allocated(device_) / 2**20
    else:
        result["peak_mb"] = _status_kb("VmHWM") / 1024
        result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["training_delta_mb"] = result["peak_mb"] - result["before_mb"]
    return result


def measure_memory(ctx, peers: list[str], run_: harness.Run, shape: tuple[int, int]) -> dict[str, dict]:
    """Each peer's memory figures, each from its own fresh process; with ``--memory-repeats`` > 1 the peers
    alternate and every figure is the median over the repetitions (``"all"`` keeps each process's figures)."""
    args = run_.args
    threads = args.threads or torch.get_num_threads()
    dtype = str(run_.dtype).replace("torch.", "")
    runs: dict[str, list[dict]] = {peer: [] for peer in peers}

    def one(peer: str, rep: int) -> float:
        result = measure.in_fresh_process(ctx, memory_worker, peer, str(run_.base), asdict(run_.spec), dtype,
                                          str(run_.device), shape, args.memory_steps, threads)  # fmt: skip
        print(f"  memory {peer}: peak {result['peak_mb']:.1f} MB", file=sys.stderr, flush=True)
        runs[peer].append(result)
        return result["peak_mb"]

    measure.compare(peers, one, args.memory_repeats, log=False)
    results = {}
    for peer, results_ in runs.items():
        merged = dict(results_[0])
        for key, value in results_[0].items():
            if isinstance(value, float):
                merged[key] = statistics.median(r[key] for r in results_)
        merged["all"] = results_
        results[peer] = merged
    return results


# -- the benchmark -------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, cache: harness.BaseCache | None = None) -> dict:
    with harness.session(args, cache) as run_:
        spec, device = run_.spec, run_.device
        batch_size, seq = args.batch or 2, args.seq or (32 if args.quick else 256)
        steps = args.steps or (2 if args.quick else 1)
        # Started first, the forkserver imports the libraries while the timed peers are built.
        ctx = None if args.no_memory else measure.forkserver(MEMORY_PRELOAD, MEMORY_ENV)
        peers = args.peers or PEERS
        if args.memory_only:
            return memory_only(run_, ctx, peers, (batch_size, seq))
        batch = workload.random_batch(spec, batch_size, seq, device)
        trainees = {p: Trainee(p, run_.base, spec, run_.dtype, device, batch) for p in peers}
        if len({tuple(workload.adapted_names(t.model)) for t in trainees.values()}) != 1:
            raise RuntimeError("the peers adapted different layers: the comparison would be unfair")
        for trainee in trainees.values():  # warm-up: allocator, optimizer state, kernels
            trainee.step()

        cpu_times: dict[str, list[float]] = {name: [] for name in peers}

        def one(name: str, rep: int) -> float:
            walls, cpus = zip(
                *(measure.timed_cpu(trainees[name].step, device) for _ in range(steps)), strict=True
            )
            cpu_times[name].append(statistics.median(cpus))
            return statistics.median(walls)

        times = measure.compare(peers, one, run_.repeats)
        cpu = measure.Comparison(cpu_times)
        profiles = {}
        if args.profile:
            profiles = {
                name: measure.op_profile(t.step, device, args.profile_top) for name, t in trainees.items()
            }
        trainable = {name: t.trainable for name, t in trainees.items()}
        trainees.clear()  # free the models before the memory processes run
        measure.release_memory()
        memory = {}
        if not args.no_memory:
            memory = measure_memory(ctx, [p for p in MEMORY_PEERS if p in peers], run_, (batch_size, seq))

        reference = workload.PEFT_LORA if workload.PEFT_LORA in peers else peers[0]
        with_peft_kasa = workload.PEFT_KASA in peers
        rows, table_rows = [], []
        for name in peers:
            mem, ref_mem = memory.get(name, {}), memory.get(reference, {})
            row = {
                "peer": name,
                "step_s": times.stats(name),
                "ratio_to_peft_lora": times.ratio(name, reference),
                "cpu_step_s": cpu.stats(name),
                "cpu_ratio_to_peft_lora": cpu.ratio(name, reference),
                "cpu_ratio_to_peft_kasa": cpu.ratio(name, workload.PEFT_KASA) if with_peft_kasa else None,
                "ratio_to_peft_kasa": times.ratio(name, workload.PEFT_KASA) if with_peft_kasa else None,
                "trainable_params": trainable[name],
                "memory": mem,
                "memory_ratio_to_peft_lora": mem["peak_mb"] / ref_mem["peak_mb"] if mem and ref_mem else None,
            }
            if name in profiles:
                row["profile"] = {k: v for k, v in profiles[name].items() if k != "calls"}
            rows.append(row)
            on_cpu = device.type == "cpu"
            table_rows.append([
                name, row["step_s"]["median"], row["ratio_to_peft_lora"]["median"],
                row["ratio_to_peft_kasa"]["median"] if with_peft_kasa else None,
                row["cpu_ratio_to_peft_lora"]["median"] if on_cpu else None,
                row["cpu_ratio_to_peft_kasa"]["median"] if on_cpu and with_peft_kasa else None,
                mem.get("peak_mb"), mem.get("training_delta_mb"), row["memory_ratio_to_peft_lora"],
                profiles[name]["aten_ops"] if name in profiles else None,
            ])  # fmt: skip
        table = harness.markdown(
            [
                "peer", "median step (s)", "vs PEFT LoRA", "vs PEFT KaSA", "CPU time vs PEFT LoRA", "CPU time vs PEFT KaSA", "peak MB (train)",
                "train delta MB", "peak vs PEFT LoRA", "aten ops/step",
            ],
            table_rows,
        )  # fmt: skip
        goals = []
        by_peer = {r["peer"]: r for r in rows}
        for name in (workload.KASA_IN_PLACE, workload.KASA_NON_DESTRUCTIVE):
            if name not in by_peer:
                continue
            row = by_peer[name]
            ratio = row["ratio_to_peft_lora"]
            goals.append(harness.goal("training step time", workload.PEFT_LORA, f"<= {GOAL_VS_LORA}x", ratio["median"],
                                      ratio["median"] <= GOAL_VS_LORA, note=f"{name}; {measure.quartiles(ratio)}"))  # fmt: skip
            if row["ratio_to_peft_kasa"]:
                ratio = row["ratio_to_peft_kasa"]
                goals.append(
                    harness.goal("training step time", "PEFT KaSA + _get_kasa_loss()", f"<= {GOAL_VS_PEFT_KASA}x",
                                 ratio["median"], ratio["median"] <= GOAL_VS_PEFT_KASA,
                                 note=f"{name}; {measure.quartiles(ratio)}")
                )  # fmt: skip
            if row["memory_ratio_to_peft_lora"] is not None:
                goals.append(memory_goal(name, row["memory_ratio_to_peft_lora"], device))
        notes = [
            f"batch {batch_size} x {seq} tokens, r={spec.r}, {spec.layers} layers, {steps} steps per repetition, "
            f"{run_.repeats} repetitions",
        ]
        if KASA_NO_REG in by_peer and workload.KASA_IN_PLACE in by_peer:
            reg = times.ratio(workload.KASA_IN_PLACE, KASA_NO_REG)["median"]
            notes.append(f"regularizers (attach_penalties) cost: in_place with / without = {reg:.3f}x")
        for name, p in profiles.items():
            top = "; ".join(f"{t['op']} {t['self_ms']:.1f}ms/{t['calls']}" for t in p["top"][:6])
            notes.append(f"profile {name}: {p['aten_ops']} aten ops, {p['self_time_ms']:.0f} ms self; {top}")
        settings = {"repeats": run_.repeats, "batch": batch_size, "seq": seq, "steps": steps,
                    "memory_steps": args.memory_steps, "memory_repeats": args.memory_repeats}  # fmt: skip
        extra = {"profile_calls": {name: p["calls"] for name, p in profiles.items()}} if profiles else {}
        return run_.report(
            "step_time", settings=settings, rows=rows, table=table, goals=goals, notes=notes, **extra
        )


def memory_goal(peer: str, ratio: float, device: torch.device) -> dict:
    what = "whole-process peak RSS of the training steps" if device.type == "cpu" else "max_memory_allocated"
    return harness.goal("peak memory during training", workload.PEFT_LORA, f"<= {GOAL_MEMORY}x", ratio,
                        ratio <= GOAL_MEMORY, note=f"{peer}; {what}")  # fmt: skip


def memory_only(run_: harness.Run, ctx, peers: list[str], shape: tuple[int, int]) -> dict:
    """``--memory-only``: the memory processes alone, no timing."""
    args = run_.args
    peers = [p for p in MEMORY_PEERS if p in peers]
    memory = measure_memory(ctx, peers, run_, shape)
    ref = memory[workload.PEFT_LORA]["peak_mb"]
    rows = [
        {"peer": p, "memory": memory[p], "memory_ratio_to_peft_lora": memory[p]["peak_mb"] / ref}
        for p in peers
    ]
    table = harness.markdown(
        ["peer", "peak MB (train)", "before MB", "train delta MB", "peak vs PEFT LoRA", "peaks (each process)"],
        [
            [r["peer"], r["memory"]["peak_mb"], r["memory"]["before_mb"], r["memory"]["training_delta_mb"],
             r["memory_ratio_to_peft_lora"], " ".join(f"{a['peak_mb']:.0f}" for a in r["memory"]["all"])]
            for r in rows
        ],
    )  # fmt: skip
    goals = [
        memory_goal(r["peer"], r["memory_ratio_to_peft_lora"], run_.device)
        for r in rows
        if r["peer"] in workload.KASA_BASE_MODES
    ]
    settings = {"batch": shape[0], "seq": shape[1], "memory_steps": args.memory_steps,
                "memory_repeats": args.memory_repeats, "memory_only": True}  # fmt: skip
    notes = [
        f"memory only: batch {shape[0]} x {shape[1]} tokens, {args.memory_steps} training steps per process"
    ]
    return run_.report("step_time", settings=settings, rows=rows, table=table, goals=goals, notes=notes)


def parser() -> argparse.ArgumentParser:
    p = harness.parser(__doc__, repeats=30, quick_repeats=2)
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256; 32 with --quick)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per peer and repetition (default 1; 2 with --quick)",
    )
    p.add_argument("--memory-steps", type=int, default=2, help="training steps in each memory process")
    p.add_argument(
        "--memory-repeats", type=int, default=1, help="memory processes per peer, alternating (median)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    p.add_argument("--memory-only", action="store_true", help="only the memory processes, no timing")
    p.add_argument("--peers", nargs="+", default=None, choices=PEERS, help="a subset of the peers")
    harness.add_profile_options(p, "torch.profiler of one step per peer", top=10)
    return p


if __name__ == "__main__":
    harness.main(parser, run)
