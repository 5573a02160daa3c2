"""Whether a weight is the base an adapter was trained on: two cheap tests, independent of hardware and dtype.

1. A fingerprint saved with the adapter: ``N_PROBES`` projections ``l_k^T W r_k / sqrt(out in)`` with fixed
   Gaussian probes, and ``||W||_F``. A projection has the scale of ``rms(W) = ||W||_F / sqrt(out in)``, and a
   change ``D`` of the weight moves it by about ``N(0, rms(D)^2)``: in units of ``rms(W)``, by the relative
   change ``||D||_F / ||W||_F`` times a standard normal.
2. The removed directions (docs/design.md section 1, "Base identity"). The adapter stores
   ``removed_left = U_n S_n`` and ``removed_right = V_n^T``; the untouched base satisfies ``u_i^T W v_i = s_i`` for
   each removed triplet, a base already truncated by the adapter (a merged model, or one that had the adapter
   loaded) gives 0. The change ``D`` moves ``u_i^T W v_i`` by ``u_i^T D v_i``, also about ``N(0, rms(D)^2)``.

The rule: a weight is the base when every projection and every ``u_i^T W v_i - s_i`` is within ``TOLERANCE``
times ``rms(W)`` of the saved value, and its norm within ``TOLERANCE`` of the saved norm (relative). So

- a copy of the same weights in another floating dtype is accepted: re-rounding to bf16 changes each entry by at
  most ``2^-8`` of itself (unit roundoff), so ``||D|| <= 0.0039 ||W||`` (about 0.0017 in practice, 0.0002 for
  fp16), and a deviation of ``TOLERANCE`` is at least 5 standard deviations away;
- a change of relative size ``c`` in a direction unrelated to the probes passes one test with probability
  ``P(|N(0, 1)| < TOLERANCE / c)``, all ``N_PROBES + n`` of them with that to the power ``N_PROBES + n``: for
  ``c = 0.1`` that is at most ``0.16^4 < 7e-4``, for another checkpoint (``c`` about 1.4) about ``1e-9``;
- a base already truncated moves test 2 by ``s_i``: refused whenever the largest removed singular value exceeds
  ``TOLERANCE * rms(W)`` (when all are smaller, the truncation changed the weight by less than the tolerance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .factors import max_abs_exponent, times_power_of_two

N_PROBES = 4
# In units of rms(W) for the projections and the removed directions, relative for the norm.
TOLERANCE = 0.02


def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """Fingerprint of ``weight`` (out, in): float64 (N_PROBES + 1,) = projections and the Frobenius norm."""
    return _probe(weight, None)[0]


@dataclass(frozen=True)
class BaseDeviation:
    """How far a weight is from the base an adapter was trained on (``base_deviation``).

    Attributes:
        projections: the largest change of a fingerprint projection, in units of ``rms(W)``.
        norm: the relative change of ``||W||_F``.
        removed: the largest ``|u_i^T W v_i - s_i|`` over the removed triplets, in units of ``rms(W)`` (0 if none).
        removed_kept: ``sum_i s_i u_i^T W v_i / sum_i s_i^2``: 1 on the base, 0 on a base already truncated
            (1 when nothing was removed).
    """

    projections: float
    norm: float
    removed: float
    removed_kept: float

    @property
    def matches(self) -> bool:
        """Whether every test is within ``TOLERANCE`` (NaN never matches)."""
        return all(value <= TOLERANCE for value in (self.projections, self.norm, self.removed))

    @property
    def already_truncated(self) -> bool:
        """Whether the weight looks like the base with the removed part already taken out."""
        return not self.matches and abs(self.removed_kept) < 0.5 and self.projections <= TOLERANCE * 10


def base_deviation(
    weight: torch.Tensor, fingerprint: torch.Tensor, removed_left: torch.Tensor, removed_right: torch.Tensor
) -> BaseDeviation:
    """Compare ``weight`` (out, in) with the base described by its saved ``fingerprint`` (N_PROBES + 1,) and the
    removed factors ``removed_left`` (out, n) = ``U_n S_n`` and ``removed_right`` (n, in) = ``V_n^T``.

    Computed on ``weight``'s device in its dtype promoted to at least float32 (rounding errors ~1e-6 of the
    tolerance's scale; float64 where float32 products are set to run at reduced precision): one
    (out, in) x (in, N_PROBES + n) product.
    """
    out_features, in_features = weight.shape
    current, carried = _probe(weight, removed_right)  # carried (out, n): W v_i
    saved = fingerprint.detach().to(torch.float64).cpu()
    norm = max(float(saved[-1]), float(current[-1]))
    rms = norm / math.sqrt(out_features * in_features)
    projections = _relative(float((current[:-1] - saved[:-1]).abs().max()), rms)
    norm_change = _relative(abs(float(current[-1]) - float(saved[-1])), norm)

    left = removed_left.detach().to(carried.device, torch.float64)  # (out, n)
    s = torch.linalg.vector_norm(left, dim=0)  # (n,) the removed singular values
    carried = (left * carried).sum(dim=0)  # (n,) s_i u_i^T W v_i
    kept = s > 0  # a zero singular value has no left direction to test (and removes nothing)
    if not bool(kept.any()):
        return BaseDeviation(projections, norm_change, 0.0, 1.0)
    s, carried = s[kept], carried[kept]
    removed = _relative(float((carried / s - s).abs().max()), rms)
    removed_kept = float(carried.sum() / (s * s).sum())
    return BaseDeviation(projections, norm_change, removed, removed_kept)


def _probe(weight: torch.Tensor, removed_right: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fingerprint of ``weight`` (out, in) and, in the same product, ``W @ removed_right^T`` (out, n) in
    float64 (n = 0 without ``removed_right``).

    ``W`` is scaled by ``2**-e`` first (its largest entry in [0.5, 1)): exact, so the products and the norm cannot
    overflow whatever the entries' size, and the results are the unscaled ones bit for bit (up to entries below
    ``2**-126`` of the largest); the float64 results are scaled back by ``2**e``. Where they do not fit float64
    (entries near float64's largest), they are infinite: ``check_fingerprint`` refuses such a weight."""
    w = weight.detach()
    w = w.to(_compute_dtype(w))
    exponent = max_abs_exponent(w)[1]
    w = times_power_of_two(w, -exponent)
    out_features, in_features = w.shape
    gen = torch.Generator(device="cpu").manual_seed(0x4B615341)  # "KaSA"
    probe_right = torch.randn(in_features, N_PROBES, generator=gen, dtype=torch.float64)
    probe_left = torch.randn(out_features, N_PROBES, generator=gen, dtype=torch.float64).to(w.device)
    columns = probe_right
    if removed_right is not None:
        columns = torch.cat([probe_right, removed_right.detach().to(torch.float64).cpu().T], dim=1)
    products = (w @ columns.to(w.device, w.dtype)).to(torch.float64)  # (out, N_PROBES + n)
    projections = (probe_left * products[:, :N_PROBES]).sum(dim=0) / math.sqrt(out_features * in_features)
    norm = torch.linalg.vector_norm(w).to(torch.float64).reshape(1)
    fingerprint = times_power_of_two(torch.cat([projections, norm]), exponent)
    return fingerprint.cpu(), times_power_of_two(products[:, N_PROBES:], exponent)


def check_fingerprint(fingerprint: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    """Raise ValueError, naming ``what``, if ``fingerprint`` (of a weight of ``shape``) is not finite: the weight's
    Frobenius norm (or a projection) does not fit float64, so an adapter of it could not be saved."""
    if bool(torch.isfinite(fingerprint).all()):
        return
    raise ValueError(
        f"{what}: the fingerprint of this {'x'.join(map(str, shape))} weight does not fit float64 (its Frobenius "
        f"norm exceeds {torch.finfo(torch.float64).max:.3g}), so its adapter could not be saved; scale the weight "
        "down before adapting it"
    )


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """float32 (float64 for float64 weights) when float32 products run at full precision; float64 where they may
    be rounded to TF32 or bf16 (``torch.set_float32_matmul_precision``, ``allow_tf32``), which would eat into the
    tolerance."""
    reduced = torch.get_float32_matmul_precision() != "highest" or (
        weight.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    )
    return torch.float64 if reduced else torch.promote_types(weight.dtype, torch.float32)


def _relative(difference: float, scale: float) -> float:
    """``difference / scale``; an exact match of an all-zero weight is 0, any difference from it is infinite."""
    if scale > 0:
        return difference / scale
    return 0.0 if difference == 0 else math.inf
