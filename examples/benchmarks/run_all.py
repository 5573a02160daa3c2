"""Run every KaSA benchmark; write one JSON and one markdown report (goals first, then each benchmark's table).

    python examples/benchmarks/run_all.py --quick               # tiny shapes, about a minute (make bench-quick, CI)
    python examples/benchmarks/run_all.py                       # realistic shapes, ~30+ min on a busy 2-core CPU
    python examples/benchmarks/run_all.py --only init_time load_time --repeats 5
    python examples/benchmarks/run_all.py --device cuda         # bf16 on a GPU (zero3_init is skipped: CPU/gloo)

The benchmarks share one saved base model (``--cache-dir``, default a temporary directory). ``init_time``,
``step_time``, ``load_time`` and ``merged_inference`` run in this process (``step_time`` forks one process per
peer for memory), ``zero3_init`` launches ``torchrun``. With ``--quick`` the ``zero3_init`` launches run in the
background while the others run: quick timings only prove the scripts work, never assert them.

On a shared CPU, run with ``OMP_WAIT_POLICY=PASSIVE`` in the environment: OpenMP threads that spin-wait while
another process holds the other core make multi-threaded LAPACK and small ops many times slower and the numbers
meaningless (``zero3_init`` sets it for its ranks unless ``--omp-wait-policy inherit``).
A benchmark that fails is reported in the JSON (``errors``) and makes the exit status 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

BENCHMARKS = ["init_time", "zero3_init", "step_time", "load_time", "merged_inference"]


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, repeats=0, quick_repeats=0)  # 0: each benchmark's own default
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None, help="run only these")
    p.add_argument("--skip", nargs="+", choices=BENCHMARKS, default=[], help="skip these")
    p.add_argument("--out-dir", default="outputs/benchmarks", help="where results.json / results.md go")
    p.add_argument("--profile", action="store_true", help="pass --profile to the benchmarks that have it")
    args = p.parse_args(argv)
    names = [b for b in (args.only or BENCHMARKS) if b not in args.skip]
    if args.device != "cpu" and "zero3_init" in names:
        names.remove("zero3_init")
        print("zero3_init skipped: it measures the CPU/gloo path", file=sys.stderr)

    import importlib

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "quick" if args.quick else "results"
    cache = harness.BaseCache(args.cache_dir)
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    common_argv = harness.shared_argv(args) + ["--cache-dir", str(cache.path)]
    background = None
    try:
        if args.quick and "zero3_init" in names:
            # Build the shared base first, then let the zero3 launches overlap the in-process benchmarks.
            harness.setup(args)
            cache.base(harness.spec_from_args(args))
            json_path = out_dir / f"{stem}.zero3_init.json"
            cmd = [
                sys.executable,
                str(Path(__file__).with_name("zero3_init.py")),
                *common_argv,
                "--json",
                str(json_path),
            ]
            background = (
                time.perf_counter(),
                json_path,
                subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
            )
        for name in names:
            if name == "zero3_init" and background is not None:
                continue
            module = importlib.import_module(name)
            bench_argv = list(common_argv)
            if args.profile and name in ("init_time", "step_time", "load_time"):
                bench_argv.append("--profile")
            bench_args = module.parser().parse_args(bench_argv)
            start = time.perf_counter()
            try:
                results[name] = module.run(bench_args, cache)
            except Exception:
                errors[name] = traceback.format_exc()
                print(f"\n{name} FAILED:\n{errors[name]}", file=sys.stderr, flush=True)
            seconds[name] = time.perf_counter() - start
        if background is not None:
            start, json_path, proc = background
            output, _ = proc.communicate()
            seconds["zero3_init"] = time.perf_counter() - start
            if proc.returncode == 0:
                results["zero3_init"] = json.loads(json_path.read_text())
                print(output[output.find("## zero3_init") :] if "## zero3_init" in output else output)
            else:
                errors["zero3_init"] = output[-6000:]
                print(f"\nzero3_init FAILED:\n{errors['zero3_init']}", file=sys.stderr)
    finally:
        if background is not None and background[2].poll() is None:
            background[2].kill()
        cache.cleanup()

    goals = [g for name in names if name in results for g in results[name].get("goals", [])]
    report = {
        "quick": args.quick,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": harness.describe_environment(torch.device(args.device)),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "goals": goals,
        "benchmarks": {name: results[name] for name in names if name in results},
        "seconds": seconds,
        "errors": errors,
    }
    md = ["# KaSA benchmarks" + (" (--quick: tiny shapes, timings meaningless)" if args.quick else ""), ""]
    md += ["## Goals", "", harness.goals_markdown(goals), ""]
    for name in names:
        if name in results:
            md += [f"## {name}", "", results[name]["table"], ""]
            md += [f"- {note}" for note in results[name].get("notes", [])] + [""]
        else:
            md += [f"## {name}", "", "FAILED (see errors in the JSON)", ""]
    env = report["environment"]
    md.append(
        f"Environment: {env['platform']}, {env['cpu_count']} cores, torch {env['torch']}, transformers "
        f"{env['transformers']}, peft {env['peft']}, OMP_WAIT_POLICY={report['omp_wait_policy']}, "
        f"load average at the end {env['loadavg_1min']:.1f}."
    )
    harness.write_json(out_dir / f"{stem}.json", report)
    (out_dir / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n" + "\n".join(md[:5]))
    print(f"\nwrote {out_dir / f'{stem}.json'} and {out_dir / f'{stem}.md'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
