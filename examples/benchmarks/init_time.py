"""KaSA initialization time (model ready to train): ``kasa_trl.apply_kasa`` vs PEFT's ``get_peft_model`` with
``LoraConfig(kasa_config=KasaConfig())``, and how exactly each removes the r smallest singular triplets.

Every repetition loads a fresh base (untimed) for each peer, in a rotating order, then times the adaptation alone.
Accuracy, on the first repetition and the layers of decoder layer 0 (``--check-all``: every layer), against the
float64 SVD of the original weight ``W = U S V^T`` with ``R = U_r S_r V_r^T``:

- ``R err``: ``||left @ right - R||_F / ||R||_F`` for the removed factors (kasa_trl stores them; for PEFT they are
  those of the fp32 SVD it runs, recomputed untimed exactly as PEFT does);
- ``W_trunc err``: ``||W_trunc - (W - R)||_F / ||R||_F`` for the truncated weight as the model stores it (in the
  model dtype: in fp32 its rounding alone is ~1e-3 of ||R|| on a cond-1e4 weight, for either library).

    python examples/benchmarks/init_time.py                      # 4 layers 1024/2816, r=16; minutes on 2 busy cores
    python examples/benchmarks/init_time.py --methods svd gram_eigh --profile   # other decompositions, cProfile
    python examples/benchmarks/init_time.py --quick              # seconds (CI)
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import measure  # noqa: E402
import workload  # noqa: E402

GOAL_RATIO = 1 / 3
GOAL_R_ERR = 1e-6
PEFT_PEER = "PEFT get_peft_model (KaSA)"


def kasa_peer(method: str) -> str:
    return f"kasa_trl apply_kasa ({method})"


def peers(spec: workload.ModelSpec, methods: list[str]) -> dict:
    """Peer name -> how it adapts a model: kasa_trl with each decomposition method, then PEFT."""
    adapt = {kasa_peer(m): partial(workload.adapt_kasa, spec=spec, method=m) for m in methods}
    adapt[PEFT_PEER] = partial(workload.apply_peer, peer=workload.PEFT_KASA, spec=spec)
    return adapt


def _reference(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, W - R) in float64 from the full float64 SVD."""
    w = weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    k = s.shape[0]
    removed = (u[:, k - r :] * s[k - r :]) @ vh[k - r :]
    return removed, w - removed


def _errors(removed_ref, trunc_ref, removed, truncated) -> tuple[float | None, float]:
    norm = removed_ref.norm()
    r_err = None if removed is None else float((removed.double() - removed_ref).norm() / norm)
    return r_err, float((truncated.double() - trunc_ref).norm() / norm)


def accuracy(peer: str, model: torch.nn.Module, originals: dict, references: dict, r: int) -> dict[str, dict]:
    """Per checked layer: R err and W_trunc err (see the module docstring)."""
    modules = dict(model.named_modules())
    rows = {}
    for name, weight in originals.items():
        removed_ref, trunc_ref = references[name]
        if peer == PEFT_PEER:
            layer = modules[f"base_model.model.{name}"]
            truncated = layer.base_layer.weight
            u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)  # what PEFT runs
            k = s.shape[0]
            removed = (u[:, k - r :] * s[k - r :]) @ vh[k - r :]
        else:
            layer = modules[name]
            truncated = layer.base_layer.weight
            removed = (layer.removed_left.double() @ layer.removed_right.double()).cpu()
        r_err, w_err = _errors(removed_ref, trunc_ref, removed, truncated.detach().cpu())
        rows[name] = {"r_err": r_err, "w_trunc_err": w_err}
    return rows


def run(args: argparse.Namespace, cache: harness.BaseCache | None = None) -> dict:
    with harness.session(args, cache) as run_:
        spec, device = run_.spec, run_.device
        adapt = peers(spec, args.methods)
        checked: dict[str, dict] = {}
        originals: dict[str, torch.Tensor] = {}
        references: dict[str, tuple] = {}

        def one(name: str, rep: int) -> float:
            model = run_.load_base()
            if rep == 0 and not references:
                linears = workload.adapted_linears(model)
                for n in [n for n in linears if args.check_all or ".layers.0." in n]:
                    originals[n] = linears[n].weight.detach().cpu().clone()
                    references[n] = _reference(originals[n], spec.r)
            seconds, adapted = measure.timed(lambda: adapt[name](model), device)
            if rep == 0:
                checked[name] = accuracy(name, adapted, originals, references, spec.r)
                checked[name]["_targets"] = workload.adapted_names(adapted)
            return seconds

        times = measure.compare(list(adapt), one, run_.repeats)
        targets = {tuple(v.pop("_targets")) for v in checked.values()}
        if len(targets) != 1:
            raise RuntimeError("kasa_trl and PEFT adapted different layers: the comparison would be unfair")

        rows, table_rows = [], []
        for name in adapt:
            layer_errors = checked[name]
            r_errs = [e["r_err"] for e in layer_errors.values() if e["r_err"] is not None]
            row = {
                "peer": name,
                "time_s": times.stats(name),
                "ratio_to_peft": times.ratio(name, PEFT_PEER),
                "max_r_err": max(r_errs) if r_errs else None,
                "max_w_trunc_err": max(e["w_trunc_err"] for e in layer_errors.values()),
                "layers": layer_errors,
            }
            rows.append(row)
            table_rows.append([name, row["time_s"]["median"], row["time_s"]["min"], row["ratio_to_peft"]["median"],
                               row["max_r_err"], row["max_w_trunc_err"]])  # fmt: skip
        table = harness.markdown(
            ["peer", "median (s)", "min (s)", "ratio to PEFT", "max R err", "max W_trunc err"], table_rows
        )
        auto = rows[0]  # the first method's
        ratio = auto["ratio_to_peft"]
        goals = [
            harness.goal(
                "KaSA initialization time", PEFT_PEER, "<= 0.333x", ratio["median"], ratio["median"] <= GOAL_RATIO,
                note=f"{auto['peer']}; {measure.quartiles(ratio)}",
            ),
            harness.goal(
                "removed part vs float64 SVD", "float64 SVD", "<= 1e-6 relative",
                auto["max_r_err"], auto["max_r_err"] <= GOAL_R_ERR, unit="",
                note=f"{len(originals)} layers checked",
            ),
        ]  # fmt: skip
        notes = [
            f"{len(targets.pop())} adapted layers (all-linear), r={spec.r}, {spec.spectrum} spectrum "
            f"(cond {spec.cond:g}); time = the adaptation alone (base loaded beforehand, untimed).",
        ]
        extra = {}
        if args.profile:  # one extra adaptation of a fresh base per peer
            extra["profile"] = {}
            for name in adapt:
                model = run_.load_base()
                prof = measure.cprofile(
                    lambda m=model, a=adapt[name]: (a(m), measure.sync(device)), args.profile_top
                )
                extra["profile"][name] = prof
                notes.append(f"cProfile {name}: {measure.cprofile_summary(prof)}")
        settings = {"repeats": run_.repeats, "methods": args.methods}
        return run_.report("init_time", settings=settings, rows=rows, table=table, goals=goals, notes=notes,
                           **extra)  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = harness.parser(__doc__, repeats=3, quick_repeats=2)
    p.add_argument(
        "--methods",
        nargs="+",
        default=["auto"],
        help="kasa_trl decomposition methods to time (the first is the goal's)",
    )
    p.add_argument(
        "--check-all", action="store_true", help="check accuracy on every layer, not only layer 0's"
    )
    harness.add_profile_options(p, "cProfile one extra adaptation per peer", top=12)
    return p


if __name__ == "__main__":
    harness.main(parser, run)
