"""How the benchmarks take their figures: peers alternating with paired ratios, timing, fresh processes, profiles.

- ``compare``: the peers alternate, in an order rotating by one every repetition, so no peer always runs first
  (cold caches) or in the same slot of a noisy machine; a ratio is the median of the per-repetition ratios, with
  their quartiles.
- ``in_fresh_process``: a measurement in its own process (memory), from a forkserver that imported the libraries.
- ``profiled_scopes``: the ``kasa_trl.*`` ``torch.profiler.record_function`` scopes the library opens, to split a
  call's time into phases without touching the library; ``cprofile`` and ``op_profile`` for where time goes.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing as mp
import multiprocessing.forkserver
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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


def stats(values: Sequence[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": list(values)}


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> dict[str, Any]:
    """Median, quartiles and range of ``numerator / denominator`` over the repetitions, each with its own pair."""
    ratios = [a / b for a, b in zip(times[numerator], times[denominator], strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "min": min(ratios), "max": max(ratios),
            "per_rep": ratios}  # fmt: skip


def quartiles(ratio: dict[str, Any]) -> str:
    """``ratio``'s quartiles as a goal's note says them."""
    return f"quartiles {ratio['q1']:.3g}-{ratio['q3']:.3g} over {len(ratio['per_rep'])} repetitions"


class Comparison:
    """Per-repetition figures of alternating peers (``compare``), and their paired ratios."""

    def __init__(self, times: dict[str, list[float]]) -> None:
        self.times = times

    def stats(self, peer: str) -> dict[str, Any]:
        return stats(self.times[peer])

    def ratio(self, numerator: str, denominator: str) -> dict[str, Any]:
        return paired_ratio(self.times, numerator, denominator)


def compare(
    peers: Sequence[str], measure: Callable[[str, int], float], repeats: int, *, log: bool = True
) -> Comparison:
    """``measure(peer, rep)`` for every peer in every repetition, the order rotating by one each repetition (two
    peers: A B, B A, A B, ...), garbage collected before each measurement."""
    peers = list(peers)
    times: dict[str, list[float]] = {peer: [] for peer in peers}
    for rep in range(repeats):
        shift = rep % len(peers)
        for peer in peers[shift:] + peers[:shift]:
            gc.collect()
            times[peer].append(measure(peer, rep))
            if log:
                print(f"  rep {rep + 1}/{repeats} {peer}: {times[peer][-1]:.4g}", file=sys.stderr, flush=True)
    return Comparison(times)


# -- memory and processes ------------------------------------------------------------------------------------


def release_memory() -> None:
    """Collect garbage and give the freed heap back to the system (glibc's ``malloc_trim``)."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def forkserver(preload: Sequence[str], env: dict[str, str] | None = None):
    """A multiprocessing context whose forkserver has imported ``preload`` (once: each process then starts in no
    time) and runs with ``env`` added to this process's environment (this one's is left as it was). Started
    here, it imports while the caller goes on."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    env = env or {}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        mp.forkserver.ensure_running()
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    return ctx


def _fresh_process_entry(queue, fn, *args) -> None:
    try:
        queue.put({"result": fn(*args)})
    except BaseException as e:  # report, do not leave the parent waiting
        queue.put({"error": f"{type(e).__name__}: {e}"})
        raise


def in_fresh_process(ctx, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a new process of ``ctx`` (``forkserver``); ``fn`` and its result must pickle."""
    queue = ctx.Queue()
    proc = ctx.Process(target=_fresh_process_entry, args=(queue, fn, *args))
    proc.start()
    answer = queue.get()
    proc.join()
    if "error" in answer:
        raise RuntimeError(
            f"{getattr(fn, '__name__', fn)}{args[:1]} failed in its process: {answer['error']}"
        )
    return answer["result"]


# -- profiles ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """One ``record_function`` scope a profile saw: its name, its wall time, the scopes around it (innermost
    first) and those directly inside it with the given prefix."""

    name: str
    seconds: float
    within: tuple[str, ...]
    inner: tuple[Scope, ...]


def profiled_scopes(prof, prefix: str = "kasa_trl.") -> list[Scope]:
    """Every scope of a finished ``torch.profiler.profile`` whose name starts with ``prefix``."""

    def scope(event) -> Scope:
        within, parent = [], event.cpu_parent
        while parent is not None:
            within.append(parent.name)
            parent = parent.cpu_parent
        inner = tuple(scope(c) for c in event.cpu_children if c.name.startswith(prefix))
        return Scope(event.name, event.time_range.elapsed_us() / 1e6, tuple(within), inner)

    return [scope(e) for e in prof.events() if e.name.startswith(prefix)]


def cprofile(fn: Callable[[], Any], top: int = 12) -> dict[str, Any]:
    """cProfile of ``fn()``: total time and the functions (torch builtins included) with the most own time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    pstats_ = pstats.Stats(profiler)
    rows = []
    for (filename, line, func), (_, ncalls, tottime, cumtime, _) in sorted(
        pstats_.stats.items(), key=lambda kv: kv[1][2], reverse=True
    )[:top]:
        where = func if filename == "~" else f"{Path(filename).name}:{line}({func})"
        rows.append({"function": where, "calls": ncalls, "own_s": tottime, "cum_s": cumtime})
    return {"total_s": pstats_.total_tt, "top_own_time": rows}


def cprofile_summary(profile: dict[str, Any], n: int = 6) -> str:
    top = "; ".join(f"{r['function']} {r['own_s']:.3f}s/{r['calls']}" for r in profile["top_own_time"][:n])
    return f"{profile['total_s']:.3f} s total; own time: {top}"


def op_profile(fn: Callable[[], Any], device: torch.device, top: int) -> dict[str, Any]:
    """torch.profiler of ``fn()``: op count, total self time, the ops with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        fn()
        sync(device)
    averages = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = sorted(averages, key=lambda e: getattr(e, key), reverse=True)
    return {
        "events": sum(e.count for e in averages),
        "aten_ops": sum(e.count for e in averages if e.key.startswith("aten::")),
        "self_time_ms": sum(getattr(e, key) for e in averages) / 1e3,
        "top": [{"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3} for e in ops[:top]],
        "calls": {e.key: e.count for e in averages},
    }
