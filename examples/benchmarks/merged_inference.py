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
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import measure  # noqa: E402
import workload  # noqa: E402

BASE = "base (untouched)"
MERGED_IN_PLACE = "kasa_trl merged (in_place)"
# Peer name -> (the adapter of workload.apply_peer it starts from, merged); the base has none.
PEERS = {
    BASE: (None, False),
    MERGED_IN_PLACE: (workload.KASA_IN_PLACE, True),
    "kasa_trl merged (non_destructive)": (workload.KASA_NON_DESTRUCTIVE, True),
    "kasa_trl unmerged (in_place)": (workload.KASA_IN_PLACE, False),
    "kasa_trl unmerged (non_destructive)": (workload.KASA_NON_DESTRUCTIVE, False),
    "PEFT KaSA unmerged": (workload.PEFT_KASA, False),
}
# "Same time": a merged model is structurally the base; this bounds the noise of a shared machine.
GOAL_TOLERANCE = 0.03


def build(peer: str, run_: harness.Run, batch: torch.Tensor) -> tuple[nn.Module, float | None]:
    """``peer``'s model, and for a merged one the max |logits(merged) - logits(unmerged)|."""
    adapter, merged = PEERS[peer]
    model = run_.load_base()
    if adapter is None:
        return model, None
    model = workload.randomize_adapter(workload.apply_peer(model, adapter, run_.spec), run_.spec.seed).eval()
    if not merged:
        return model, None
    from kasa_trl import kasa_layers, merge_and_unload

    with torch.inference_mode():
        unmerged = model(input_ids=batch).logits.float()
    model = merge_and_unload(model)
    if kasa_layers(model):
        raise RuntimeError(f"merge_and_unload left KaSA layers: {list(kasa_layers(model))[:3]}")
    with torch.inference_mode():
        logits = model(input_ids=batch).logits.float()
    return model, float((logits - unmerged).abs().max())


def run(args: argparse.Namespace, cache: harness.BaseCache | None = None) -> dict:
    with harness.session(args, cache) as run_:
        device = run_.device
        batch_size, seq = args.batch or 2, args.seq or (32 if args.quick else 256)
        forwards = args.forwards or (2 if args.quick else 5)
        batch = workload.random_batch(run_.spec, batch_size, seq, device)
        models, merge_diff = {}, {}
        for peer in PEERS:
            models[peer], merge_diff[peer] = build(peer, run_, batch)

        def forward(model: nn.Module) -> None:
            with torch.inference_mode():
                model(input_ids=batch)

        for model in models.values():  # warm-up
            forward(model)

        def one(name: str, rep: int) -> float:
            return statistics.median(
                measure.timed(lambda: forward(models[name]), device)[0] for _ in range(forwards)
            )

        times = measure.compare(list(PEERS), one, run_.repeats)
        rows, table_rows = [], []
        for name in PEERS:
            ratio = times.ratio(name, BASE)
            rows.append({"peer": name, "forward_s": times.stats(name), "ratio_to_base": ratio,
                         "merge_max_abs_diff": merge_diff[name]})  # fmt: skip
            table_rows.append([name, rows[-1]["forward_s"]["median"], rows[-1]["forward_s"]["min"], ratio["median"],
                               merge_diff[name]])  # fmt: skip
        table = harness.markdown(
            ["model", "median forward (s)", "min (s)", "vs base", "max |logits merged - unmerged|"],
            table_rows,
        )
        ratio = times.ratio(MERGED_IN_PLACE, BASE)
        goals = [
            harness.goal(
                "merged model inference", BASE, f"same time (within {GOAL_TOLERANCE:.0%})", ratio["median"],
                abs(ratio["median"] - 1) <= GOAL_TOLERANCE, note=f"{MERGED_IN_PLACE}; {measure.quartiles(ratio)}",
            )
        ]  # fmt: skip
        settings = {"repeats": run_.repeats, "batch": batch_size, "seq": seq, "forwards": forwards}
        notes = [f"forward of batch {batch_size} x {seq} tokens under torch.inference_mode"]
        return run_.report(
            "merged_inference", settings=settings, rows=rows, table=table, goals=goals, notes=notes
        )


def parser() -> argparse.ArgumentParser:
    p = harness.parser(__doc__, repeats=5, quick_repeats=2)
    p.add_argument("--batch", type=int, default=None, help="sequences per forward (default 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256; 32 with --quick)")
    p.add_argument(
        "--forwards", type=int, default=None, help="timed forwards per peer and repetition (default 5)"
    )
    return p


if __name__ == "__main__":
    harness.main(parser, run)
