"""Register a KaSA regularizer in your own code and train with it.

A regularizer is a pure function of one KaSA layer's factors, ``fn(lora_A (r, in), lora_B (out, r),
lora_diag (r,)) -> scalar``, registered under a name with ``@kasa_trl.register_regularizer``; a
``KaSAConfig(regularizers={name: weight})`` then adds ``weight * sum over layers of fn(...)`` to the loss
(exactly once per optimizer step, under any gradient accumulation, checkpointing or ZeRO stage) and the trainer
logs its value as ``kasa/<name>``.

The one here, ``update_frobenius``, penalizes the energy of the actual update ``||B diag(sigma) A||_F^2``
(``dW`` up to the constant ``scaling^2``). The paper's ``||sigma||^2`` equals it only when A and B are
orthonormal, which the orthogonality term only encourages. It is computed from two r x r Gram matrices, never
the (out, in) product::

    python examples/custom_regularizer.py
    python examples/custom_regularizer.py --update_frobenius 0.1 --singular_value_l2 0 --max_steps 200
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from _common import (
    KaSAScriptArguments,
    load_model_and_tokenizer,
    load_train_dataset,
    parse_args,
    prepare_run,
    print_summary,
    resume_arg,
    save_embedded_base,
    shutdown_distributed,
)
from trl import SFTConfig

import kasa_trl
from kasa_trl.trainer import KaSATrainer

NAME = "update_frobenius"


@kasa_trl.register_regularizer(NAME)
def update_frobenius(lora_A: torch.Tensor, lora_B: torch.Tensor, lora_diag: torch.Tensor) -> torch.Tensor:
    """``||B diag(sigma) A||_F^2 = sum_ij sigma_i sigma_j (B^T B)_ij (A A^T)_ij`` (both Grams are symmetric)."""
    dtype = torch.promote_types(lora_A.dtype, torch.float32)  # upcast: Gram entries are sums of products
    a, b, sigma = lora_A.to(dtype), lora_B.to(dtype), lora_diag.to(dtype)
    return (torch.outer(sigma, sigma) * (b.T @ b) * (a @ a.T)).sum()


EMBEDDED_DEFAULTS = {"max_steps": 60}  # on top of _common.EMBEDDED_COMMON


@dataclass
class CustomRegularizerArguments(KaSAScriptArguments):
    update_frobenius: float = field(default=1e-2, metadata={"help": f"Weight of the {NAME} regularizer."})


def check_against_dense(model: torch.nn.Module) -> None:
    """The Gram form equals the dense ||B diag(sigma) A||_F^2 (on the first KaSA layer)."""
    layer = next(iter(kasa_trl.kasa_layers(model).values()))
    with torch.no_grad():
        a, b, sigma = (t.double() for t in (layer.lora_A, layer.lora_B, layer.lora_diag))
        dense = torch.linalg.matrix_norm((b * sigma) @ a).pow(2)
        torch.testing.assert_close(update_frobenius(a, b, sigma), dense)


def parse_command_line(argv: list[str] | None = None) -> tuple[CustomRegularizerArguments, SFTConfig]:
    """``(script_args, training_args)`` from ``argv`` (default: the command line)."""
    return parse_args(CustomRegularizerArguments, SFTConfig, "custom_regularizer", EMBEDDED_DEFAULTS, argv)


def main() -> None:
    script_args, training_args = parse_command_line()
    prepare_run(script_args, training_args)
    model, tokenizer = load_model_and_tokenizer(script_args)
    if script_args.model_name_or_path is None:
        save_embedded_base(model, tokenizer, training_args)
    trainer = KaSATrainer(
        model=model,
        args=training_args,
        train_dataset=load_train_dataset(script_args, "sft"),
        processing_class=tokenizer,
        kasa_config=script_args.kasa_config(**{NAME: script_args.update_frobenius}),
    )
    trainer.train(resume_from_checkpoint=resume_arg(training_args))
    check_against_dense(trainer.model)
    trainer.save_model()
    print_summary(trainer, training_args.output_dir, f"kasa/{NAME}", "kasa/regularization")
    shutdown_distributed()


if __name__ == "__main__":
    main()
