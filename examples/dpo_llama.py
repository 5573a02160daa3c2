"""Preference optimization (DPO) with a KaSA adapter: ``KaSADPOTrainer`` in place of TRL's ``DPOTrainer``.

The reference policy is the policy at step 0, the truncated base with the adapter off: the trainer computes it
with the trained model itself, adapters disabled, so there is no second model in memory and no second SVD.

With no arguments it trains the embedded tiny Llama on the shipped preference pairs and saves the adapter to
``outputs/dpo_llama``; the DPO loss starts at ln 2 (policy == reference) and goes down::

    python examples/dpo_llama.py
    python examples/sft_llama.py && python examples/dpo_llama.py --sft_adapter outputs/sft_llama
    python examples/dpo_llama.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_path pairs.jsonl \\
        --learning_rate 5e-5 --beta 0.1 --max_steps 500 --bf16 True

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
    load_train_dataset,
    parse_args,
    print_summary,
    shutdown_distributed,
)
from trl import DPOConfig

from kasa_trl import load_kasa_adapter, merge_and_unload
from kasa_trl.dpo_trainer import KaSADPOTrainer

# The embedded run: about 20 s on a 2-core CPU. A tiny random base with a frozen LM head can only move its
# log-probabilities a little, hence a large beta (and rank) for a visible trend: the logged loss goes from 0.81
# at step 1 (ln 2 = 0.69, policy == reference, plus 0.12 of regularizer) to about 0.69 after 60 steps, and the
# reward accuracy from 0 to about 0.6.
EMBEDDED_DEFAULTS = {
    "r": 16,
    "beta": 1.0,
    "max_steps": 60,
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-2,
    "lr_scheduler_type": "constant",
    "logging_steps": 10,
    "logging_first_step": True,
    "max_length": 64,
    "gradient_checkpointing": False,  # nothing to save on a 100k-parameter model
    "bf16": False,  # CPU: fp32 is faster and exact
    "save_strategy": "no",
}


@dataclass
class DPOScriptArguments(KaSAScriptArguments):
    sft_adapter: str | None = field(
        default=None,
        metadata={
            "help": "A KaSA adapter directory (e.g. outputs/sft_llama) merged into the base before DPO, which then "
            "starts from the SFT model and trains a fresh KaSA adapter on it."
        },
    )


def main() -> None:
    script_args, training_args = parse_args(DPOScriptArguments, DPOConfig, "dpo_llama", EMBEDDED_DEFAULTS)
    model, tokenizer = load_model_and_tokenizer(script_args)
    if script_args.sft_adapter is not None:
        merge_and_unload(load_kasa_adapter(model, script_args.sft_adapter))
    trainer = KaSADPOTrainer(
        model=model,
        args=training_args,
        train_dataset=load_train_dataset(script_args, "dpo"),
        processing_class=tokenizer,
        kasa_config=script_args.kasa_config(),
    )
    trainer.train()
    trainer.save_model()
    print_summary(trainer, training_args.output_dir, "rewards/accuracies", "rewards/margins")
    shutdown_distributed()


if __name__ == "__main__":
    main()
