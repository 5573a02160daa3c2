"""``kasa-trl``: export, merge and inspect KaSA adapters from the command line.

    kasa-trl export-lora ADAPTER_DIR OUT_DIR [--base MODEL [--force-base]] [--pad-to-rank N|vllm] [--dtype D]
                         [--overwrite]
    kasa-trl export-peft-kasa ADAPTER_DIR OUT_DIR [--base MODEL [--force-base]] [--overwrite]
    kasa-trl merge ADAPTER_DIR OUT_DIR [--base MODEL [--force-base]] [--dtype D] [--overwrite]
    kasa-trl inspect ADAPTER_DIR [--json] [--png PATH] [--top K]

MODEL defaults to the base the adapter records; a --base naming another one is refused unless --force-base.
The base's weights are checked against the adapter as ``load_kasa_adapter`` checks them, wherever it is
available locally.

Exit codes: 0 success, 1 unexpected failure, 2 bad usage or bad input (missing or wrong adapter, wrong base,
an output that overlaps an input, a non-empty output directory). Errors print one ``kasa-trl: error: ...`` line,
no traceback (set ``KASA_TRL_DEBUG=1`` for one); warnings one ``kasa-trl: warning: ...`` line each.

No command destroys an input (``kasa_trl.atomic_outputs``): an output that equals, contains or lies inside the
adapter directory, a local base directory or a file either links to is refused, with or without --overwrite;
--overwrite replaces only an earlier kasa-trl output (listed in its manifest), never other files. Outputs are
written into an exclusively created temporary sibling and swapped into place at the end, so OUT_DIR is either
complete or untouched; what a killed run leaves is cleaned up, or named, by the next run. torch and
transformers are imported inside the commands, so ``--help`` stays cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TextIO

from .atomic_outputs import atomic_output_dir, check_output_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROG = "kasa-trl"
EXIT_FAILURE, EXIT_USAGE = 1, 2
# kasa_trl.adapter_io.ADAPTER_FILE, spelled out so that checking inputs imports no torch (tests keep them equal).
_ADAPTER_FILE = "kasa_adapter.safetensors"
_DTYPES = ("float32", "bfloat16", "float16")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


_UNREGISTERED_REGULARIZERS = r"adapter .* was trained with regularizers .* that are not registered here"


class UsageError(Exception):
    """Bad input from the user: reported without a traceback, exit code 2."""


# Library errors that mean "the input is wrong", not "kasa_trl is broken".
_BAD_INPUT = (UsageError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script passes it to ``sys.exit``)."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            # Regularizers matter for training only: an unregistered one is irrelevant to every command here.
            warnings.filterwarnings("ignore", message=_UNREGISTERED_REGULARIZERS)
            args.run(args)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except _BAD_INPUT as e:
        _error(str(e))
        return EXIT_USAGE
    except Exception as e:
        if os.environ.get("KASA_TRL_DEBUG"):
            raise
        _error(f"{type(e).__name__}: {e} (set KASA_TRL_DEBUG=1 for a traceback)")
        return EXIT_FAILURE
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Export, merge and inspect KaSA adapters (kasa_trl).", allow_abbrev=False
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = commands.add_parser(
        "export-lora",
        help="write an exact vanilla PEFT LoRA adapter (rank r + n) for the ORIGINAL base: PEFT, vLLM, TGI",
        description="Write a standard PEFT LoRA adapter equivalent to the KaSA adapter, on the untouched base.",
    )
    _add_io_args(export)
    export.add_argument("--base", metavar="MODEL", help=_BASE_HELP + "; recorded in the exported config")
    export.add_argument(
        "--pad-to-rank",
        metavar="N|vllm",
        type=_rank_arg,
        help="zero-pad the LoRA to rank N (>= r + n), or 'vllm' for the smallest rank vLLM's --max-lora-rank accepts",
    )
    export.add_argument("--dtype", choices=_DTYPES, default="float32", help="dtype of the exported factors")
    export.set_defaults(run=_export_lora)

    peft_kasa = commands.add_parser(
        "export-peft-kasa",
        help="write the adapter in PEFT's KaSA format (peft >= 0.21; Linear targets, paper truncation)",
        description="Write the adapter as PEFT's KaSA variant; PEFT re-runs the SVD truncation when loading it.",
    )
    _add_io_args(peft_kasa)
    peft_kasa.add_argument("--base", metavar="MODEL", help=_BASE_HELP + "; recorded in the exported config")
    peft_kasa.set_defaults(run=_export_peft_kasa)

    merge = commands.add_parser(
        "merge",
        help="fold the adapter into the base weights and save a plain transformers model",
        description="Load MODEL, apply the adapter, merge it (W_trunc + dW) and save_pretrained the result, "
        "with the tokenizer if one is found (adapter directory first, then MODEL).",
    )
    _add_io_args(merge)
    merge.add_argument("--base", metavar="MODEL", help=_BASE_HELP)
    merge.add_argument(
        "--dtype", choices=("auto", *_DTYPES), default="auto", help="dtype to load the base in"
    )
    merge.set_defaults(run=_merge)

    inspect = commands.add_parser(
        "inspect",
        help="per-layer spectra and orthogonality of an adapter (reads the adapter file only)",
        description="Per layer: rank r, removed components n, |lora_diag| min/mean/max, the largest singular "
        "values of dW = s B diag(sigma) A, the orthogonality errors ||A A^T - I||_F and ||B^T B - I||_F, "
        "||dW||_F and ||R||_F (the removed part).",
    )
    inspect.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a kasa_trl adapter directory")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument(
        "--png", metavar="PATH", help="also save a picture of the spectra (needs matplotlib)"
    )
    inspect.add_argument(
        "--top", metavar="K", type=_positive_int, default=3, help="singular values of dW to show"
    )
    inspect.set_defaults(run=_inspect)
    return parser


_BASE_HELP = (
    "the base model the adapter was trained on (default: the one the adapter records); its weights are checked "
    "against the adapter when it is available locally"
)


def _add_io_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a kasa_trl adapter directory")
    parser.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        help="output directory: new or empty, and outside the adapter and base directories",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier kasa-trl output in OUT_DIR (never other files: those are named and refused)",
    )
    parser.add_argument(
        "--force-base",
        action="store_true",
        help="use --base even though the adapter records another base (e.g. a local copy of the recorded hub "
        "model); its weights are still checked",
    )


# --- commands ---------------------------------------------------------------------------------------------


def _export_lora(args: argparse.Namespace) -> None:
    adapter = _check_adapter_dir(args.adapter_dir)
    base = _base(args, adapter)
    out = _check_out_dir(args.out_dir, args.overwrite, _inputs(adapter, base))
    torch = _quiet_libraries()

    from .integrations.peft import VLLM_MAX_LORA_RANKS, export_lora

    export_lora(
        adapter,
        out,
        base_model_name_or_path=base,
        pad_to_rank=args.pad_to_rank,
        dtype=getattr(torch, args.dtype),
        overwrite=args.overwrite,
        force_base=args.force_base,
    )
    config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    from .adapter_io import read_adapter_info

    quantization = read_adapter_info(adapter).base_quantization
    if quantization is not None:
        print(
            f"the adapter was trained on a {_kinds(quantization)} base: load the base quantized the same way to "
            "reproduce the KaSA model's outputs (BitsAndBytesConfig.from_dict(kasa_trl.read_adapter_info("
            "ADAPTER_DIR).base_quantization['config']))"
        )
    rank = config["r"]
    vllm_rank = next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)
    print(f"wrote a rank-{rank} LoRA adapter for the ORIGINAL base to {out}")
    if vllm_rank is not None:
        print(
            f"vLLM: vllm serve {base or 'BASE'} --enable-lora --max-lora-rank {vllm_rank} --lora-modules NAME={out}"
        )


def _export_peft_kasa(args: argparse.Namespace) -> None:
    adapter = _check_adapter_dir(args.adapter_dir)
    base = _base(args, adapter)
    out = _check_out_dir(args.out_dir, args.overwrite, _inputs(adapter, base))
    _quiet_libraries()
    from .integrations.peft import export_peft_kasa

    export_peft_kasa(
        adapter, out, base_model_name_or_path=base, overwrite=args.overwrite, force_base=args.force_base
    )
    print(
        f"wrote a PEFT KaSA adapter to {out}; load it with peft.PeftModel.from_pretrained(base, {str(out)!r})"
    )


def _merge(args: argparse.Namespace) -> None:
    adapter = _check_adapter_dir(args.adapter_dir)
    base = _base(args, adapter)
    if base is None:
        raise UsageError(f"the adapter at {adapter} does not record its base model; pass --base MODEL")
    origin = "" if args.base else " (recorded in the adapter; pass --base to use another copy)"
    inputs = _inputs(adapter, base)
    out = _check_out_dir(args.out_dir, args.overwrite, inputs)
    torch = _quiet_libraries()
    from transformers import AutoModelForCausalLM

    from .adapter_io import load_kasa_adapter, read_adapter_info
    from .model import kasa_layers
    from .quantized import loading_kwargs
    from .unloading import merge_and_unload

    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    if not os.path.isdir(base) and (os.sep in base or base.startswith(".")):
        raise UsageError(f"base model directory {base} does not exist{origin}")
    # An adapter trained on a quantized base is merged into that base dequantized: the weights it was trained on.
    quantization = read_adapter_info(adapter).base_quantization
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=dtype, **loading_kwargs(quantization, f"the adapter at {adapter}")
        )
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load base model {base!r}{origin}: {e}") from e
    if quantization is not None:
        model = model.dequantize()
        print(
            f"dequantized the {_kinds(quantization)} base: the merged model is full precision and computes what "
            "the adapter was trained with (dequantized W - R + dW)"
        )
    load_kasa_adapter(model, adapter)
    n_layers = len(kasa_layers(model))
    merge_and_unload(model)
    tokenizer = _find_tokenizer(adapter, base)
    with atomic_output_dir(out, overwrite=args.overwrite, inputs=inputs) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    note = "" if tokenizer is not None else " (no tokenizer found to copy)"
    print(
        f"loaded {base}, merged {n_layers} KaSA layers, saved the merged model to {out}{note}; {base} is unchanged"
    )


def _kinds(quantization: dict[str, Any]) -> str:
    """The quantization kinds an adapter's base record names, in words."""
    from .quantized import RECORD_LAYERS

    return " / ".join(sorted(set(quantization[RECORD_LAYERS].values())))


def _inspect(args: argparse.Namespace) -> None:
    adapter = _check_adapter_dir(args.adapter_dir)
    from .adapter_io import read_adapter
    from .inspect_report import format_table, layer_stats, save_png

    config, per_layer = read_adapter(adapter)
    stats = [layer_stats(name, tensors, config.scaling, top=args.top) for name, tensors in per_layer.items()]
    if args.json:
        report = {"adapter": str(adapter), "config": config.to_dict(), "layers": stats}
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{adapter}: {len(stats)} KaSA layers, r={config.r}, lora_alpha={config.lora_alpha}, "
            f"scaling={config.scaling:g}, base_mode={config.base_mode}, truncation={config.truncation}"
        )
        print(format_table(stats))
    if args.png:
        try:
            save_png(stats, Path(args.png), inputs=_inputs(adapter, None))
        except ModuleNotFoundError as e:
            raise UsageError("--png needs matplotlib: pip install 'kasa_trl[plots]'") from e
        if not args.json:
            print(f"saved {args.png}")


# --- helpers ----------------------------------------------------------------------------------------------


def _quiet_libraries() -> ModuleType:
    """Import torch for a command that loads or saves models, without the libraries' noise on its output: no
    load/save progress bars, and DeepSpeed (which transformers' save path imports when installed) told it runs on
    the CPU when there is no CUDA, instead of warning that it could not detect an accelerator. Returns torch."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    from transformers.utils import logging as transformers_logging

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    transformers_logging.disable_progress_bar()
    return torch


def _find_tokenizer(adapter: Path, base: str) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with the adapter, else the base's; ``None`` if neither has one."""
    from transformers import AutoTokenizer

    for source in (str(adapter), base):
        if os.path.isdir(source) and not any(
            os.path.isfile(os.path.join(source, f)) for f in _TOKENIZER_FILES
        ):
            continue
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, KeyError):
            continue
    return None


def _check_adapter_dir(path: str) -> Path:
    directory = Path(path)
    if not directory.exists():
        raise UsageError(f"adapter directory {directory} does not exist")
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory; pass a kasa_trl adapter directory")
    if not (directory / _ADAPTER_FILE).is_file():
        hint = (
            "; it holds a PEFT adapter (adapter_config.json): load it with peft, or import a PEFT KaSA adapter "
            "with kasa_trl.integrations.peft.import_peft_kasa"
            if (directory / "adapter_config.json").is_file()
            else ""
        )
        raise UsageError(
            f"{directory} is not a kasa_trl adapter directory ({_ADAPTER_FILE} is missing){hint}"
        )
    return directory


def _base(args: argparse.Namespace, adapter: Path) -> str | None:
    """--base, else the base the adapter records; a --base naming another one is refused without --force-base."""
    from .integrations.peft import resolve_base

    return resolve_base(adapter, args.base, force=args.force_base)


def _inputs(adapter: Path, base: str | None) -> dict[str, Path | str | None]:
    """What a command reads, by role: no output may overlap them (``kasa_trl.atomic_outputs``)."""
    return {
        "adapter directory": adapter,
        "base model directory": base if base and os.path.isdir(base) else None,
    }


def _check_out_dir(path: str, overwrite: bool, inputs: dict[str, Path | str | None]) -> Path:
    """Refuse, before any work, an OUT_DIR that overlaps an input, or that --overwrite may not replace."""
    try:
        check_output_dir(path, overwrite=overwrite, inputs=inputs)
    except (ValueError, FileExistsError, NotADirectoryError) as e:
        raise UsageError(
            str(e).replace("overwrite=True (--overwrite on the command line)", "--overwrite")
        ) from e
    return Path(path)


def _rank_arg(value: str) -> int | str:
    if value == "vllm":
        return value
    return _positive_int(value)


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    # One line per warning (what a killed earlier run left and what was done with it, an unchecked base...).
    print(f"{PROG}: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
