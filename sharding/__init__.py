"""Named sharding strategies, one small file each: copy one, edit its tables, add it below."""

from __future__ import annotations

from . import fsdp, replicated, sp, tp, tp_fc2_replicated
from .strategy import (
    ACTIVATIONS, IMG, IMG_ATTN, IMG_HEADS, IMG_MLP, MESH_AXES, TXT, TXT_ATTN, TXT_HEADS, TXT_MLP, Strategy,
)

STRATEGIES: dict[str, Strategy] = {
    m.STRATEGY.name: m.STRATEGY for m in (replicated, tp, tp_fc2_replicated, fsdp, sp)
}


# The layouts the benchmarks compare on 8 devices: every strategy on its own axis, and the ones
# that combine with dp=2 splitting the CFG pair.
EIGHT_DEVICE_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("replicated", "tp=8"),
    ("tp", "tp=8"),
    ("tp_fc2_replicated", "tp=8"),
    ("fsdp", "fsdp=8"),
    ("sp", "sp=8"),
    ("tp", "dp=2,tp=4"),
    ("tp_fc2_replicated", "dp=2,tp=4"),
    ("sp", "dp=2,sp=4"),
)


def get(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown sharding strategy {name!r}; valid: {', '.join(STRATEGIES)}") from None


__all__ = [
    "ACTIVATIONS", "EIGHT_DEVICE_LAYOUTS", "IMG", "IMG_ATTN", "IMG_HEADS", "IMG_MLP", "MESH_AXES", "STRATEGIES", "TXT", "TXT_ATTN", "TXT_HEADS",
    "TXT_MLP", "Strategy", "get",
]
