"""Projecting a compiled step onto an accelerator we do not have: chip specs and a roofline.

XLA's cost analysis of the reference attention counts the (L, S) score matrix as memory
traffic and temporary memory, which a flash kernel never writes to HBM (at 720p x 121 frames
that is hundreds of GB); a blockwise loop instead is counted as one iteration. So projections
compile the step with ``attention_stand_in`` (same inputs and output, the HBM traffic of a
flash kernel: read q, k, v once, write the output once) and add the attention FLOPs from
``attention_flops``.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # bf16 matmul FLOP/s
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s one chip can send (half the bidirectional figure)


# Cloud TPU v6e (Trillium) published figures: 918 TFLOP/s bf16, 32 GB HBM at 1,638 GB/s,
# 800 GB/s bidirectional ICI per chip (4 ports).
CHIPS = {"v6e": Chip("TPU v6e", 918e12, 32e9, 1.638e12, 400e9)}


def attention_stand_in(q: jax.Array, k: jax.Array, v: jax.Array, key_mask, scale: float) -> jax.Array:
    """Not attention: a kernel with attention's shapes and a flash kernel's HBM traffic, for
    cost and memory analysis only (its FLOPs are negligible; add ``attention_flops``)."""
    return q + k + v


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> float:
    """FLOPs of softmax attention: QK^T and PV, 2 FLOPs per multiply-add each."""
    return 4.0 * batch * heads * q_len * kv_len * head_dim


@dataclasses.dataclass(frozen=True)
class Roofline:
    compute_s: float
    memory_s: float
    comm_s: float

    @property
    def step_s(self) -> float:
        """max(compute, memory) + communication: collectives not overlapped (an upper estimate)."""
        return max(self.compute_s, self.memory_s) + self.comm_s

    @property
    def overlapped_s(self) -> float:
        """max of the three: collectives fully hidden behind compute (a lower estimate)."""
        return max(self.compute_s, self.memory_s, self.comm_s)


def roofline(flops: float, hbm_bytes: float, wire_bytes: float, chip: Chip) -> Roofline:
    """Per-chip time for a step that does ``flops``, moves ``hbm_bytes`` through HBM and sends
    ``wire_bytes`` over ICI, at the chip's peak rates."""
    return Roofline(flops / chip.peak_flops, hbm_bytes / chip.hbm_bandwidth, wire_bytes / chip.ici_bandwidth)
