"""What the example scripts share: command-line parsing, model and data loading, the summary, a clean exit.

Every script parses its own small dataclass of script arguments together with TRL's config class
(``SFTConfig`` / ``DPOConfig``), so every TRL and ``Trainer`` flag (``--max_steps``, ``--deepspeed``,
``--output_dir``, ``--gradient_checkpointing``...) works from the command line. With no
``--model_name_or_path`` a script runs the embedded default (a tiny Llama built in code, the dataset shipped
with kasa_trl) with defaults sized for a CPU; with one, TRL's defaults apply to anything not given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, PreTrainedModel

from kasa_trl import KaSAConfig
from kasa_trl.tiny import build_tiny_llama, build_tokenizer, load_tiny_dataset


@dataclass
class KaSAScriptArguments:
    """Model, data and KaSA settings of an example script."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A causal LM on the Hugging Face Hub or on disk (loaded with AutoModelForCausalLM / "
            "AutoTokenizer). Default: the embedded tiny Llama of kasa_trl.tiny, built in code."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype to load --model_name_or_path in.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    dataset_path: str | None = field(
        default=None,
        metadata={
            "help": "A local JSON or JSONL file in TRL's format for this script (see its docstring). Default: the "
            "dataset shipped with kasa_trl."
        },
    )
    r: int = field(default=8, metadata={"help": "KaSA rank; also the number of singular components removed."})
    lora_alpha: float = field(default=16, metadata={"help": "Scaling numerator: scaling = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Module names to adapt (e.g. q_proj v_proj), or all-linear (every Linear but the head)."
        },
    )
    base_mode: str = field(
        default="in_place",
        metadata={
            "help": "in_place overwrites W with W_trunc (the paper); non_destructive keeps W and subtracts R x.",
            "choices": ["in_place", "non_destructive"],
        },
    )
    truncation: str = field(
        default="paper",
        metadata={
            "help": "paper keeps k - r components; official mimics the official code.",
            "choices": ["paper", "official"],
        },
    )
    singular_value_l2: float = field(
        default=1e-4, metadata={"help": "Weight of ||sigma||^2 (beta in the paper); 0 turns it off."}
    )
    orthogonality: float = field(
        default=1e-3,
        metadata={"help": "Weight of ||B^T B - I|| + ||A A^T - I|| (gamma in the paper); 0 turns it off."},
    )
    regularizer_reduction: str = field(
        default="sum",
        metadata={
            "help": "Per-layer terms: sum (paper, PEFT) or mean (official code).",
            "choices": ["sum", "mean"],
        },
    )

    def kasa_config(self, **extra_regularizers: float) -> KaSAConfig:
        """The ``KaSAConfig`` these arguments describe, with ``extra_regularizers`` (name -> weight) added."""
        targets = self.target_modules
        return KaSAConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules="all-linear" if targets == ["all-linear"] else targets,
            base_mode=self.base_mode,
            truncation=self.truncation,
            regularizers={
                "singular_value_l2": self.singular_value_l2,
                "orthogonality": self.orthogonality,
                **extra_regularizers,
            },
            regularizer_reduction=self.regularizer_reduction,
        )


def parse_args(
    script_class: type, config_class: type, name: str, embedded_defaults: dict[str, Any]
) -> tuple[Any, Any]:
    """Parse ``sys.argv`` into ``(script_args, training_args)``.

    Defaults on top of the dataclasses': ``output_dir=outputs/<name>``, ``use_cpu`` when CUDA is absent (what
    ``deepspeed script.py`` on a CPU-only machine needs: one rank, the CPU accelerator), and, with no
    ``--model_name_or_path``, ``embedded_defaults``. Flags given on the command line always win.
    """
    argv = sys.argv[1:]
    _check_deepspeed_config(argv)
    model_only = HfArgumentParser(script_class, add_help=False)
    known, _ = model_only.parse_known_args(argv)
    parser = HfArgumentParser((script_class, config_class))
    defaults: dict[str, Any] = {"output_dir": f"outputs/{name}", "report_to": "none"}
    if not torch.cuda.is_available():
        defaults["use_cpu"] = True
    if known.model_name_or_path is None:
        defaults.update(embedded_defaults)
    parser.set_defaults(**defaults)
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return script_args, training_args


def _check_deepspeed_config(argv: list[str]) -> None:
    """Name the file when ``--deepspeed`` is not valid JSON (accelerate would fail with a bare JSONDecodeError)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--deepspeed")
    path = pre.parse_known_args(argv)[0].deepspeed
    if not path or path.lstrip().startswith("{"):  # inline JSON is parsed by transformers itself
        return
    if not os.path.isfile(path):
        raise ValueError(
            f"--deepspeed {path}: no such DeepSpeed config file (see deepspeed_configs/ for examples)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"--deepspeed {path}: the DeepSpeed config is not valid JSON ({e}); fix the file"
        ) from None


def load_model_and_tokenizer(script_args: KaSAScriptArguments) -> tuple[PreTrainedModel, Any]:
    """``--model_name_or_path`` through the Auto classes, else the embedded tiny Llama and its tokenizer (always
    the same weights, whatever ``--seed``, so an adapter trained by one example fits the base of another)."""
    if script_args.model_name_or_path is None:
        if "OMP_NUM_THREADS" not in os.environ:
            # A 100k-parameter model gains nothing from intra-op threads, and on a busy machine OpenMP threads
            # spin-waiting for a core slow each step down many times (100 SFT steps on 2 loaded cores: 5 s with
            # one thread, 206 s with two).
            torch.set_num_threads(1)
        tokenizer = build_tokenizer()
        return build_tiny_llama(len(tokenizer), seed=0), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    dtype = script_args.dtype if script_args.dtype == "auto" else getattr(torch, script_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(script_args.model_name_or_path, dtype=dtype)
    return model, tokenizer


def load_train_dataset(script_args: KaSAScriptArguments, kind: str) -> datasets.Dataset:
    """``--dataset_path`` (a local JSON/JSONL file), else the shipped ``kind`` dataset (``"sft"``, ``"dpo"``)."""
    if script_args.dataset_path is None:
        return load_tiny_dataset(kind)
    return datasets.load_dataset("json", data_files=script_args.dataset_path, split="train")


def logged(trainer: Any, key: str) -> list[float]:
    """Every training-time value of ``key`` in the trainer's log history."""
    return [
        entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry
    ]


def print_summary(trainer: Any, output_dir: str, *extra_keys: str) -> None:
    """First and last logged loss (and ``extra_keys``) and where the adapter went; main process only."""
    if not trainer.is_world_process_zero():
        return
    lines = [f"steps: {trainer.state.global_step}"]
    for key in ("loss", *extra_keys):
        values = logged(trainer, key)
        if values:
            lines.append(f"{key}: {values[0]:.4f} (first log) -> {values[-1]:.4f} (last log)")
    lines.append(f"KaSA adapter saved to {output_dir}")
    print("\n".join(lines))


def shutdown_distributed() -> None:
    """Tear the process group down in step on every rank (without it, multi-rank runs sometimes abort at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
