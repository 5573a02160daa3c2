"""KaSA initialization under DeepSpeed ZeRO-3 (CPU, gloo): ``apply_kasa`` on 2 ranks vs the same run on 1 rank.

The script launches itself with ``torchrun`` (1 and 2 processes, alternating launches: 1, 2, 2, 1, ...). Each rank
follows the recipe of ``tests/distributed/zero_worker.py``: an active ZeRO-3 ``TrainingArguments`` (``use_cpu``,
``stage3_param_persistence_threshold`` 0), ``_ = training_args.device`` then
``deepspeed.init_distributed(dist_backend="gloo")``, and the base loaded with ``from_pretrained`` so that its
weights are partitioned at load (``deepspeed.zero.Init``): no rank holds a whole weight. Only ``apply_kasa`` is
timed, between two barriers. With 2 ranks the library's schedule (``sharded_decompose``) gathers the targets two at a
time and each rank decomposes one of them; only the rank-r factors are broadcast back.

What a rank gets: on GPUs every rank brings its own device, so by default each rank here gets the same
``--threads-per-rank`` (1) whether there are 1 or 2 of them: the ratio measures how the work divides over ranks
(the goal's figure). ``--split-cores`` instead gives both configurations the same ``C`` cores (``--cores``,
default all): 1 rank x ``C`` threads vs 2 ranks x ``C // 2``; that also measures how well one rank's linear
algebra uses more threads. Threads are set with ``OMP_NUM_THREADS`` (also read by SciPy's OpenBLAS) and
``torch.set_num_threads``, with ``OMP_WAIT_POLICY=PASSIVE`` (``--omp-wait-policy``): on a shared CPU, spinning
OpenMP threads make a multi-threaded rank several times slower.
Timed per rank: the phases of ``apply_kasa`` from the ``torch.profiler.record_function`` scopes the library opens
(``kasa_trl.decompose``, ``kasa_trl.sharded_decompose``, ``kasa_trl.gather``, ``kasa_trl.truncate``; the
profiler is on for every timed call, 1 and 2 ranks alike): the decomposition, the rest of the schedule (gathers,
broadcasts, waiting), the per-layer gathers of the fallback path, and the truncation on every rank.
Check: the removed parts' norms agree between 1 and 2 ranks.

    python examples/benchmarks/zero3_init.py                 # 4 layers 1024/2816, r=16; minutes on 2 cores
    python examples/benchmarks/zero3_init.py --quick         # one launch each, tiny model (CI)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import measure  # noqa: E402
import workload  # noqa: E402

GOAL_RATIO = 0.65
WORLDS = {"1 rank": 1, "2 ranks": 2}
# The library's profiler scopes this benchmark reads (record_function names).
DECOMPOSE, SHARDED_DECOMPOSE, GATHER, TRUNCATE = (
    "kasa_trl.decompose", "kasa_trl.sharded_decompose", "kasa_trl.gather", "kasa_trl.truncate",
)  # fmt: skip
PHASES = ("decompose", "sharded_decompose", "truncation_gathers", "truncation")


def ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }


# -- one rank ------------------------------------------------------------------------------------------------


def phases(scopes: list[measure.Scope]) -> dict[str, float]:
    """Seconds per phase of one ``apply_kasa`` on this rank, from its profiler scopes: the decompositions, the
    sharded schedule (decompositions included), the gathers outside it (the per-layer fallback, truncations
    included), the truncations."""

    def total(name: str, where=lambda scope: True) -> float:
        return sum(scope.seconds for scope in scopes if scope.name == name and where(scope))

    return {
        "decompose": total(DECOMPOSE),
        "sharded_decompose": total(SHARDED_DECOMPOSE),
        "truncation_gathers": total(GATHER, lambda scope: SHARDED_DECOMPOSE not in scope.within),
        "truncation": total(TRUNCATE),
    }


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, TrainingArguments

    from kasa_trl import kasa_layers

    torch.set_num_threads(args.worker_threads)
    spec = workload.ModelSpec(**json.loads(args.worker_spec))
    training_args = TrainingArguments(
        output_dir=str(Path(args.worker_out) / "trainer"),
        use_cpu=True,
        deepspeed=ds_config(),
        report_to="none",
        per_device_train_batch_size=1,
    )
    _ = training_args.device  # initializes the torch process group (gloo on CPU)...
    deepspeed.init_distributed(dist_backend="gloo")  # ...which deepspeed.comm must adopt before zero.Init
    rank, world = dist.get_rank(), dist.get_world_size()
    reps = []
    for _ in range(args.worker_repeats):
        model = AutoModelForCausalLM.from_pretrained(args.worker_base, dtype=torch.float32)
        partitioned = all(p.numel() == 0 for p in model.model.layers.parameters() if hasattr(p, "ds_id"))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            dist.barrier()
            start = time.perf_counter()
            workload.adapt_kasa(model, spec, "in_place")
            dist.barrier()
            seconds = time.perf_counter() - start
        per_rank = [None] * world
        dist.all_gather_object(per_rank, phases(measure.profiled_scopes(prof)))
        norms = {
            name: float(layer.removed_left.double().norm()) for name, layer in kasa_layers(model).items()
        }
        reps.append(
            {
                "apply_s": seconds,
                "decompose_s_per_rank": [p["decompose"] for p in per_rank],
                "phases_per_rank": per_rank,
                "partitioned": partitioned,
                "removed_norms": norms,
            }
        )
        del model, prof
        gc.collect()
    if rank == 0:
        harness.write_json(
            Path(args.worker_out) / "result.json",
            {"world": world, "threads": args.worker_threads, "reps": reps},
        )
    dist.barrier()
    dist.destroy_process_group()


# -- the launcher --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    world: int, threads: int, base: Path, spec, repeats: int, out: Path, timeout: int, wait_policy: str
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **({"OMP_WAIT_POLICY": "PASSIVE"} if wait_policy == "passive" else {}),
        "OMP_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={_free_port()}",
        str(Path(__file__).resolve()), "--worker", "--worker-out", str(out), "--worker-base", str(base),
        "--worker-spec", json.dumps(asdict(spec)), "--worker-repeats", str(repeats), "--worker-threads", str(threads),
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{world}-rank launch failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    result = json.loads((out / "result.json").read_text())
    result["launch_s"] = time.perf_counter() - start
    return result


def gathers_only(slowest: dict) -> float:
    """Time in apply_kasa's per-layer gathers, less the truncations inside them (0 when none: the default path,
    where each rank truncates its own partition)."""
    if not slowest["truncation_gathers"]:
        return 0.0
    return slowest["truncation_gathers"] - slowest["truncation"]


def run(args: argparse.Namespace, cache: harness.BaseCache | None = None) -> dict:
    with harness.session(args, cache) as run_:
        if run_.device.type != "cpu":
            raise SystemExit("zero3_init measures the CPU/gloo path; run it without --device cuda")
        cores = args.cores or os.cpu_count() or 2
        threads = (
            {1: cores, 2: max(1, cores // 2)}
            if args.split_cores
            else dict.fromkeys(WORLDS.values(), args.threads_per_rank)
        )
        inner = 1 if args.quick else run_.repeats
        launched: list[tuple[int, dict]] = []

        def one(peer: str, rep: int = 0) -> float:
            world = WORLDS[peer]
            out = run_.cache.path / f"zero3_{len(launched)}_{world}"
            result = launch(
                world, threads[world], run_.base, run_.spec, inner, out, args.timeout, args.omp_wait_policy
            )
            launched.append((world, result))
            print(f"  launch {len(launched)} ({world} rank(s)): {[round(r['apply_s'], 3) for r in result['reps']]}",
                  file=sys.stderr, flush=True)  # fmt: skip
            return result["launch_s"]

        if args.quick:  # a smoke test: both launches at once, the timings prove nothing anyway
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(WORLDS)) as pool:
                list(pool.map(one, WORLDS))
        else:  # 1, 2, 2, 1, ...
            measure.compare(list(WORLDS), one, -(-(args.launches or 4) // 2), log=False)
        times: dict[int, list[float]] = {1: [], 2: []}
        decompose: dict[int, list[list[float]]] = {1: [], 2: []}
        phases_: dict[int, list[list[dict]]] = {1: [], 2: []}
        launch_s: dict[int, list[float]] = {1: [], 2: []}
        norms: dict[int, dict] = {}
        partitioned = True
        for world, result in launched:
            launch_s[world].append(result["launch_s"])
            for rep in result["reps"]:
                times[world].append(rep["apply_s"])
                decompose[world].append(rep["decompose_s_per_rank"])
                phases_[world].append(rep["phases_per_rank"])
                norms.setdefault(world, rep["removed_norms"])
                partitioned &= rep["partitioned"]
        norm_diff = max(abs(norms[1][k] - norms[2][k]) / max(norms[1][k], 1e-30) for k in norms[1])
        ratio = statistics.median(times[2]) / statistics.median(times[1])
        rows, table_rows = [], []
        for world in (1, 2):
            # Per repetition, the slowest rank's time in each phase (the ranks wait for each other in between).
            slowest = {
                key: statistics.median(max(rank[key] for rank in rep) for rep in phases_[world])
                for key in PHASES
            }
            total = statistics.median(times[world])
            rows.append({
                "ranks": world, "threads_per_rank": threads[world], "apply_s": measure.stats(times[world]),
                "phases_s_slowest_rank": slowest, "decompose_s_per_rank": decompose[world],
                "phases_per_rank": phases_[world], "launch_s": launch_s[world],
            })  # fmt: skip
            table_rows.append(
                [world, threads[world], total, rows[-1]["apply_s"]["min"], slowest["decompose"],
                 slowest["sharded_decompose"] - slowest["decompose"], gathers_only(slowest),
                 slowest["truncation"], total / statistics.median(times[1])]
            )  # fmt: skip
        table = harness.markdown(
            ["ranks", "threads/rank", "apply_kasa median (s)", "min (s)", "decomposition", "gathers + broadcasts + waits (schedule)",
             "per-layer gathers (fallback)", "truncation (every rank)", "vs 1 rank"],
            table_rows,
        )  # fmt: skip
        sharing = (
            f"{cores} cores either way: 1 rank x {threads[1]} threads vs 2 ranks x {threads[2]} threads"
            if args.split_cores
            else f"{threads[1]} thread(s) per rank, as each GPU rank brings its own device"
        )
        goals = [
            harness.goal("initialization on 2 ranks under ZeRO-3 (CPU, gloo)", "the same run on 1 rank",
                         f"<= {GOAL_RATIO}x", ratio, ratio <= GOAL_RATIO, note=sharing)
        ]  # fmt: skip
        settings = {
            "schedule": [world for world, _ in launched],
            "repeats_per_launch": inner,
            "cores": cores,
            "split_cores": args.split_cores,
            "omp_wait_policy": args.omp_wait_policy,
        }
        notes = [
            f"{sharing}; weights "
            f"partitioned at load: {partitioned}; removed-part norms 1 vs 2 ranks agree to {norm_diff:.1e} "
            "(relative); ratio = median(2 ranks) / median(1 rank) over all repetitions of all launches.",
            "phases (seconds, slowest rank, median over repetitions, from the library's profiler scopes): "
            "decomposition = kasa_trl.decompose; schedule = the rest of kasa_trl.sharded_decompose (gathering each "
            "group of weights, broadcasting the factors, waiting for the slower rank); truncation gathers = "
            "apply_kasa's per-layer gathers (kasa_trl.gather outside the schedule, with modifier_rank=0: only when a "
            "partition cannot be written in place: hpZ, quantized, NVMe), less the truncations inside them; "
            "truncation = kasa_trl.truncate (float64 truncation of this rank's partition), on every rank.",
        ]
        environment = {**harness.describe_environment(run_.device, run_.dtype), "torch_threads": threads}
        return run_.report("zero3_init", settings=settings, rows=rows, table=table, goals=goals, notes=notes,
                           environment=environment)  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = harness.parser(__doc__, repeats=2, quick_repeats=1)
    p.add_argument(
        "--threads-per-rank",
        type=int,
        default=1,
        help="threads of every rank, 1 or 2 ranks alike (default 1)",
    )
    p.add_argument(
        "--split-cores",
        action="store_true",
        help="give 1 and 2 ranks the same --cores instead (1 x C threads vs 2 x C/2)",
    )
    p.add_argument(
        "--cores", type=int, default=None, help="with --split-cores: cores shared by the ranks (default: all)"
    )
    p.add_argument(
        "--launches",
        type=int,
        default=None,
        help="torchrun launches, alternating 1,2,2,1 (default 4; an odd number is rounded up)",
    )
    p.add_argument("--timeout", type=int, default=1800, help="seconds per launch")
    p.add_argument(
        "--omp-wait-policy",
        choices=["passive", "inherit"],
        default="passive",
        help="passive (default): OMP_WAIT_POLICY=PASSIVE for the ranks, so that a multi-threaded rank does not spin "
        "while another process holds a core (on a shared CPU that makes 1 rank x 2 threads many times slower); "
        "inherit: the caller's environment",
    )
    w = p.add_argument_group("worker (internal: set by the launcher)")
    w.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    w.add_argument("--worker-out", help=argparse.SUPPRESS)
    w.add_argument("--worker-base", help=argparse.SUPPRESS)
    w.add_argument("--worker-spec", help=argparse.SUPPRESS)
    w.add_argument("--worker-repeats", type=int, default=1, help=argparse.SUPPRESS)
    w.add_argument("--worker-threads", type=int, default=1, help=argparse.SUPPRESS)
    return p


def main(args: argparse.Namespace) -> dict | None:
    return worker(args) if args.worker else run(args)


if __name__ == "__main__":
    harness.main(parser, main)
