"""Numerical comparison of outputs (parity tests, cache drift)."""

from __future__ import annotations

import numpy as np
import torch


def _as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("non-finite values in a compared tensor")
    return arr


def rel_l2(x, reference) -> float:
    """||x - reference|| / ||reference|| in float64; raises on NaN/inf, which would otherwise compare as passing."""
    a, b = _as_f64(x), _as_f64(reference)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
