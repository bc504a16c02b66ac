"""Shifted flow-matching Euler schedule (the official FlowMatchDiscreteScheduler), as pure functions.

sigma goes from 1 (noise) to 0 (data) in ``num_steps`` Euler steps; the shift
``s * sigma / (1 + (s - 1) * sigma)`` spends more steps at high noise.
"""

from __future__ import annotations

import numpy as np


def sigmas(num_steps: int, shift: float) -> np.ndarray:
    """The ``num_steps + 1`` shifted sigmas, float32, from 1 down to 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigma = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float32)
    shift = np.float32(shift)
    return (shift * sigma / (1 + (shift - 1) * sigma)).astype(np.float32)


def timesteps(sig: np.ndarray) -> np.ndarray:
    """Model timesteps for each step: ``sigmas[:-1] * 1000`` in float32."""
    return (sig[:-1] * np.float32(1000)).astype(np.float32)


def euler_step(latents, velocity, sigma, sigma_next):
    """One Euler step ``x + v * (sigma_next - sigma)``; works on numpy and jax arrays alike."""
    return latents + velocity * (sigma_next - sigma)
