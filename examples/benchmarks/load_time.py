"""Adapter load time onto a fresh base: ``kasa_trl.load_kasa_adapter`` vs ``PeftModel.from_pretrained`` of a PEFT
KaSA adapter.

Untimed preparation: each library adapts a fresh base, gets random (non-zero) adapter weights and saves its
adapter. Each repetition then loads a fresh base (untimed) per peer, in a rotating order, and times the adapter
load alone. kasa_trl stores the removed factors with the adapter and runs no decomposition; PEFT stores only
A, B, sigma and re-runs the fp32 SVD of every target weight to rebuild the truncation.

Check: the truncated base weights after loading against those of the model that was saved (max abs difference;
0 means bit-identical).

    python examples/benchmarks/load_time.py           # 4 layers 1024/2816, r=16
    python examples/benchmarks/load_time.py --quick   # seconds (CI)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import measure  # noqa: E402
import workload  # noqa: E402

GOAL_SPEEDUP = 20.0
PEFT_PEER = "PEFT PeftModel.from_pretrained (KaSA)"


def kasa_peer(mode: str) -> str:
    return f"kasa_trl load_kasa_adapter ({mode})"


# Peer name -> the adapter it saves (untimed), as a peer of workload.apply_peer.
SAVES = {
    kasa_peer("in_place"): workload.KASA_IN_PLACE,
    kasa_peer("non_destructive"): workload.KASA_NON_DESTRUCTIVE,
    PEFT_PEER: workload.PEFT_KASA,
}


def save(peer: str, model: torch.nn.Module, directory: Path) -> None:
    if peer == PEFT_PEER:
        model.save_pretrained(directory)
    else:
        from kasa_trl import save_kasa_adapter

        save_kasa_adapter(model, directory)


def load(peer: str, model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    if peer == PEFT_PEER:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, directory)
    from kasa_trl import load_kasa_adapter

    return load_kasa_adapter(model, directory)


def _base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every adapted layer's base weight, keyed by its name relative to the transformer."""
    weights = {}
    for name, module in model.named_modules():
        if name.endswith("base_layer"):
            weights[name[name.index("layers.") :]] = module.weight.detach().cpu().clone()
    return weights


def run(args: argparse.Namespace, cache: harness.BaseCache | None = None) -> dict:
    with (
        harness.session(args, cache) as run_,
        tempfile.TemporaryDirectory(prefix="kasa_bench_adapters_") as tmp,
    ):
        spec, device = run_.spec, run_.device
        peers = list(SAVES)
        dirs = {peer: Path(tmp) / f"adapter{i}" for i, peer in enumerate(peers)}
        saved = {}
        for peer in peers:
            model = workload.apply_peer(run_.load_base(), SAVES[peer], spec)
            save(peer, workload.randomize_adapter(model, spec.seed), dirs[peer])
            saved[peer] = _base_weights(model)
        sizes = {peer: sum(f.stat().st_size for f in dirs[peer].iterdir()) for peer in peers}
        diffs: dict[str, float] = {}

        def one(name: str, rep: int) -> float:
            model = run_.load_base()
            seconds, loaded = measure.timed(lambda: load(name, model, dirs[name]), device)
            if rep == 0:
                after = _base_weights(loaded)
                if sorted(after) != sorted(saved[name]):
                    raise RuntimeError(f"{name} loaded onto other layers than it saved")
                diffs[name] = max(float((after[k] - saved[name][k]).abs().max()) for k in after)
            return seconds

        times = measure.compare(peers, one, run_.repeats)
        profiles = {}
        if args.profile:  # one extra load onto a fresh base per peer
            for name in peers:
                model = run_.load_base()
                profiles[name] = measure.cprofile(
                    lambda n=name, m=model: load(n, m, dirs[n]), args.profile_top
                )

        rows, table_rows = [], []
        for name in peers:
            speedup = times.ratio(PEFT_PEER, name)
            rows.append({"peer": name, "time_s": times.stats(name), "speedup_vs_peft": speedup,
                         "adapter_bytes": sizes[name], "w_trunc_max_abs_diff": diffs[name]})  # fmt: skip
            table_rows.append([name, rows[-1]["time_s"]["median"], rows[-1]["time_s"]["min"], speedup["median"],
                               sizes[name] / 2**20, diffs[name]])  # fmt: skip
        table = harness.markdown(
            [
                "peer",
                "median (s)",
                "min (s)",
                "PEFT time / this",
                "adapter MiB",
                "W_trunc max |diff| vs saved",
            ],
            table_rows,
        )
        speedup = rows[0]["speedup_vs_peft"]
        goals = [
            harness.goal(
                "adapter load time onto a fresh base", PEFT_PEER, f">= {GOAL_SPEEDUP:g}x faster", speedup["median"],
                speedup["median"] >= GOAL_SPEEDUP, unit="x faster", note=f"{peers[0]}; {measure.quartiles(speedup)}",
            )
        ]  # fmt: skip
        notes = [
            "time = the adapter load alone (fresh base loaded beforehand, untimed); the kasa_trl adapter "
            "carries the removed factors (r x (in + out) per layer), hence its larger size.",
        ]
        notes += [f"cProfile {name}: {measure.cprofile_summary(prof)}" for name, prof in profiles.items()]
        return run_.report("load_time", settings={"repeats": run_.repeats}, rows=rows, table=table, goals=goals,
                           notes=notes, **({"profile": profiles} if profiles else {}))  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = harness.parser(__doc__, repeats=3, quick_repeats=2)
    harness.add_profile_options(p, "cProfile one extra load per peer", top=12)
    return p


if __name__ == "__main__":
    harness.main(parser, run)
