"""One rank of a KaSA training run on a 4-bit (bitsandbytes nf4) base, for tests/test_quantized_distributed.py.

Launched by ``torchrun --nproc_per_node N`` (DDP, or DeepSpeed ZeRO-2/3 over gloo on CPU) or as a plain single
process. Rank 0 writes ``result.pt`` in ``--out``: the final adapter tensors, the log history, whether the quantized
bytes were left untouched, or the error the trainer refused with.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from kasa_trl import KaSAConfig, kasa_layers
from kasa_trl.tiny import build_tiny_llama, build_tokenizer, load_tiny_dataset

if not __package__:  # run as a script: make the repository's tests package (tests/helpers.py) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers import tiny_sft_config  # noqa: E402

STRONG = {"singular_value_l2": 0.5, "orthogonality": 0.5}


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
    }


def packed(model) -> list[torch.Tensor]:
    return [p.detach().clone() for name, p in model.named_parameters() if p.dtype == torch.uint8]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, default=0, help="0: no DeepSpeed (one process, or DDP)")
    parser.add_argument("--global_batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from kasa_trl.trainer import KaSATrainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    tokenizer = build_tokenizer()
    # Loaded before the training arguments exist, as a user does: a ZeRO-3 config makes transformers refuse a
    # device_map (each rank saves its own copy of the base: no barrier needed before the process group exists).
    base_dir = os.path.join(args.out, f"base{rank}")
    build_tiny_llama(len(tokenizer), seed=0).save_pretrained(base_dir)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization, device_map="cpu")
    config = tiny_sft_config(
        args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.global_batch // world,
        max_grad_norm=0.0,
        activation_checkpointing=False,
        ddp_find_unused_parameters=False,
        deepspeed=ds_config(args.stage) if args.stage else None,
    )
    before = packed(model)
    result: dict = {"world": world}
    try:
        trainer = KaSATrainer(
            model=model,
            args=config,
            train_dataset=load_tiny_dataset("sft").select(range(32)),
            processing_class=tokenizer,
            kasa_config=KaSAConfig(r=4, regularizers=STRONG),
        )
    except ValueError as error:
        result.update(refused=str(error), layers=len(kasa_layers(model)))
    else:
        trainer.train()
        result.update(
            adapter=trainer.kasa_adapter_tensors(),
            log_history=trainer.state.log_history,
            bytes_unchanged=all(torch.equal(a, b) for a, b in zip(before, packed(model), strict=True)),
        )
    if rank == 0:
        torch.save(result, os.path.join(args.out, "result.pt"))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
