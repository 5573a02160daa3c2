"""Supervised fine-tuning with a KaSA adapter: ``KaSATrainer`` in place of TRL's ``SFTTrainer``.

With no arguments it trains the embedded tiny Llama on the shipped conversational set, on CPU in well under a
minute, and saves the adapter to ``outputs/sft_llama``::

    python examples/sft_llama.py
    python examples/sft_llama.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_path chats.jsonl \\
        --r 16 --target_modules q_proj k_proj v_proj o_proj --learning_rate 2e-4 --max_steps 500 --bf16
    deepspeed examples/sft_llama.py   # ZeRO-3 (deepspeed_configs/zero3.json) by default; also on a CPU

``--dataset_path`` takes a JSON/JSONL file in any format ``SFTTrainer`` accepts, e.g. one
``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}`` per line. Every
``SFTConfig`` / ``TrainingArguments`` flag works, boolean ones bare (``--bf16``); ``--help`` lists them. The
embedded run also saves its base model as ``outputs/sft_llama/base`` (the adapter records it): load the adapter
back with ``kasa_trl.load_kasa_adapter(base_model, "outputs/sft_llama")``, or merge it with
``kasa-trl merge outputs/sft_llama merged/``.
"""

from __future__ import annotations

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
from trl import SFTConfig

from kasa_trl.callbacks import SpectrumCallback
from kasa_trl.trainer import KaSATrainer

# The embedded run: about 20 s on a 2-core CPU. The tiny base is random with a frozen LM head, which bounds how
# far the loss can fall (from 5.4 at step 1 to about 4.5) while the token accuracy climbs from 0 to about 0.7.
# On top of _common.EMBEDDED_COMMON.
EMBEDDED_DEFAULTS = {"max_steps": 100}


def parse_command_line(argv: list[str] | None = None) -> tuple[KaSAScriptArguments, SFTConfig]:
    """``(script_args, training_args)`` from ``argv`` (default: the command line)."""
    return parse_args(KaSAScriptArguments, SFTConfig, "sft_llama", EMBEDDED_DEFAULTS, argv)


def main() -> None:
    script_args, training_args = parse_command_line()
    prepare_run(script_args, training_args)
    model, tokenizer = load_model_and_tokenizer(script_args, training_args)
    if script_args.model_name_or_path is None:
        base_dir = save_embedded_base(model, tokenizer, training_args)
        model = load_quantized_embedded_base(base_dir, script_args, training_args) or model
    trainer = KaSATrainer(
        model=model,
        args=training_args,
        train_dataset=load_train_dataset(script_args, "sft"),
        processing_class=tokenizer,
        kasa_config=script_args.kasa_config(),
        callbacks=[SpectrumCallback()],
    )
    trainer.train(resume_from_checkpoint=resume_arg(training_args))
    trainer.save_model()
    print_summary(trainer, training_args.output_dir, "mean_token_accuracy", "kasa/regularization")
    shutdown_distributed()


if __name__ == "__main__":
    main()
