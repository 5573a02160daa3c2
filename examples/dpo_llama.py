"""Preference optimization (DPO) with a KaSA adapter: ``KaSADPOTrainer`` in place of TRL's ``DPOTrainer``.

The reference policy is the policy at step 0, the truncated base with the adapter off: the trainer computes it
with the trained model itself, adapters disabled, so there is no second model in memory and no second SVD.

With no arguments it trains the embedded tiny Llama on the shipped preference pairs and saves the adapter to
``outputs/dpo_llama``. At step 0 the policy equals the reference, so the DPO term of the loss is ln 2 = 0.693;
the logged ``loss`` adds the weighted regularizers (``kasa/regularization``), 0.81 = 0.693 + 0.12 at the first
log here, and goes down::

    python examples/dpo_llama.py
    python examples/sft_llama.py && python examples/dpo_llama.py --sft_adapter outputs/sft_llama
    python examples/dpo_llama.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_path pairs.jsonl \\
        --learning_rate 5e-5 --beta 0.1 --max_steps 500 --bf16

``--dataset_path`` takes a JSON/JSONL file in TRL's preference format, one
``{"prompt": ..., "chosen": ..., "rejected": ...}`` per line (strings or conversations). Every ``DPOConfig`` /
``TrainingArguments`` flag works (``--beta``, ``--loss_type``, ``--precompute_ref_log_probs``...); ``--help``
lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from _common import (
    KaSAScriptArguments,
    load_model_and_tokenizer,
    load_quantized_embedded_base,
    load_train_dataset,
    parse_args,
    prepare_run,
    print_summary,
    resume_arg,
    save_embedded_base,
    shutdown_distributed,
)
from trl import DPOConfig

from kasa_trl import load_kasa_adapter, merge_and_unload
from kasa_trl.dpo_trainer import KaSADPOTrainer

# The embedded run: about 20 s on a 2-core CPU. A tiny random base with a frozen LM head can only move its
# log-probabilities a little, hence a large beta (and rank) for a visible trend: the logged loss goes from 0.81
# at step 1 (ln 2 = 0.69, policy == reference, plus 0.12 of regularizer) to about 0.69 after 60 steps, and the
# reward accuracy from 0 to about 0.6. On top of _common.EMBEDDED_COMMON.
EMBEDDED_DEFAULTS = {"r": 16, "beta": 1.0, "max_steps": 60}


@dataclass
class DPOScriptArguments(KaSAScriptArguments):
    sft_adapter: str | None = field(
        default=None,
        metadata={
            "help": "A KaSA adapter directory (e.g. outputs/sft_llama) merged into the base before DPO, which then "
            "starts from the SFT model and trains a fresh KaSA adapter on it."
        },
    )


def parse_command_line(argv: list[str] | None = None) -> tuple[DPOScriptArguments, DPOConfig]:
    """``(script_args, training_args)`` from ``argv`` (default: the command line)."""
    return parse_args(DPOScriptArguments, DPOConfig, "dpo_llama", EMBEDDED_DEFAULTS, argv)


def main() -> None:
    script_args, training_args = parse_command_line()
    prepare_run(script_args, training_args)
    model, tokenizer = load_model_and_tokenizer(script_args, training_args)
    if script_args.sft_adapter is not None:
        merge_and_unload(load_kasa_adapter(model, script_args.sft_adapter))
    if script_args.model_name_or_path is None:
        # After the SFT merge: the base DPO trains on.
        base_dir = save_embedded_base(model, tokenizer, training_args)
        model = load_quantized_embedded_base(base_dir, script_args, training_args) or model
    trainer = KaSADPOTrainer(
        model=model,
        args=training_args,
        train_dataset=load_train_dataset(script_args, "dpo"),
        processing_class=tokenizer,
        kasa_config=script_args.kasa_config(),
    )
    trainer.train(resume_from_checkpoint=resume_arg(training_args))
    trainer.save_model()
    print_summary(trainer, training_args.output_dir, "rewards/accuracies", "rewards/margins")
    shutdown_distributed()


if __name__ == "__main__":
    main()
