"""The two pictures ``SpectrumCallback`` draws at the end of training, from its records.

Both summarize over layers instead of drawing one line per layer, so they read the same at 14 layers and at 200:
the median over layers, the band holding the middle 80% of layers (10th to 90th percentile), the min-max range,
and the two extreme layers drawn and named.

- ``kasa_spectrum_over_steps.png``: three panels against the optimizer step: the mean learned singular value
  ``|sigma|`` of each layer, the update norm ``||dW||_F`` of each layer, and the orthogonality errors
  ``||A A^T - I||_F``, ``||B^T B - I||_F``.
- ``kasa_spectrum_final.png``: the effective singular values of ``dW = scaling * B diag(sigma) A`` at the last
  record, as a heat map (one row per layer in model order, one column per index) and as a profile (median, bands
  and extreme layers per index).

matplotlib is drawn through its Agg canvas directly: no pyplot, so no global backend switch in the user's process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

OVER_STEPS_PNG = "kasa_spectrum_over_steps.png"
FINAL_PNG = "kasa_spectrum_final.png"

DPI = 100
OVER_STEPS_INCHES = (13.0, 4.2)
FINAL_INCHES = (13.0, 5.2)
BAND = (10, 90)  # percentiles of the middle band
MAX_ROW_LABELS = 40  # heat map rows labelled one by one up to this many layers, then evenly spaced ones

StepRecord = Mapping[str, Mapping[str, Any]]
"""One record's layers: ``{layer name: {"lora_diag": [r], "singular_values": [r], "orthogonality_A": float,
"orthogonality_B": float, "update_norm": float}}``, as in ``kasa_spectrum.jsonl``."""


def band_over_layers(values: np.ndarray) -> dict[str, np.ndarray]:
    """Per column of ``values`` (layers, k): the median, the ``BAND`` percentiles, the min and the max over layers
    (NaNs ignored), each (k,)."""
    low, high = np.nanpercentile(values, BAND, axis=0)
    return {
        "median": np.nanmedian(values, axis=0),
        "low": low,
        "high": high,
        "min": np.nanmin(values, axis=0),
        "max": np.nanmax(values, axis=0),
    }


def extreme_layers(names: Sequence[str], score: np.ndarray) -> tuple[int, int]:
    """Indices of the layers with the largest and the smallest finite ``score`` (the first on ties)."""
    finite = np.where(np.isfinite(score), score, np.nan)
    if np.all(np.isnan(finite)):
        return 0, 0
    return int(np.nanargmax(finite)), int(np.nanargmin(finite))


def short_names(names: Sequence[str]) -> list[str]:
    """Layer names without the dotted prefix they all share (``model.layers.``), whole when only one."""
    if len(names) < 2:
        return list(names)
    parts = [name.split(".") for name in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def over_steps_series(history: Sequence[tuple[int, StepRecord]]) -> tuple[list[str], dict[str, np.ndarray]]:
    """``(layer names, {quantity: (steps, layers)})`` for the over-steps picture; a layer missing from a record
    is NaN there."""
    names = list(history[-1][1])
    series = {key: np.full((len(history), len(names)), np.nan) for key in _OVER_STEPS}
    for t, (_, layers) in enumerate(history):
        for j, name in enumerate(names):
            layer = layers.get(name)
            if layer is None:
                continue
            series["mean_abs_sigma"][t, j] = float(np.mean(np.abs(layer["lora_diag"])))
            for key in ("update_norm", "orthogonality_A", "orthogonality_B"):
                series[key][t, j] = float(layer[key])
    return names, series


def final_matrix(layers: StepRecord) -> tuple[list[str], np.ndarray]:
    """``(layer names, (layers, r_max))`` effective singular values sorted largest first; NaN-padded where a
    layer has a smaller rank."""
    names = list(layers)
    values = [np.sort(np.asarray(layers[n]["singular_values"], dtype=float))[::-1] for n in names]
    width = max(len(v) for v in values)
    matrix = np.full((len(names), width), np.nan)
    for i, v in enumerate(values):
        matrix[i, : len(v)] = v
    return names, matrix


def save_spectrum_plots(history: Sequence[tuple[int, StepRecord]], out_dir: str | os.PathLike[str]) -> bool:
    """Draw both pictures into ``out_dir`` from ``history`` (``(step, layers)`` per record, oldest first);
    False, with nothing written, when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = np.asarray([step for step, _ in history], dtype=float)
    names, series = over_steps_series(history)
    labels = short_names(names)

    fig = Figure(figsize=OVER_STEPS_INCHES, dpi=DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.85, wspace=0.25)
    axes = fig.subplots(1, 3)
    marker = "o" if len(steps) == 1 else None
    for ax, key in zip(axes[:2], ("mean_abs_sigma", "update_norm"), strict=True):
        final = np.array([_last_finite(column) for column in series[key].T])  # extremes: by the last value
        _summary_lines(ax, steps, series[key], labels, final, marker=marker)
        title, ylabel = _OVER_STEPS[key]
        ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    ax = axes[2]
    for key, color in (("orthogonality_A", "tab:blue"), ("orthogonality_B", "tab:orange")):
        stats = band_over_layers(series[key].T)  # over layers, per step
        _, ylabel = _OVER_STEPS[key]
        ax.fill_between(steps, stats["low"], stats["high"], color=color, alpha=0.25, linewidth=0)
        ax.plot(steps, stats["median"], color=color, marker=marker, label=f"{ylabel}: median, 10-90% band")
    ax.set(title="orthogonality error per layer", xlabel="optimizer step", ylabel="Frobenius norm")
    ax.legend(fontsize=7, loc="best")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"KaSA adapters over training: {len(names)} layers, summarized over layers "
        f"(median, 10-90% band, min-max range, extreme layers named)",
        fontsize=10,
    )
    fig.savefig(out_dir / OVER_STEPS_PNG, dpi=DPI)

    step, final_layers = history[-1]
    names, matrix = final_matrix(final_layers)
    labels = short_names(names)
    fig = Figure(figsize=FINAL_INCHES, dpi=DPI)
    FigureCanvasAgg(fig)
    label_width = min(0.25, 0.0045 * max(len(label) for label in labels))  # ~4.5 px per 7 pt character
    fig.subplots_adjust(left=0.05 + label_width, right=0.99, bottom=0.11, top=0.87, wspace=0.25)
    heat_ax, profile_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.0, 1.2]})
    index = np.arange(1, matrix.shape[1] + 1)
    image = heat_ax.imshow(
        matrix,
        aspect="auto",
        interpolation="nearest",
        cmap="magma",
        extent=(0.5, matrix.shape[1] + 0.5, len(names) - 0.5, -0.5),
    )
    fig.colorbar(image, ax=heat_ax, fraction=0.06, pad=0.02).set_label("singular value")
    rows = np.arange(len(names))
    if len(names) > MAX_ROW_LABELS:
        rows = np.unique(np.linspace(0, len(names) - 1, MAX_ROW_LABELS // 2).round().astype(int))
    heat_ax.set_yticks(rows, [labels[i] for i in rows], fontsize=6 if len(rows) > 16 else 7)
    heat_ax.set(title="per layer (rows in model order)", xlabel="index i (largest first)", ylabel="layer")
    norms = np.sqrt(np.nansum(matrix**2, axis=1))  # ||dW||_F: extremes are the largest and smallest updates
    _summary_lines(profile_ax, index, matrix.T, labels, norms, marker="o" if len(index) <= 32 else None)
    profile_ax.set(
        title="over layers, per index",
        xlabel="index i (largest first)",
        ylabel="singular value",
    )
    profile_ax.grid(alpha=0.3)
    fig.suptitle(
        f"Effective singular values of dW = scaling * B diag(sigma) A at step {step} ({len(names)} layers)",
        fontsize=10,
    )
    fig.savefig(out_dir / FINAL_PNG, dpi=DPI)
    return True


_OVER_STEPS = {
    "mean_abs_sigma": ("learned singular values, per layer", "mean |sigma| of the layer"),
    "update_norm": ("update norm, per layer", "||dW||_F"),
    "orthogonality_A": ("orthogonality error", "||A A^T - I||_F"),
    "orthogonality_B": ("orthogonality error", "||B^T B - I||_F"),
}


def _summary_lines(
    ax: Any, x: np.ndarray, values: np.ndarray, labels: Sequence[str], score: np.ndarray, marker: str | None
) -> None:
    """Median, bands and the two layers of extreme ``score`` (layers,) of ``values`` (len(x), layers) against
    ``x``, with a legend."""
    stats = band_over_layers(values.T)
    n = values.shape[1]
    ax.fill_between(x, stats["min"], stats["max"], color="tab:blue", alpha=0.12, linewidth=0, label="min-max")
    ax.fill_between(
        x, stats["low"], stats["high"], color="tab:blue", alpha=0.3, linewidth=0, label="10-90% of layers"
    )
    ax.plot(x, stats["median"], color="tab:blue", linewidth=2, marker=marker, label=f"median of {n} layers")
    top, bottom = extreme_layers(labels, score)
    ax.plot(x, values[:, top], color="tab:red", linewidth=1, marker=marker, label=f"largest: {labels[top]}")
    if bottom != top:
        ax.plot(
            x,
            values[:, bottom],
            color="tab:green",
            linewidth=1,
            marker=marker,
            label=f"smallest: {labels[bottom]}",
        )
    ax.legend(fontsize=7, loc="best")


def _last_finite(column: np.ndarray) -> float:
    finite = column[np.isfinite(column)]
    return float(finite[-1]) if finite.size else float("nan")
