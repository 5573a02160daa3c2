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
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GOAL_SPEEDUP = 20.0
PEFT_PEER = "PEFT PeftModel.from_pretrained (KaSA)"


def kasa_peer(mode: str) -> str:
    return f"kasa_trl load_kasa_adapter ({mode})"


def _randomize(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.copy_((torch.randn(param.shape, generator=gen) * 0.02).to(param.dtype))


def _base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every adapted layer's base weight, keyed by its name relative to the transformer."""
    weights = {}
    for name, module in model.named_modules():
        if name.endswith("base_layer"):
            weights[name[name.index("layers.") :]] = module.weight.detach().cpu().clone()
    return weights


def prepare(peer: str, path, spec, dtype, device, directory: Path) -> dict[str, torch.Tensor]:
    """Adapt, randomize and save ``peer``'s adapter to ``directory``; its truncated base weights."""
    model = common.load_base(path, dtype, device)
    if peer == PEFT_PEER:
        model = common.apply_peer(model, common.PEFT_KASA, spec)
        _randomize([p for n, p in model.named_parameters() if "lora_" in n], spec.seed)
        model.save_pretrained(directory)
    else:
        from kasa_trl import apply_kasa, kasa_layers, save_kasa_adapter

        mode = peer[peer.index("(") + 1 : -1]
        model = apply_kasa(model, common.kasa_config(spec, mode))
        _randomize(
            [p for layer in kasa_layers(model).values() for p in layer.adapter_params().values()], spec.seed
        )
        save_kasa_adapter(model, directory)
    return _base_weights(model)


def load(peer: str, model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    if peer == PEFT_PEER:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, directory)
    from kasa_trl import load_kasa_adapter

    return load_kasa_adapter(model, directory)


def run(args: argparse.Namespace, cache: common.BaseCache | None = None) -> dict:
    spec, device, dtype = common.setup_run(args)
    repeats = common.repeats_from_args(args)
    own_cache = cache is None
    cache = cache or common.BaseCache(args.cache_dir)
    try:
        path = cache.base(spec)
        peers = [kasa_peer("in_place"), kasa_peer("non_destructive"), PEFT_PEER]
        with tempfile.TemporaryDirectory(prefix="kasa_bench_adapters_") as tmp:
            dirs = {peer: Path(tmp) / f"adapter{i}" for i, peer in enumerate(peers)}
            saved = {peer: prepare(peer, path, spec, dtype, device, dirs[peer]) for peer in peers}
            sizes = {peer: sum(f.stat().st_size for f in dirs[peer].iterdir()) for peer in peers}
            diffs: dict[str, float] = {}

            def measure(name: str, rep: int) -> float:
                model = common.load_base(path, dtype, device)
                seconds, loaded = common.timed(lambda: load(name, model, dirs[name]), device)
                if rep == 0:
                    after = _base_weights(loaded)
                    if sorted(after) != sorted(saved[name]):
                        raise RuntimeError(f"{name} loaded onto other layers than it saved")
                    diffs[name] = max(float((after[k] - saved[name][k]).abs().max()) for k in after)
                return seconds

            times = common.alternate(peers, measure, repeats)
            profiles = {}
            if args.profile:
                for name in peers:
                    model = common.load_base(path, dtype, device)
                    profiles[name] = common.cprofile(
                        lambda n=name, m=model: load(n, m, dirs[n]), args.profile_top
                    )

        rows, table_rows = [], []
        for name in peers:
            speedup = common.paired_ratio(times, PEFT_PEER, name)
            rows.append(
                {
                    "peer": name,
                    "time_s": common.stats(times[name]),
                    "speedup_vs_peft": speedup,
                    "adapter_bytes": sizes[name],
                    "w_trunc_max_abs_diff": diffs[name],
                }
            )
            table_rows.append(
                [
                    name,
                    rows[-1]["time_s"]["median"],
                    rows[-1]["time_s"]["min"],
                    speedup["median"],
                    sizes[name] / 2**20,
                    diffs[name],
                ]
            )
        table = common.markdown(
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
        speedup = rows[0]["speedup_vs_peft"]["median"]
        goals = [
            common.goal(
                "adapter load time onto a fresh base", PEFT_PEER, f">= {GOAL_SPEEDUP:g}x faster", speedup,
                speedup >= GOAL_SPEEDUP, unit="x faster", note=peers[0],
            )
        ]  # fmt: skip
        result = {
            "benchmark": "load_time",
            "environment": common.environment(device, dtype),
            "settings": {"spec": asdict(spec), "repeats": repeats},
            "rows": rows,
            "table": table,
            "goals": goals,
            "notes": [
                "time = the adapter load alone (fresh base loaded beforehand, untimed); the kasa_trl adapter "
                "carries the removed factors (r x (in + out) per layer), hence its larger size.",
            ],
        }
        for name, prof in profiles.items():
            result.setdefault("profile", {})[name] = prof
            result["notes"].append(f"cProfile {name}: {common.cprofile_summary(prof)}")
        return common.finish(result, args.json)
    finally:
        if own_cache:
            cache.cleanup()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p, repeats=3, quick_repeats=2)
    p.add_argument("--profile", action="store_true", help="cProfile one extra load per peer")
    p.add_argument("--profile-top", type=int, default=12)
    return p


def main(argv: list[str] | None = None) -> dict:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
