"""The skeleton every benchmark script shares, so that a script only describes its peers and its figures.

- ``parser``: the shared options (``--quick --device --repeats --seed --threads --json``, and for the scripts that
  load the benchmark model its shapes, ``--dtype`` and ``--cache-dir``); ``shared_argv`` gives them back as a
  command line (``run_all.py`` forwards them).
- ``session``: a run's threads, device, dtype and repetitions, the saved base model, and its cleanup.
- ``Run.report`` / ``finish``: the tables, the goals, the JSON.

How the figures are taken (alternation, timing, processes, profiles) is ``measure.py``; the model and the peers
``workload.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import workload

# -- options -------------------------------------------------------------------------------------------------

# The shared options run_all.py forwards to every benchmark when they differ from their defaults (--quick too).
FORWARDED = ["device", "dtype", "layers", "hidden", "intermediate", "heads", "vocab", "r", "spectrum", "cond",
             "repeats", "seed", "threads"]  # fmt: skip


def parser(doc: str, *, repeats: int, quick_repeats: int = 1, model: bool = True) -> argparse.ArgumentParser:
    """A script's parser with the shared options (``model``: also the benchmark model's); ``doc`` is the
    script's docstring, its first paragraph the description. ``repeats`` (``quick_repeats`` with ``--quick``):
    the default number of repetitions."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    g = p.add_argument_group("run")
    g.add_argument(
        "--quick", action="store_true", help="tiny shapes, 1-2 repetitions: a smoke test in seconds (CI)"
    )
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda")
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
    g.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    p.set_defaults(_repeats=(repeats, quick_repeats))
    if not model:
        return p
    g = p.add_argument_group("model")
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
        "--cache-dir", default=None, help="where the base model is saved (default: a temporary directory)"
    )
    return p


def add_profile_options(p: argparse.ArgumentParser, what: str, top: int) -> None:
    """``--profile`` (``what`` it profiles) and ``--profile-top`` (how many functions or ops it lists)."""
    p.add_argument("--profile", action="store_true", help=what)
    p.add_argument("--profile-top", type=int, default=top, help=f"entries listed per profile (default {top})")


def shared_argv(args: argparse.Namespace) -> list[str]:
    """The shared options of ``args`` that differ from their defaults, as a command line."""
    defaults = parser("", repeats=0)
    argv = ["--quick"] if args.quick else []
    for name in FORWARDED:
        value = getattr(args, name)
        if value is not None and value != defaults.get_default(name):
            argv += [f"--{name}", str(value)]
    return argv


def repeats_from_args(args: argparse.Namespace) -> int:
    default, quick = args._repeats
    return args.repeats if args.repeats is not None else (quick if args.quick else default)


def spec_from_args(args: argparse.Namespace) -> workload.ModelSpec:
    values = dict(workload.ModelSpec.QUICK) if args.quick else {}
    for field in ("hidden", "intermediate", "heads", "layers", "vocab", "r"):
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    return workload.ModelSpec(**values, spectrum=args.spectrum, cond=args.cond, seed=args.seed)


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Sets the threads of a run; its device and dtype."""
    # --quick runs on one thread: tiny ops on two spin-waiting OpenMP threads of a busy CPU cost 100x more.
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    name = getattr(args, "dtype", "auto")
    if name == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, name)


# -- a run ---------------------------------------------------------------------------------------------------


class BaseCache:
    """A cache directory for the saved bases: the given one, or a temporary one removed by ``cleanup``."""

    def __init__(self, cache_dir: str | None) -> None:
        self._tmp = None if cache_dir else tempfile.TemporaryDirectory(prefix="kasa_bench_")
        self.path = Path(cache_dir or self._tmp.name)
        self.path.mkdir(parents=True, exist_ok=True)

    def base(self, spec: workload.ModelSpec) -> Path:
        return workload.base_dir(spec, self.path)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


@dataclass
class Run:
    """One benchmark run on the benchmark model: its options, where it runs, and the saved base (``base``)."""

    args: argparse.Namespace
    spec: workload.ModelSpec
    device: torch.device
    dtype: torch.dtype
    repeats: int
    cache: BaseCache
    base: Path

    def load_base(self) -> torch.nn.Module:
        """A fresh copy of the base, resident, in the run's dtype on its device."""
        return workload.load_base(self.base, self.dtype, self.device)

    def report(self, name: str, *, settings: dict, rows: list, table: str, goals: list, notes: list,
               environment: dict | None = None, **extra: Any) -> dict[str, Any]:  # fmt: skip
        """The result of benchmark ``name``, printed and written to ``--json`` (``finish``)."""
        result = {
            "benchmark": name,
            "environment": environment or describe_environment(self.device, self.dtype),
            "settings": {"spec": asdict(self.spec), **settings},
            "rows": rows,
            "table": table,
            "goals": goals,
            "notes": notes,
            **extra,
        }
        return finish(result, self.args.json)


@contextlib.contextmanager
def session(args: argparse.Namespace, cache: BaseCache | None = None) -> Iterator[Run]:
    """A run on the benchmark model: threads, device, dtype, repetitions, and the base saved in ``cache`` (default
    ``--cache-dir`` or a temporary directory, removed at the end)."""
    device, dtype = setup(args)
    own_cache = cache is None
    cache = cache or BaseCache(args.cache_dir)
    try:
        spec = spec_from_args(args)
        yield Run(args, spec, device, dtype, repeats_from_args(args), cache, cache.base(spec))
    finally:
        if own_cache:
            cache.cleanup()


def main(make_parser: Callable[[], argparse.ArgumentParser], run: Callable[[argparse.Namespace], Any],
         argv: list[str] | None = None) -> Any:  # fmt: skip
    return run(make_parser().parse_args(argv))


# -- output --------------------------------------------------------------------------------------------------


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


def describe_environment(device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
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
