"""Named sharding strategies, one small file each: copy one, edit its tables, add it below."""

from __future__ import annotations

from . import fsdp, replicated, sp, tp, tp_fc2_replicated
from .strategy import (
    ACTIVATIONS, IMG, IMG_ATTN, IMG_HEADS, IMG_MLP, MESH_AXES, TXT, TXT_ATTN, TXT_HEADS, TXT_MLP, Strategy,
)

STRATEGIES: dict[str, Strategy] = {
    m.STRATEGY.name: m.STRATEGY for m in (replicated, tp, tp_fc2_replicated, fsdp, sp)
}


def get(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown sharding strategy {name!r}; valid: {', '.join(STRATEGIES)}") from None


__all__ = [
    "ACTIVATIONS", "IMG", "IMG_ATTN", "IMG_HEADS", "IMG_MLP", "MESH_AXES", "STRATEGIES", "TXT", "TXT_ATTN", "TXT_HEADS",
    "TXT_MLP", "Strategy", "get",
]
