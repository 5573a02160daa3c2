"""One rank of a (possibly multi-process) KaSA training run, for tests/test_zero.py.

Launched by ``torchrun --nproc_per_node N`` (DeepSpeed ZeRO-2/3 over gloo on CPU) or as a plain single process.
Writes, from rank 0, ``result.pt`` in ``--out``: the final adapter tensors, the log history and timings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
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
        "zero_optimization": {
            "stage": stage,
            # 0: every parameter, however small, is really partitioned (else the test proves nothing).
            "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, default=0, help="0: no DeepSpeed")
    parser.add_argument("--global_batch", type=int, default=8)
    parser.add_argument("--grad_accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", choices=["none", "reentrant", "non_reentrant"], default="none")
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--base_mode", default="in_place")
    parser.add_argument(
        "--gather_layers",
        action="store_true",
        help="build the layers from gathered weights (the fallback path)",
    )
    args = parser.parse_args()

    from kasa_trl.trainer import KaSATrainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = args.global_batch // (world * args.grad_accum)
    # transformers 5's names: TRL's configs default the deprecated gradient_checkpointing to True, which would
    # also turn checkpointing on for "none".
    extra = {"activation_checkpointing": args.checkpointing != "none"}
    if args.checkpointing != "none":
        extra["activation_checkpointing_kwargs"] = {"use_reentrant": args.checkpointing == "reentrant"}
    config = tiny_sft_config(
        args.out,
        max_steps=args.steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=args.grad_accum,
        max_grad_norm=0.0,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        deepspeed=ds_config(args.stage) if args.stage else None,
        **extra,
    )
    tokenizer = build_tokenizer()
    if args.stage == 3:
        # The realistic path: from_pretrained under an active ZeRO-3 config partitions the weights at load
        # (deepspeed.zero.Init), so KaSA meets weights that no rank holds whole.
        import deepspeed
        from transformers import AutoModelForCausalLM

        _ = config.device  # initializes the torch process group (gloo on CPU)...
        deepspeed.init_distributed(dist_backend="gloo")  # ...which deepspeed.comm must adopt before zero.Init
        base_dir = os.path.join(args.out, "base")
        if int(os.environ.get("RANK", "0")) == 0:
            build_tiny_llama(len(tokenizer), seed=0).save_pretrained(base_dir)
        dist.barrier()
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    else:
        model = build_tiny_llama(len(tokenizer), seed=0)
    import kasa_trl.model
    import kasa_trl.target_decomposition

    decomposed: list[str] = []

    def counting(weight, n, method="auto"):
        decomposed.append(tuple(weight.shape))
        return minor_components(weight, n, method)

    from kasa_trl.decomposition import minor_components

    kasa_trl.target_decomposition.minor_components = counting  # ZeRO runs decompose in sharded_decompose
    # Gathers while building the layers (each rank should write its own partition instead).
    layer_gathers: list[str] = []

    def counting_gathered(params, modifier_rank=None, _gathered=kasa_trl.model.gathered):
        layer_gathers.append(str(modifier_rank))
        return _gathered(params, modifier_rank=modifier_rank)

    kasa_trl.model.gathered = counting_gathered
    if args.gather_layers:  # as for ZeRO++ hpZ, quantized or NVMe-offloaded partitions
        kasa_trl.model.writable_partition = lambda param: None
    start = time.perf_counter()
    trainer = KaSATrainer(
        model=model,
        args=config,
        train_dataset=load_tiny_dataset("sft").select(range(48)),
        processing_class=tokenizer,
        kasa_config=KaSAConfig(r=4, regularizers=STRONG, base_mode=args.base_mode),
    )
    init_seconds = time.perf_counter() - start
    partitioned = any(getattr(p, "ds_numel", None) and p.numel() == 0 for p in trainer.model.parameters())
    trainer.train(resume_from_checkpoint=args.resume)
    tensors = trainer.kasa_adapter_tensors()  # collective under ZeRO-3
    truncated = {}
    from kasa_trl.distributed import gathered

    for name, layer in kasa_layers(trainer.model).items():
        with gathered([layer.base_layer.weight]):
            truncated[name] = layer.base_layer.weight.detach().clone()
    rank = int(os.environ.get("RANK", "0"))
    torch.save(
        {"decomposed": len(decomposed), "truncated": truncated, "layer_gathers": len(layer_gathers)},
        os.path.join(args.out, f"rank{rank}.pt"),
    )
    if trainer.args.should_save:
        torch.save(
            {
                "adapter": tensors,
                "truncated": truncated,
                "log_history": trainer.state.log_history,
                "init_seconds": init_seconds,
                "world": world,
                "partitioned": partitioned,
            },
            os.path.join(args.out, "result.pt"),
        )
        print(json.dumps({"init_seconds": init_seconds, "world": world}))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
