"""What the example scripts share: command-line parsing, model and data loading, the summary, a clean exit.

Every script parses its own small dataclass of script arguments together with TRL's config class
(``SFTConfig`` / ``DPOConfig``), so every TRL and ``Trainer`` flag (``--max_steps``, ``--deepspeed``,
``--output_dir``, ``--activation_checkpointing``...) works from the command line, boolean ones bare as in TRL's
own scripts (``--bf16`` means ``--bf16 True``). With no ``--model_name_or_path`` a script runs the embedded
default (a tiny Llama built in code, the dataset shipped with kasa_trl) with defaults sized for a CPU; with one,
TRL's defaults apply to anything not given. ``--help`` shows both.

Where a run goes: ``outputs/<script>``, with the model's name and the DeepSpeed config's name appended when
given (``outputs/sft_llama-zero3``), so runs of different kinds never overwrite each other; rerunning the same
command replaces its own previous run, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, PreTrainedModel
from transformers.hf_argparser import string_to_bool
from transformers.utils import logging as hf_logging

from kasa_trl import KaSAConfig
from kasa_trl import torch_extensions as extensions
from kasa_trl.tiny import build_tiny_llama, build_tokenizer, load_tiny_dataset

# Deprecations inside the pinned libraries, repeated at every step, that a user can do nothing about: TRL 1.16's
# DPOTrainer reads transformers 5's deprecated `model.is_gradient_checkpointing`; DeepSpeed 0.19's ZeRO calls
# torch 2.13's deprecated `all_gather_into_tensor` / `reduce_scatter_tensor`.
for _message in (
    "`is_gradient_checkpointing` is deprecated",
    "`torch.distributed.all_gather_into_tensor` is deprecated",
    "`torch.distributed.reduce_scatter_tensor` is deprecated",
):
    warnings.filterwarnings("ignore", message=_message, category=FutureWarning)

REPO_ROOT = Path(__file__).resolve().parent.parent
# What `deepspeed examples/<script>.py` trains with when no --deepspeed config is given. ZeRO-3, not ZeRO-2: a
# KaSA run trains only the small adapter, so ZeRO-2 (which partitions gradients and optimizer states, i.e. the
# adapter's) saves next to nothing over DDP; only ZeRO-3 partitions the frozen base weights, where the memory is,
# and only ZeRO-3 exercises what kasa_trl adds to DeepSpeed (the decomposition sharded across ranks on
# partitioned weights, the regularizers computed where ZeRO-3 has gathered the factors).
DEFAULT_ZERO_CONFIG = REPO_ROOT / "deepspeed_configs" / "zero3.json"
BASE_DIR_NAME = "base"
"""Embedded runs save their base model and tokenizer here, inside the output directory."""

# Defaults every example uses for the embedded tiny model (each script adds its own on top).
EMBEDDED_COMMON = {
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-2,
    "lr_scheduler_type": "constant",
    "logging_steps": 10,
    "logging_first_step": True,
    "max_length": 64,
    "activation_checkpointing": False,  # nothing to save on a 100k-parameter model
    "bf16": False,  # CPU: fp32 is faster and exact
    "save_strategy": "no",
    # Every KaSA factor takes part in every forward of the tiny Llama: DDP's search for unused parameters would
    # only cost a graph traversal per step (and print a warning saying so).
    "ddp_find_unused_parameters": False,
}
_GRADIENT_CHECKPOINTING_FLAGS = (
    "--gradient_checkpointing",
    "--gradient-checkpointing",
    "--no_gradient_checkpointing",
    "--no-gradient-checkpointing",
)


@dataclass
class KaSAScriptArguments:
    """Model, data and KaSA settings of an example script."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A causal LM on the Hugging Face Hub or on disk (loaded with AutoModelForCausalLM / "
            "AutoTokenizer). Default: the embedded tiny Llama of kasa_trl.tiny, built in code (saved with the "
            "run under <output_dir>/base, so the adapter can be merged with no --base)."
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
        default="auto",
        metadata={
            "help": "in_place overwrites W with W_trunc (the paper); non_destructive keeps W and subtracts R x; "
            "auto is in_place on fp32 bases, non_destructive on bf16/fp16 and quantized ones.",
            "choices": ["auto", "in_place", "non_destructive"],
        },
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "Load the base in 4 bits (bitsandbytes nf4 with double quantization, QLoRA's recipe; compute "
            "dtype bf16 with --bf16, fp16 with --fp16, else fp32) and train KaSA on it (non_destructive). Needs "
            "pip install 'kasa_trl[quantization]'; runs on CPU too."
        },
    )
    load_in_8bit: bool = field(
        default=False,
        metadata={
            "help": "Load the base in 8 bits (bitsandbytes LLM.int8) and train KaSA on it (non_destructive)."
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
    default_zero3: bool = field(
        default=True,
        metadata={
            "help": "Under the deepspeed launcher with no --deepspeed config, train with ZeRO-3 "
            "(deepspeed_configs/zero3.json); --no_default_zero3 trains plain DDP instead."
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
    script_class: type,
    config_class: type,
    name: str,
    embedded_defaults: dict[str, Any],
    argv: Sequence[str] | None = None,
) -> tuple[Any, Any]:
    """Parse ``argv`` (default ``sys.argv[1:]``) into ``(script_args, training_args)``.

    Also sets what this process needs before ``training_args`` exist (``OMP_NUM_THREADS`` for the embedded
    model, ``DS_ACCELERATOR=cpu`` without an accelerator). Defaults on top of the dataclasses': ``output_dir`` (see the module docstring), ``use_cpu`` when CUDA is
    absent (what ``deepspeed script.py`` on a CPU-only machine needs: one rank, the CPU accelerator), the shipped
    ZeRO-3 config under the deepspeed launcher when no ``--deepspeed`` is given (unless ``--no_default_zero3``),
    and, with no ``--model_name_or_path``, ``EMBEDDED_COMMON`` updated with ``embedded_defaults``. Flags given on
    the command line always win.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    deepspeed = _check_deepspeed_config(argv)
    known, _ = HfArgumentParser(script_class, add_help=False).parse_known_args(argv)
    embedded = known.model_name_or_path is None
    zero3_by_default = (
        deepspeed is None
        and known.default_zero3
        and launched_by_deepspeed()
        and DEFAULT_ZERO_CONFIG.is_file()
    )
    if zero3_by_default:
        deepspeed = _shown_path(DEFAULT_ZERO_CONFIG)
        argv += ["--deepspeed", deepspeed]
    _process_settings(embedded)  # before the config: building it sets up accelerate's state

    distributed = launched_by_deepspeed() or int(os.environ.get("WORLD_SIZE", "1")) > 1
    output_dir = default_output_dir(name, known.model_name_or_path, deepspeed, distributed=distributed)
    defaults: dict[str, Any] = {"output_dir": output_dir}
    defaults["report_to"] = "none"
    if not torch.cuda.is_available():
        defaults["use_cpu"] = True
    if embedded:
        defaults.update({**EMBEDDED_COMMON, **embedded_defaults})
    # transformers 5 deprecates gradient_checkpointing for activation_checkpointing and warns whenever the old
    # name carries a value, which TRL's configs always give it (True). Unless the user spells the old flag, the
    # value goes to the new name: TRL's default (on) for a real model, off for the embedded one.
    if not any(arg.split("=")[0] in _GRADIENT_CHECKPOINTING_FLAGS for arg in argv):
        trl_default = _field_default(config_class, "gradient_checkpointing")
        defaults["activation_checkpointing"] = defaults.get("activation_checkpointing", trl_default)
        defaults["gradient_checkpointing"] = None
    else:
        defaults.pop("activation_checkpointing", None)

    parser = build_parser(script_class, config_class, embedded_defaults, embedded)
    parser.set_defaults(**defaults)
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if zero3_by_default and os.environ.get("RANK", "0") == "0":
        print(f"DeepSpeed launcher: ZeRO-3 with {deepspeed} (the default when no --deepspeed is given; "
              "--no_default_zero3 trains plain DDP instead)")  # fmt: skip
    return script_args, training_args


def build_parser(
    script_class: type, config_class: type, embedded_defaults: dict[str, Any], embedded: bool = True
) -> HfArgumentParser:
    """The scripts' parser: boolean flags work bare, and ``--help`` gives both defaults of every flag the
    embedded tiny model changes (``embedded``: whether this command line runs it, i.e. has no
    ``--model_name_or_path``; the default shown first is the one that applies)."""
    parser = HfArgumentParser(
        (script_class, config_class),
        description="Without --model_name_or_path the script trains the embedded tiny Llama (built in code) with "
        "defaults sized for a CPU; with one, TRL's defaults apply. The help of each flag concerned gives both.",
    )
    for action in parser._actions:
        if action.option_strings and action.option_strings[0] == "--no_default_zero3":
            action.help = "Train plain DDP under the deepspeed launcher when no --deepspeed config is given."
        # transformers gives `bool | None` fields (bf16, tf32, activation_checkpointing...) no bare form.
        if action.type is string_to_bool and action.nargs is None:
            action.nargs, action.const = "?", True
    tiny = {**EMBEDDED_COMMON, **embedded_defaults}
    # activation_checkpointing's own default is None: TRL's value comes through gradient_checkpointing's.
    real_defaults = {"activation_checkpointing": _field_default(config_class, "gradient_checkpointing")}
    for action in parser._actions:
        if (
            action.dest not in tiny
            or not action.option_strings
            or action.option_strings[0].startswith("--no")
        ):
            continue
        real = str(real_defaults.get(action.dest, action.default)).replace("%", "%%")
        small = str(tiny[action.dest]).replace("%", "%%")
        if embedded:
            note = f"(default: %(default)s for the embedded tiny model; with --model_name_or_path: {real})"
        else:
            note = f"(default: %(default)s with --model_name_or_path; for the embedded tiny model: {small})"
        action.help = f"{action.help or ''} {note}"
    return parser


def launched_by_deepspeed() -> bool:
    """Whether this process was started by the ``deepspeed`` launcher (``deepspeed.launcher.launch`` sets these
    variables for every rank it starts; torchrun and accelerate do not)."""
    return all(name in os.environ for name in ("CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE"))


def default_output_dir(
    name: str, model_name_or_path: str | None, deepspeed: str | None, *, distributed: bool = False
) -> str:
    """``outputs/<name>``, then ``-<model>`` and ``-<DeepSpeed config>`` when given, or ``-ddp`` for a
    multi-process run without DeepSpeed (``distributed``): one folder per kind of run."""
    parts = [name]
    if model_name_or_path:
        parts.append(Path(model_name_or_path.rstrip("/\\")).name)
    if deepspeed:
        parts.append("deepspeed" if deepspeed.lstrip().startswith("{") else Path(deepspeed).stem)
    elif distributed:
        parts.append("ddp")
    return str(Path("outputs") / "-".join(parts))


def prepare_run(script_args: KaSAScriptArguments, training_args: Any) -> None:
    """What a run needs before the model is built: thread settings, DeepSpeed's CPU op checked (a stale build
    lock, no compiler: exit with the fix), and a word on the output directory and the DeepSpeed config in use.
    Prints on the main process only."""
    main = os.environ.get("RANK", "0") == "0"
    local_main = os.environ.get("LOCAL_RANK", "0") == "0"
    deepspeed = training_args.deepspeed
    if deepspeed and not torch.cuda.is_available():
        _check_deepspeed_cpu_op(announce=local_main)
    adapter = Path(training_args.output_dir) / "kasa_adapter.safetensors"
    if main and adapter.is_file() and not training_args.resume_from_checkpoint:
        print(
            f"{training_args.output_dir} holds an earlier run: this run replaces it (--output_dir keeps both)"
        )


def _check_deepspeed_cpu_op(announce: bool) -> None:
    # Every rank stops; only the first of each node says why (the message is the same everywhere).
    try:
        live = extensions.check_build_locks()
    except RuntimeError as e:
        sys.exit(f"error: {e}" if announce else 1)
    if extensions.is_built():
        return
    if extensions.compiler() is None:
        message = (
            "error: DeepSpeed on a CPU compiles a C++ op on its first run and needs a C++ compiler, and none was "
            f"found ({os.environ.get('CXX', 'c++')} is not on PATH): install one (e.g. apt-get install g++), or "
            "train without DeepSpeed"
        )
        sys.exit(message if announce else 1)
    if announce:
        waiting = f", waiting for the build of pid {live[0].holders[0]}" if live and live[0].holders else ""
        print(
            f"DeepSpeed is compiling its CPU op ({extensions.CPU_COMM_OP}) into {extensions.extensions_root()} "
            f"(first run only, about a minute){waiting}...",
            flush=True,
        )


def save_embedded_base(model: PreTrainedModel, tokenizer: Any, training_args: Any) -> Path:
    """Save the embedded base (model and tokenizer) as ``<output_dir>/base`` and name it in ``model``'s config,
    so the adapter saved from it records where its base is (``kasa-trl merge ADAPTER OUT`` needs no ``--base``).

    Call with the model the adapter will be trained on (after merging an SFT adapter, for DPO), before KaSA is
    applied. Only the main process writes."""
    base_dir = (Path(training_args.output_dir) / BASE_DIR_NAME).resolve()
    if training_args.should_save:
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a bar for writing one 0.4 MB shard is noise
        try:
            model.save_pretrained(base_dir)
            tokenizer.save_pretrained(base_dir)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    model.config._name_or_path = str(base_dir)
    return base_dir


def resume_arg(training_args: Any) -> str | bool | None:
    """``--resume_from_checkpoint`` for ``trainer.train``: a checkpoint path, or ``True`` for the newest complete
    checkpoint in ``output_dir`` (``--resume_from_checkpoint true``)."""
    value = training_args.resume_from_checkpoint
    if isinstance(value, str) and value.lower() in ("true", "last"):
        return True
    return value


def _check_deepspeed_config(argv: list[str]) -> str | None:
    """``--deepspeed``'s value; names the file when it is missing or not valid JSON (accelerate would fail with a
    bare JSONDecodeError)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--deepspeed")
    path = pre.parse_known_args(argv)[0].deepspeed
    if not path or path.lstrip().startswith("{"):  # inline JSON is parsed by transformers itself
        return path
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
    return path


def _process_settings(embedded: bool) -> None:
    if embedded and "OMP_NUM_THREADS" not in os.environ:
        # A 100k-parameter model gains nothing from intra-op threads, and on a busy machine OpenMP threads
        # spin-waiting for a core slow each step down many times (100 SFT steps on 2 loaded cores: 5 s with
        # one thread, 206 s with two). The variable also keeps accelerate from picking a count for CPU ranks.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    if not torch.accelerator.is_available():  # what DeepSpeed falls back to anyway, minus its warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _field_default(config_class: type, name: str) -> Any:
    return config_class.__dataclass_fields__[name].default


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    relative = os.path.relpath(path)
    return path.as_posix() if relative.startswith("..") else relative


def load_model_and_tokenizer(
    script_args: KaSAScriptArguments, training_args: Any = None
) -> tuple[PreTrainedModel, Any]:
    """``--model_name_or_path`` through the Auto classes (quantized with ``--load_in_4bit``/``--load_in_8bit``),
    else the embedded tiny Llama and its tokenizer (always the same weights, whatever ``--seed``, so an adapter
    trained by one example fits the base of another; see ``load_quantized_embedded_base`` to quantize it)."""
    if script_args.model_name_or_path is None:
        tokenizer = build_tokenizer()
        return build_tiny_llama(len(tokenizer), seed=0), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    dtype = script_args.dtype if script_args.dtype == "auto" else getattr(torch, script_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        script_args.model_name_or_path, dtype=dtype, **quantized_loading(script_args, training_args)
    )
    return model, tokenizer


def quantized_loading(script_args: KaSAScriptArguments, training_args: Any) -> dict[str, Any]:
    """``from_pretrained`` arguments for ``--load_in_4bit`` / ``--load_in_8bit`` (``{}`` without them): the
    ``BitsAndBytesConfig`` and a ``device_map`` holding the whole model on this rank's device."""
    if script_args.load_in_4bit and script_args.load_in_8bit:
        raise ValueError("--load_in_4bit and --load_in_8bit exclude each other; pass one")
    if not (script_args.load_in_4bit or script_args.load_in_8bit):
        return {}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        sys.exit(
            "error: --load_in_4bit/--load_in_8bit need bitsandbytes: pip install 'kasa_trl[quantization]'"
        )
    from transformers import BitsAndBytesConfig

    if script_args.load_in_8bit:
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        bf16, fp16 = getattr(training_args, "bf16", False), getattr(training_args, "fp16", False)
        compute = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    device = {"": int(os.environ.get("LOCAL_RANK", "0"))} if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": device}


def load_quantized_embedded_base(
    base_dir: Path, script_args: KaSAScriptArguments, training_args: Any
) -> PreTrainedModel | None:
    """With ``--load_in_4bit`` / ``--load_in_8bit``, the embedded base reloaded quantized from ``base_dir``
    (``save_embedded_base``'s folder), as a user loads a quantized checkpoint; ``None`` without them."""
    loading = quantized_loading(script_args, training_args)
    if not loading:
        return None
    with training_args.main_process_first(local=False, desc="the embedded base"):
        pass  # the main process has saved it
    return AutoModelForCausalLM.from_pretrained(base_dir, **loading)


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
        if len(values) == 1:
            lines.append(f"{key}: {values[0]:.4g} (one logged step)")
        elif values:
            lines.append(f"{key}: {values[0]:.4f} (first log) -> {values[-1]:.4f} (last log)")
    lines.append(f"KaSA adapter saved to {output_dir}")
    base = Path(output_dir) / BASE_DIR_NAME
    if (base / "config.json").is_file():
        lines.append(f"its base model saved to {base} (kasa-trl merge {output_dir} OUT needs no --base)")
    print("\n".join(lines))


def shutdown_distributed() -> None:
    """Tear the process group down in step on every rank (without it, multi-rank runs sometimes abort at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
