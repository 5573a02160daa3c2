"""Merged-model inference: the output of ``kasa_trl.merge_and_unload`` vs the untouched base model, forward time.

A merged KaSA model is a plain ``LlamaForCausalLM`` again (every ``KaSALinear`` replaced by its ``nn.Linear``
holding ``W_trunc + dW``), so it must run exactly as fast as the base. Also timed, for reference: the unmerged
adapters (kasa_trl in both base modes, PEFT KaSA), which pay the adapter branch (and, non-destructive, the
``R x`` correction) in every forward.

Each peer's model is built once (untimed; random non-zero adapter weights), then every repetition times
``--forwards`` forward passes (``torch.inference_mode``) of every peer in a rotating order, the median forward per
repetition; ratios are medians over repetitions of the per-repetition ratio to the base. Check: the merged model's
logits against the unmerged model's (max abs difference).

    python examples/benchmarks/merged_inference.py           # batch 2 x 256 tokens
    python examples/benchmarks/merged_inference.py --quick   # seconds (CI)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BASE = "base (untouched)"
MERGED_IN_PLACE = "kasa_trl merged (in_place)"
MERGED_NON_DESTRUCTIVE = "kasa_trl merged (non_destructive)"
UNMERGED_IN_PLACE = "kasa_trl unmerged (in_place)"
UNMERGED_NON_DESTRUCTIVE = "kasa_trl unmerged (non_destructive)"
PEFT_UNMERGED = "PEFT KaSA unmerged"
PEERS = [
    BASE,
    MERGED_IN_PLACE,
    MERGED_NON_DESTRUCTIVE,
    UNMERGED_IN_PLACE,
    UNMERGED_NON_DESTRUCTIVE,
    PEFT_UNMERGED,
]
# "Same time": a merged model is structurally the base; this bounds the noise of a shared machine.
GOAL_TOLERANCE = 0.03


def _randomize(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.copy_((torch.randn(param.shape, generator=gen) * 0.02).to(param.dtype))


def build(peer: str, path, spec, dtype, device, batch) -> tuple[nn.Module, float | None]:
    """``peer``'s model, and for a merged one the max |logits(merged) - logits(unmerged)|."""
    model = common.load_base(path, dtype, device)
    if peer == BASE:
        return model, None
    if peer == PEFT_UNMERGED:
        model = common.apply_peer(model, common.PEFT_KASA, spec)
        _randomize([p for n, p in model.named_parameters() if "lora_" in n], spec.seed)
        return model.eval(), None
    from kasa_trl import apply_kasa, kasa_layers, merge_and_unload

    mode = "in_place" if peer in (MERGED_IN_PLACE, UNMERGED_IN_PLACE) else "non_destructive"
    model = apply_kasa(model, common.kasa_config(spec, mode))
    _randomize(
        [p for layer in kasa_layers(model).values() for p in layer.adapter_params().values()], spec.seed
    )
    model.eval()
    if peer in (UNMERGED_IN_PLACE, UNMERGED_NON_DESTRUCTIVE):
        return model, None
    with torch.inference_mode():
        unmerged = model(input_ids=batch).logits.float()
    model = merge_and_unload(model)
    wrappers = [n for n, m in model.named_modules() if type(m).__name__ == "KaSALinear"]
    if wrappers:
        raise RuntimeError(f"merge_and_unload left KaSA layers: {wrappers[:3]}")
    with torch.inference_mode():
        merged = model(input_ids=batch).logits.float()
    return model, float((merged - unmerged).abs().max())


def run(args: argparse.Namespace, cache: common.BaseCache | None = None) -> dict:
    spec, device, dtype = common.setup_run(args)
    repeats = common.repeats_from_args(args)
    batch_size, seq = args.batch or 2, args.seq or (32 if args.quick else 256)
    forwards = args.forwards or (2 if args.quick else 5)
    own_cache = cache is None
    cache = cache or common.BaseCache(args.cache_dir)
    try:
        path = cache.base(spec)
        batch = common.random_batch(spec, batch_size, seq, device)
        models, merge_diff = {}, {}
        for peer in PEERS:
            models[peer], merge_diff[peer] = build(peer, path, spec, dtype, device, batch)

        def forward(model: nn.Module) -> None:
            with torch.inference_mode():
                model(input_ids=batch)

        for model in models.values():  # warm-up
            forward(model)

        def measure(name: str, rep: int) -> float:
            return statistics.median(
                common.timed(lambda: forward(models[name]), device)[0] for _ in range(forwards)
            )

        times = common.alternate(PEERS, measure, repeats)
        rows, table_rows = [], []
        for name in PEERS:
            ratio = common.paired_ratio(times, name, BASE)
            rows.append({"peer": name, "forward_s": common.stats(times[name]), "ratio_to_base": ratio,
                         "merge_max_abs_diff": merge_diff[name]})  # fmt: skip
            table_rows.append(
                [
                    name,
                    rows[-1]["forward_s"]["median"],
                    rows[-1]["forward_s"]["min"],
                    ratio["median"],
                    merge_diff[name],
                ]
            )
        table = common.markdown(
            ["model", "median forward (s)", "min (s)", "vs base", "max |logits merged - unmerged|"],
            table_rows,
        )
        ratio = rows[PEERS.index(MERGED_IN_PLACE)]["ratio_to_base"]["median"]
        goals = [
            common.goal(
                "merged model inference", BASE, f"same time (within {GOAL_TOLERANCE:.0%})", ratio,
                abs(ratio - 1) <= GOAL_TOLERANCE, note=MERGED_IN_PLACE,
            )
        ]  # fmt: skip
        result = {
            "benchmark": "merged_inference",
            "environment": common.environment(device, dtype),
            "settings": {
                "spec": asdict(spec),
                "repeats": repeats,
                "batch": batch_size,
                "seq": seq,
                "forwards": forwards,
            },
            "rows": rows,
            "table": table,
            "goals": goals,
            "notes": [f"forward of batch {batch_size} x {seq} tokens under torch.inference_mode"],
        }
        return common.finish(result, args.json)
    finally:
        if own_cache:
            cache.cleanup()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p, repeats=5, quick_repeats=2)
    p.add_argument("--batch", type=int, default=None, help="sequences per forward (default 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256; 32 with --quick)")
    p.add_argument(
        "--forwards", type=int, default=None, help="timed forwards per peer and repetition (default 5)"
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
