"""Time and check the ways ``kasa_trl.decomposition.minor_components`` finds the removed part R.

This is how ``auto`` was chosen (the methods and their guarantees: ``kasa_trl/decomposition.py``'s docstring). For
each shape and spectrum it builds ``W = U diag(s) V^T`` (fp32, Haar-random U, V), times every method (median over
repeats, the order of the methods rotating between repeats so none always runs on a cold or a noisy slot), and
compares the removed part with float64 full SVD:

- ``R err``: ``||R - R_svd||_F / ||R_svd||_F``, only where the cut has a clear gap (else R is not unique);
- ``energy err``: ``| ||R||_F^2 - sum of the n smallest s^2 | / sum of the n smallest s^2`` (always well defined);
- ``spectrum err``: ``max |svdvals(W - R) - (s_1..s_{k-n}, 0..0)| / s_{k-n+1}``: the kept spectrum is intact
  and nothing of the removed one is left (skipped when min(out, in) > 2048: svdvals alone takes a minute there).

The ``fp32 svd`` row is a baseline (``torch.linalg.svd`` on the fp32 weight, as PEFT does), not a method.

    python examples/benchmarks/decomposition_methods.py                # 1024x2816, 2816x1024, 1024x1024; ~4 min on 2 cores
    python examples/benchmarks/decomposition_methods.py --shapes 4096x4096 --repeats 1   # ~15 min
    python examples/benchmarks/decomposition_methods.py --quick        # tiny shapes, seconds (CI)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from kasa_trl.decomposition import DECOMPOSITION_METHODS, minor_components

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import measure  # noqa: E402

BASELINE = "fp32 svd"
# name -> whether the cut has a clear gap, so that R itself is unique and can be compared directly
SPECTRA = {
    "gaussian init": True,
    "bulk + tail, cond 2.4e3": True,  # like trained attention weights: flat bulk, the last 5% decaying
    "long tail, cond 1e4": True,
    "long tail, cond 1e6": True,
    "cond 1e6, no gap at cut": False,
}


def build_weight(out_features: int, in_features: int, spectrum: str, n: int, seed: int) -> torch.Tensor:
    """(out, in) fp32 weight with the named spectrum; n places the cut for the no-gap spectrum."""
    gen = torch.Generator().manual_seed(seed)
    if spectrum == "gaussian init":
        return torch.randn(out_features, in_features, generator=gen) / math.sqrt(in_features)
    k = min(out_features, in_features)
    if spectrum.startswith("bulk"):
        s = torch.linspace(1, 0.4, k, dtype=torch.float64)
        tail = int(0.95 * k)
        s[tail:] = s[tail] * torch.logspace(
            0, -math.log10(2.4e3 * s[tail].item()), k - tail, dtype=torch.float64
        )
    else:
        decades = 4 if spectrum.endswith("1e4") else 6
        s = torch.logspace(0, -decades, k, dtype=torch.float64)  # geometric long tail
    if not SPECTRA[spectrum]:
        # The values straddling the cut agree to ~1e-11: the removed subspace is not unique, its invariants are.
        width = min(n, k - n)
        steps = torch.arange(2 * width, 0, -1, dtype=torch.float64)
        s[k - n - width : k - n + width] = s[k - n] * (1 + 1e-12 * steps)
    u = torch.linalg.qr(torch.randn(out_features, k, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(in_features, k, generator=gen, dtype=torch.float64)).Q
    return ((u * s) @ v.T).float()


def fp32_svd(weight: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    k = s.shape[0]
    return u[:, k - n :] * s[k - n :], vh[k - n :]


def runner(method: str, weight: torch.Tensor, n: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """``weight`` is float64 (holding fp32 values): fp32 factors would round R to 1e-8 and hide the methods' error."""
    if method == BASELINE:
        w32 = weight.float()
        return lambda: fp32_svd(w32, n)
    return lambda: minor_components(weight, n, method)


def accuracy(
    weight: torch.Tensor, n: int, factors: tuple, reference: tuple, gap: bool, spectra: bool
) -> dict:
    """Errors of the removed part ``factors`` against ``reference``, the float64 full SVD ``(u, s, vh)``."""
    (left, right), (u, s, vh) = factors, reference
    k = s.shape[0]
    r_ref = (u[:, k - n :] * s[k - n :]) @ vh[k - n :]
    r = left.double() @ right.double()
    removed_energy = (s[k - n :] ** 2).sum()
    row = {
        "r_err": ((r - r_ref).norm() / r_ref.norm()).item() if gap else None,
        "energy_err": ((r.norm() ** 2 - removed_energy).abs() / removed_energy).item(),
        "spectrum_err": None,
    }
    if spectra:
        expected = torch.cat([s[: k - n], s.new_zeros(n)])
        kept = torch.linalg.svdvals(weight - r)
        row["spectrum_err"] = ((kept - expected).abs().max() / s[k - n]).item()
    return row


def bench_case(shape, spectrum_name, methods, n, repeats, device, seed, check_spectra):
    weight = build_weight(*shape, spectrum_name, n, seed).to(device, torch.float64)
    reference = torch.linalg.svd(weight, full_matrices=False)
    gap = SPECTRA[spectrum_name]
    results = {}

    def one(method: str, rep: int) -> float:
        elapsed, results[method] = measure.timed(runner(method, weight, n), device)
        return elapsed

    times = measure.compare(methods, one, repeats, log=False)
    rows = []
    for method in methods:
        rows.append(
            {
                "shape": f"{shape[0]}x{shape[1]}",
                "spectrum": spectrum_name,
                "method": method,
                "n": n,
                "time_s": statistics.median(times.times[method]),
                "times_s": times.times[method],
                **accuracy(weight, n, results[method], reference, gap, check_spectra),
            }
        )
    return rows


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| shape | spectrum | method | median (s) | min (s) | R err | energy err | spectrum err |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['shape']} | {row['spectrum']} | {row['method']} | "
            f"{row['time_s']:.3f} | {min(row['times_s']):.3f} | "
            f"{fmt(row['r_err'], '.1e')} | {fmt(row['energy_err'], '.1e')} | {fmt(row['spectrum_err'], '.1e')} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    device, _ = harness.setup(args)
    n = args.n if args.n is not None else (4 if args.quick else 16)
    repeats = harness.repeats_from_args(args)
    shapes = [(48, 132), (132, 48), (64, 64)] if args.quick else [(1024, 2816), (2816, 1024), (1024, 1024)]
    if args.shapes:
        shapes = [tuple(int(d) for d in shape.lower().split("x")) for shape in args.shapes]
    methods = [m for m in DECOMPOSITION_METHODS if m != "auto"] + [BASELINE]

    # One untimed call per method so that library initialization is not billed to the first method timed.
    warm = build_weight(*shapes[0], "gaussian init", n, args.seed).to(device, torch.float64)
    for method in methods:
        runner(method, warm, n)()

    rows = []
    for shape in shapes:
        for spectrum_name in args.spectra:
            rows += bench_case(
                shape, spectrum_name, methods, n, repeats, device, args.seed, min(shape) <= 2048
            )
            print(markdown(rows[-len(methods) :]).split("\n", 2)[2], flush=True)

    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, n={n}, repeats={repeats}"
    )
    print(markdown(rows))
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device), "n": n}
    result = {"meta": {**meta, "repeats": repeats}, "rows": rows}
    if args.json:
        harness.write_json(args.json, result)
    return result


def parser() -> argparse.ArgumentParser:
    p = harness.parser(__doc__, repeats=3, quick_repeats=1, model=False)
    p.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        metavar="OUTxIN",
        help="weight shapes (default 1024x2816 2816x1024 1024x1024)",
    )
    p.add_argument("--n", type=int, default=None, help="triplets removed (default 16, 4 with --quick)")
    p.add_argument(
        "--spectra",
        nargs="+",
        default=list(SPECTRA),
        choices=list(SPECTRA),
        help="spectra to run (default all)",
    )
    return p


if __name__ == "__main__":
    harness.main(parser, run)
