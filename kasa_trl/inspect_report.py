"""What ``kasa-trl inspect`` reports about a saved adapter: per-layer spectra and orthogonality, as a table, JSON
or a picture. Everything comes from the adapter file (no base model is needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .atomic_outputs import atomic_output_file
from .factors import delta_singular_values, orthogonality_error
from .spectrum_plots import short_names

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The PNG text chunk that marks a picture as inspect's, so that a later --png may replace it (and nothing else).
PNG_KEY, PNG_TAG = "Software", "kasa-trl inspect"


def layer_stats(
    name: str, tensors: dict[str, torch.Tensor], scaling: float, *, top: int = 3
) -> dict[str, Any]:
    """One layer's spectra and orthogonality, from its saved tensors (``adapter_io.read_adapter``)."""
    A, B, diag = (tensors[k].to(torch.float64) for k in ("lora_A", "lora_B", "lora_diag"))
    spectrum = delta_singular_values(A, B, diag, scaling)
    err_A, err_B = orthogonality_error(A, B)
    magnitude = diag.abs()
    return {
        "layer": name,
        "r": int(A.shape[0]),
        "n_removed": int(tensors["removed_left"].shape[1]),
        "abs_diag_min": float(magnitude.min()),
        "abs_diag_mean": float(magnitude.mean()),
        "abs_diag_max": float(magnitude.max()),
        "delta_singular_values": [float(v) for v in spectrum[:top]],
        "orthogonality_error_A": float(err_A),
        "orthogonality_error_B": float(err_B),
        "delta_norm": float(torch.linalg.vector_norm(spectrum)),
        # right has orthonormal rows, so ||R||_F = ||left @ right||_F = ||left||_F.
        "removed_norm": float(torch.linalg.matrix_norm(tensors["removed_left"].to(torch.float64))),
    }


def format_table(stats: list[dict[str, Any]]) -> str:
    """``layer_stats`` of every layer as an aligned text table."""
    header = [
        "layer",
        "r",
        "n",
        "|diag| min/mean/max",
        "dW top singular values",
        "orth A",
        "orth B",
        "||dW||_F",
        "||R||_F",
    ]
    rows = [
        [
            s["layer"],
            str(s["r"]),
            str(s["n_removed"]),
            f"{s['abs_diag_min']:.3g}/{s['abs_diag_mean']:.3g}/{s['abs_diag_max']:.3g}",
            " ".join(f"{v:.3g}" for v in s["delta_singular_values"]),
            f"{s['orthogonality_error_A']:.3g}",
            f"{s['orthogonality_error_B']:.3g}",
            f"{s['delta_norm']:.3g}",
            f"{s['removed_norm']:.3g}",
        ]
        for s in stats
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save_png(stats: list[dict[str, Any]], path: Path, *, inputs: dict[str, Path | str | None]) -> None:
    """Draw ``stats`` into ``path`` (atomically; an existing file is replaced only if ``is_inspect_png``).

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    fig = draw(stats)
    with atomic_output_file(path, inputs=inputs, is_ours=is_inspect_png, what="PNG") as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={PNG_KEY: PNG_TAG})


def draw(stats: list[dict[str, Any]]) -> Figure:
    """The ``inspect --png`` figure: spectra and orthogonality errors per layer, the x axis labelled with the
    layers' short names (without the prefix they share), the legends outside the plots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    index = range(len(stats))
    names = short_names([s["layer"] for s in stats])
    height = 4 + 0.06 * max(len(n) for n in names) if names else 4
    fig = Figure(
        figsize=(max(12, 0.3 * len(stats) + 6), height), layout="constrained"
    )  # no pyplot: no global backend switch
    FigureCanvasAgg(fig)
    spectra, errors = fig.subplots(1, 2)
    spectra.plot(index, [s["delta_norm"] for s in stats], "o-", label="||dW||_F")
    spectra.plot(
        index, [s["delta_singular_values"][0] for s in stats], ".--", label="largest singular value of dW"
    )
    spectra.plot(index, [s["abs_diag_max"] for s in stats], "x:", label="max |lora_diag|")
    spectra.plot(index, [s["removed_norm"] for s in stats], "s-", alpha=0.5, label="||R||_F (removed)")
    spectra.set(ylabel="magnitude", title="update and removed spectra", yscale="log")
    errors.plot(index, [s["orthogonality_error_A"] for s in stats], "o-", label="||A A^T - I||_F")
    errors.plot(index, [s["orthogonality_error_B"] for s in stats], "x-", label="||B^T B - I||_F")
    errors.set(title="orthogonality errors")
    for axes in (spectra, errors):
        axes.set_xticks(list(index), names, rotation=90, fontsize="small")
        axes.set_xlabel("KaSA layer")
        axes.legend(fontsize="small", loc="lower center", bbox_to_anchor=(0.5, 1.08), ncols=2)
    return fig


def is_inspect_png(path: Path) -> bool:
    """Whether ``path`` is a PNG that ``inspect --png`` wrote (its tEXt chunk ``Software: kasa-trl inspect``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)  # matplotlib writes the text chunks right after the header
    except OSError:
        return False
    return head.startswith(b"\x89PNG\r\n\x1a\n") and f"{PNG_KEY}\0{PNG_TAG}".encode() in head
