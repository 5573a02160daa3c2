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
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GOAL_RATIO = 1 / 3
GOAL_R_ERR = 1e-6
PEFT_PEER = "PEFT get_peft_model (KaSA)"


def kasa_peer(method: str) -> str:
    return f"kasa_trl apply_kasa ({method})"


def _adapt(name: str, model: torch.nn.Module, spec: common.ModelSpec) -> torch.nn.Module:
    if name == PEFT_PEER:
        return common.apply_peer(model, common.PEFT_KASA, spec)
    from kasa_trl import apply_kasa

    method = name[name.index("(") + 1 : -1]
    return apply_kasa(model, common.kasa_config(spec, "in_place", method))


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


def profile_once(name: str, path, spec, device, dtype, top: int) -> dict:
    """cProfile of one adaptation of a fresh base."""
    model = common.load_base(path, dtype, device)
    return common.cprofile(lambda: (_adapt(name, model, spec), common.sync(device)), top)


def run(args: argparse.Namespace, cache: common.BaseCache | None = None) -> dict:
    spec, device, dtype = common.setup_run(args)
    repeats = common.repeats_from_args(args)
    own_cache = cache is None
    cache = cache or common.BaseCache(args.cache_dir)
    try:
        path = cache.base(spec)
        peers = [kasa_peer(m) for m in args.methods] + [PEFT_PEER]
        checked: dict[str, dict] = {}
        originals: dict[str, torch.Tensor] = {}
        references: dict[str, tuple] = {}

        def measure(name: str, rep: int) -> float:
            model = common.load_base(path, dtype, device)
            if rep == 0 and not references:
                linears = common.adapted_linears(model)
                wanted = [n for n in linears if args.check_all or ".layers.0." in n]
                for n in wanted:
                    originals[n] = linears[n].weight.detach().cpu().clone()
                    references[n] = _reference(originals[n], spec.r)
            seconds, adapted = common.timed(lambda: _adapt(name, model, spec), device)
            if rep == 0:
                checked[name] = accuracy(name, adapted, originals, references, spec.r)
                checked[name]["_targets"] = common.adapted_names(adapted)
            return seconds

        times = common.alternate(peers, measure, repeats)
        targets = {tuple(v.pop("_targets")) for v in checked.values()}
        if len(targets) != 1:
            raise RuntimeError("kasa_trl and PEFT adapted different layers: the comparison would be unfair")

        rows, table_rows = [], []
        for name in peers:
            layer_errors = checked[name]
            r_errs = [e["r_err"] for e in layer_errors.values() if e["r_err"] is not None]
            w_errs = [e["w_trunc_err"] for e in layer_errors.values()]
            ratio = common.paired_ratio(times, name, PEFT_PEER)
            row = {
                "peer": name,
                "time_s": common.stats(times[name]),
                "ratio_to_peft": ratio,
                "max_r_err": max(r_errs) if r_errs else None,
                "max_w_trunc_err": max(w_errs),
                "layers": layer_errors,
            }
            rows.append(row)
            table_rows.append(
                [
                    name,
                    row["time_s"]["median"],
                    row["time_s"]["min"],
                    ratio["median"],
                    row["max_r_err"],
                    row["max_w_trunc_err"],
                ]
            )
        table = common.markdown(
            ["peer", "median (s)", "min (s)", "ratio to PEFT", "max R err", "max W_trunc err"], table_rows
        )
        auto = next(r for r in rows if r["peer"] == kasa_peer(args.methods[0]))
        ratio = auto["ratio_to_peft"]["median"]
        goals = [
            common.goal(
                "KaSA initialization time", "PEFT get_peft_model (KaSA)", "<= 0.333x",
                ratio, ratio <= GOAL_RATIO, note=f"{auto['peer']}",
            ),
            common.goal(
                "removed part vs float64 SVD", "float64 SVD", "<= 1e-6 relative",
                auto["max_r_err"], auto["max_r_err"] <= GOAL_R_ERR, unit="",
                note=f"{len(originals)} layers checked",
            ),
        ]  # fmt: skip
        result = {
            "benchmark": "init_time",
            "environment": common.environment(device, dtype),
            "settings": {"spec": asdict(spec), "repeats": repeats, "methods": args.methods},
            "rows": rows,
            "table": table,
            "goals": goals,
            "notes": [
                f"{len(targets.pop())} adapted layers (all-linear), r={spec.r}, {spec.spectrum} spectrum "
                f"(cond {spec.cond:g}); time = the adaptation alone (base loaded beforehand, untimed).",
            ],
        }
        if args.profile:
            result["profile"] = {
                name: profile_once(name, path, spec, device, dtype, args.profile_top) for name in peers
            }
            for name, prof in result["profile"].items():
                result["notes"].append(f"cProfile {name}: {common.cprofile_summary(prof)}")
        return common.finish(result, args.json)
    finally:
        if own_cache:
            cache.cleanup()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p, repeats=3, quick_repeats=2)
    p.add_argument(
        "--methods",
        nargs="+",
        default=["auto"],
        help="kasa_trl decomposition methods to time (the first is the goal's)",
    )
    p.add_argument(
        "--check-all", action="store_true", help="check accuracy on every layer, not only layer 0's"
    )
    p.add_argument("--profile", action="store_true", help="cProfile one extra adaptation per peer")
    p.add_argument("--profile-top", type=int, default=12)
    return p


def main(argv: list[str] | None = None) -> dict:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
