"""Projecting a compiled step onto an accelerator we do not have: chip specs and a roofline.

XLA's cost analysis of the reference attention counts the (L, S) score matrix as memory
traffic and temporary memory, which a flash kernel never writes to HBM (at 720p x 121 frames
that is hundreds of GB); a blockwise loop instead is counted as one iteration. So projections
compile the step with ``attention_stand_in`` (same inputs and output, the HBM traffic of a
flash kernel: read q, k, v once, write the output once) and add the attention FLOPs from
``attention_flops``.

``project_step`` is that compile for one denoising step, shared by the projections in
``benchmarks/``. It runs on XLA's CPU backend in float32: that backend has no bf16 matmul and
would insert float32 copies of every weight (temporaries a TPU never makes). Weights are counted
at their bf16 size exactly (from the sharding tables); activation memory, HBM traffic and
collective bytes are the float32 figures halved, as the chip holds them in bf16 (the few float32
pieces, norm statistics, RoPE tables and the latents, are small).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import hlo, parallel, pipeline
from .cache import FeatureCache
from .config import DiTConfig
from .model import loop_blocks
from .runtime import tracing
from .super_resolution import SR_VERSIONS, sr_conditions
from .synthetic import full_text_conditions, stage1_embeddings

BF16 = 2  # bytes per value on the chip


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

    def cells(self) -> str:
        """The benchmarks' table cells: compute | memory | comm | upper (lower) seconds."""
        return (f"{self.compute_s:.2f} | {self.memory_s:.2f} | {self.comm_s:.2f} | {self.step_s:.2f} "
                f"({self.overlapped_s:.2f})")


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


# ---- one denoising step, compiled abstractly ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepProjection:
    """One chip's share of one denoising step (``project_step``), in bf16."""

    weights_bytes: float  # exact, from the sharding tables
    args_bytes: float  # the weights and the step's other arguments (conditions, latents)
    temp_bytes: float  # activations and every other temporary XLA allocates
    output_bytes: float  # the new latents (float32 on the chip too)
    compiled_flops: float  # XLA's count: everything but attention
    attention_flops: float  # added analytically (the stand-ins compute nothing)
    hbm_bytes: float  # XLA's bytes accessed, plus the attention kernels' K/V re-reads
    kv_bytes: float  # of them the K/V re-reads
    wire_bytes: float  # sent over ICI
    collectives: dict[str, tuple[int, float]]  # kind -> (count, result bytes)
    roofline: Roofline
    compile_s: float  # on this machine

    @property
    def need_bytes(self) -> float:
        """HBM the step needs on one chip: arguments, temporaries and output."""
        return self.args_bytes + self.temp_bytes + self.output_bytes

    @property
    def flops(self) -> float:
        return self.compiled_flops + self.attention_flops

    def fits(self, chip: Chip) -> bool:
        return self.need_bytes <= chip.hbm_bytes


def collective_summary(compiled, scale: float = 1.0) -> tuple[dict[str, tuple[int, float]], float]:
    """(kind -> (count, result bytes), bytes one device sends) of a compiled program's
    collectives, sizes multiplied by ``scale``."""
    ops = hlo.collectives(compiled.as_text())
    kinds = {kind: (count, scale * nbytes) for kind, (count, nbytes) in hlo.summary(ops).items()}
    return kinds, scale * sum(op.wire_bytes for op in ops)


def describe_collectives(kinds: dict[str, tuple[int, float]], digits: int = 1) -> str:
    """'kind count (result MiB), ...' for the kinds that occur."""
    parts = [f"{kind} {count} ({nbytes / 2**20:.{digits}f} MiB)" for kind, (count, nbytes) in kinds.items() if count]
    return ", ".join(parts) or "none"


def padded_tokens(shape: tuple[int, int, int], placement: parallel.Placement) -> int:
    """Image tokens of a latent canvas after the strategy's padding (to a multiple of the axes
    that split the sequence): what attention runs over."""
    tokens = math.prod(shape)
    return tokens + -tokens % placement.execution.token_multiple


def dense_attention_flops(config: DiTConfig, batch: int, image_tokens: int, llm_tokens: int,
                          byt5_tokens: int) -> float:
    """Attention FLOPs of one dense forward, all chips: each double block over the image tokens
    and every text slot, each refiner block over the LLM slots."""
    joint = image_tokens + llm_tokens + byt5_tokens
    return (config.mm_double_blocks_depth * attention_flops(batch, config.heads_num, joint, joint, config.head_dim)
            + config.refiner_depth * attention_flops(batch, config.heads_num, llm_tokens, llm_tokens,
                                                     config.head_dim))


def project_step(
    config: DiTConfig,
    placement: parallel.Placement,
    shape: tuple[int, int, int],
    conditions: dict[str, np.ndarray],
    settings: pipeline.SamplingSettings,
    chip: Chip,
    *,
    attention_flops: float,
    kv_bytes: float = 0.0,
    attention: Callable = attention_stand_in,
    sparse_attention: Callable | None = None,
    cache: FeatureCache | None = None,
    cached: bool = False,
) -> StepProjection:
    """One denoising step of ``config`` on a (T, H, W) latent canvas, laid out by ``placement``,
    with the host ``conditions`` (``pipeline.build_conditions``'s; SR adds ``lr_latents``) and
    ``settings``, lowered with abstract shapes (no weights are made), compiled, and put on ``chip``.

    ``attention`` (and ``sparse_attention``) are the stand-in kernels it is traced with;
    ``attention_flops`` and ``kv_bytes`` (the kernels' K/V re-reads the stand-ins leave out) are
    the whole step's, all chips: attention is split by batch over dp and by heads over every other
    axis, so each chip does 1 / mesh size of it. With a ``cache`` it is that cache's full step, or
    its ``cached`` step, given the state as the full step leaves it.
    """
    dtype = jnp.float32  # see the module docstring: halved to bf16 in _on_chip
    shardings, shapes = placement.params, parallel.param_shapes(config)
    params = {k: jax.ShapeDtypeStruct(s, dtype, sharding=shardings[k]) for k, s in shapes.items()}
    host = pipeline.device_conditions(conditions, settings, dtype)
    conds = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=placement.replicated)
             for k, v in host.items()}
    latents = jax.ShapeDtypeStruct((1, pipeline.LATENT_CHANNELS, *shape), jnp.float32, sharding=placement.replicated)
    kernels = (attention,) if sparse_attention is None else (attention, sparse_attention)
    begin = time.perf_counter()
    args = [params, conds, latents, 0]
    with tracing(placement.mesh, *kernels):
        if cache is not None:
            img = pipeline.image_stream(config, settings, placement, shape, dtype)
            args.append(pipeline.abstract_state(cache, cache.initial(img), placement))
            if cached:  # the state's shapes from the full step, traced (not compiled) with the blocks scanned
                full = pipeline.step_function(config, settings, dtype, placement=placement, cache=cache)
                args[-1] = pipeline.abstract_state(cache, jax.eval_shape(full, *args)[1], placement)
        # the blocks unrolled (and the weights per layer): XLA's cost analysis counts a loop body
        # once, so the scanned step would show one block's FLOPs and bytes
        compiled = pipeline.step_function(config, settings, dtype, placement=placement, cache=cache, cached=cached,
                                          run_blocks=loop_blocks).lower(*args).compile()
    return _on_chip(compiled, placement, shapes, chip, attention_flops, kv_bytes, time.perf_counter() - begin)


def _on_chip(compiled, placement: parallel.Placement, shapes: dict[str, tuple[int, ...]], chip: Chip,
             attention_flops: float, kv_bytes: float, compile_s: float) -> StepProjection:
    """The compiled float32 step's cost and memory, in bf16 per chip, with attention added."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    weights = parallel.weight_bytes(placement, shapes, BF16)
    other_args = memory.argument_size_in_bytes - 2 * weights  # conditions, latents (float32 here)
    split = placement.mesh.size
    kinds, wire = collective_summary(compiled, scale=0.5)
    flops = cost["flops"] + attention_flops / split
    hbm = cost["bytes accessed"] / 2 + kv_bytes / split
    return StepProjection(
        weights_bytes=weights, args_bytes=weights + other_args / 2, temp_bytes=memory.temp_size_in_bytes / 2,
        output_bytes=memory.output_size_in_bytes, compiled_flops=cost["flops"], attention_flops=attention_flops / split,
        hbm_bytes=hbm, kv_bytes=kv_bytes / split, wire_bytes=wire, collectives=kinds,
        roofline=roofline(flops, hbm, wire, chip), compile_s=compile_s)


# ---- what a preset's step is given --------------------------------------------------------------

def preset_step(preset: str, shape: tuple[int, int, int], llm_tokens: int,
                byt5_tokens: int) -> tuple[DiTConfig, dict[str, np.ndarray], pipeline.SamplingSettings]:
    """(config, host conditions, settings) of one t2v step of ``preset`` with exactly
    ``llm_tokens`` + ``byt5_tokens`` text slots, every one valid. A super-resolution preset gets
    its own sampling (guidance 1: no CFG, batch 1) and its LR condition (``lr_latents``, zeros:
    only shapes matter); any other preset 50 steps with CFG (batch 2), whether or not distilled,
    so that the projections compare layouts at one batch."""
    config = DiTConfig.preset(preset)
    if preset not in SR_VERSIONS:
        return (config, full_text_conditions(config, shape, llm_tokens, byt5_tokens),
                pipeline.SamplingSettings(num_inference_steps=50, guidance_scale=6.0))
    emb = {k: v.numpy() for k, v in stage1_embeddings(
        config, latent_hw=shape[1:], text_len=llm_tokens, byt5_len=byt5_tokens).items()}
    emb["prompt_mask"][:], emb["prompt_mask_2"][:] = 1, 1
    lq = np.zeros((1, pipeline.LATENT_CHANNELS, *shape), np.float32)
    settings = SR_VERSIONS[preset].sampling
    return config, sr_conditions(emb, lq, task="t2v", cfg=settings.cfg, model=config), settings
