"""A cheap, hardware-independent fingerprint of a base weight.

A hash of the bytes would be exact but costs a full pass over every weight at load time, and breaks when the
same model is loaded in another dtype. A handful of fixed random projections in float64 (one mat-vec per probe)
separates different checkpoints by O(1) relative differences while agreeing to ~1e-7 across hardware and to
~1e-3 across fp32/bf16 copies of the same weights.
"""

from __future__ import annotations

import torch

N_PROBES = 4
# Relative tolerance when comparing fingerprints: above bf16/fp16 re-rounding of the same weights (whose
# projections agree to ~eps / sqrt(n)), far below the difference between two checkpoints.
RTOL = 2e-3


def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """Fingerprint of ``weight`` (out, in): float64 (N_PROBES + 1,) = projections and the Frobenius norm."""
    w = weight.detach().to(torch.float64)
    out_features, in_features = w.shape
    gen = torch.Generator(device="cpu").manual_seed(0x4B615341)  # "KaSA"
    right = torch.randn(in_features, N_PROBES, generator=gen, dtype=torch.float64).to(w.device)
    left = torch.randn(out_features, N_PROBES, generator=gen, dtype=torch.float64).to(w.device)
    projections = (left * (w @ right)).sum(dim=0) / (out_features * in_features) ** 0.5  # (N_PROBES,)
    return torch.cat([projections, torch.linalg.matrix_norm(w).reshape(1)]).cpu()


def fingerprints_match(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two fingerprints come from the same weights (up to dtype re-rounding)."""
    if a.shape != b.shape:
        return False
    a, b = a.to(torch.float64), b.to(torch.float64)
    scale = max(float(a[-1]), float(b[-1]), 1e-30)  # the Frobenius norm bounds every projection
    return float((a - b).abs().max()) <= RTOL * scale
