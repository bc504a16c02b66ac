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

from .config import DiTConfig


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


def dit_forward_flops(
    config: DiTConfig, batch: int, image_tokens: int, text_tokens: int, byt5_tokens: int, vision_tokens: int = 0
) -> float:
    """FLOPs of one DiT forward (2 per multiply-add; norms, activations and softmax not counted).

    With C hidden, F MLP width, L image tokens and S = text + ByT5 + vision slots, each double
    block does 2 (L + S)(4C^2 + 2CF) for q/k/v/proj and the MLPs, 4 N (L + S)^2 D for joint
    attention, and 2 x 2 x 6C^2 per sample for the two modulations; around the blocks come the
    patch embedding, the token refiner (its own attention over the text), the ByT5 and vision
    projections and the final layer.
    """
    c, f, n, d = config.hidden_size, config.mlp_hidden_dim, config.heads_num, config.head_dim
    joint = image_tokens + text_tokens + byt5_tokens + vision_tokens
    blocks = config.mm_double_blocks_depth * (
        2 * joint * (4 * c * c + 2 * c * f) + 4 * n * joint * joint * d + 2 * 2 * 6 * c * c
    )
    timesteps = (2 if config.use_meanflow else 1) * 2 * (256 * c + c * c)
    refiner = (
        2 * text_tokens * config.text_states_dim * c  # input_embedder
        + 2 * (config.text_states_dim * c + c * c) + 2 * (256 * c + c * c)  # pooled text and t embedders
        + config.refiner_depth * (2 * text_tokens * (4 * c * c + 8 * c * c) + 4 * n * text_tokens ** 2 * d
                                  + 2 * 2 * c * c)
    )
    h = config.byt5_hidden_dim
    byt5 = 2 * byt5_tokens * (config.byt5_states_dim * h + h * h + h * c)
    vision = 2 * vision_tokens * (config.vision_states_dim ** 2 + config.vision_states_dim * c)
    patch = 2 * image_tokens * config.img_in_channels * c
    final = 2 * 2 * c * c + 2 * image_tokens * c * config.out_channels
    return float(batch * (blocks + timesteps + refiner + byt5 + vision + patch + final))
