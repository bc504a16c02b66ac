"""Seeded random weights at the scales of a trained model.

The official initialisation zeroes every modulation and output layer, and small uniform
noise leaves q/k norm gains near 0: either makes a model whose output ignores most of its
inputs, so tests pass that should not. These scales keep every path live (see
ARCHITECTURE.md, testing notes): a wrong RoPE, mask or token order moves the output by 1e-3+.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn


def trained_scale_values(module: nn.Module, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float32 value) for every parameter in order, one at a time; works on meta modules.

    Matrices and kernels ~ N(0, 1/fan_in); embedding tables ~ 0.5 N(0, 1); 1-D gains
    ("weight") ~ 1 + 0.2 N(0, 1); biases ~ 0.1 N(0, 1).
    """
    gen = torch.Generator().manual_seed(seed)
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if id(p) in embeddings:
            yield name, 0.5 * noise
        elif p.ndim >= 2:
            yield name, noise / p[0].numel() ** 0.5
        elif name.endswith("bias"):
            yield name, 0.1 * noise
        else:
            yield name, 1.0 + 0.2 * noise


@torch.no_grad()
def randomize_like_trained_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter in place with ``trained_scale_values``. Works on any module, so the
    diffusers reference model can be filled by the same rule."""
    params = dict(module.named_parameters())
    for name, value in trained_scale_values(module, seed):
        params[name].copy_(value.to(params[name].dtype))
    return module
