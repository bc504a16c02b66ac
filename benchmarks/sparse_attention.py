"""SSTA sparse attention: how sparse the official mask is, what a kernel pays for it, how far it moves the DiT.

    python benchmarks/sparse_attention.py mask                  # 720p x 121 / 241 frames; v6e-8 projection
    python benchmarks/sparse_attention.py mask --no_project     # the mask and FLOP tables only (seconds)
    python benchmarks/sparse_attention.py cpu --repeats 5       # one layer's attention on this CPU
    python benchmarks/sparse_attention.py cpu --topk 8 --window 1 3 3 --pallas
    python benchmarks/sparse_attention.py drift                 # whole DiT, SSTA against dense, eager float32

``mask`` needs no weights. Per canvas (720p, 31x45x80 and 61x45x80 latents) it prints the official
plan (``ssta.plan``: tiles, top-k after the halving rule at <= 31 latent frames, the list width K),
the window blocks per query tile, and the share of image key blocks a query tile attends: an upper
bound (window + top-k, as if they never overlapped) and the share the real selection code
(``ssta.top_blocks`` | ``ssta.window_mask``) gives on seeded random q/k: i.i.d. tokens (top-k
blind to position) and a spatially smooth random field shared by q and k (neighbouring tiles
alike, so top-k picks near tiles, inside the window). Random q/k are not a trained model's; where
its top-k overlaps its window more than chance, its share is below the upper bound. Then the
attention FLOPs of one forward of the 54-block, 16-head, head-dim-128 model (4 D per query-key
pair: image rows attend their listed blocks, bs^2 pairs each; text rows attend every image token,
canvas padding included, and the live text; dense: (L+S)^2), and the step time projected onto
v6e-8 (``--project``) for ``720p_t2v_distilled_sparse`` (no CFG: batch 1, the official 1985 text
slots) beside dense ``720p_t2v`` with CFG (batch 2) and dense ``720p_t2v_distilled`` (batch 1),
both with the text trimmed to the valid slots, per sharding strategy.

The projection is ``sharding_strategies.py --project``'s (``projection.project_step``): each step is
compiled abstractly in float32 on 8 virtual CPU devices with the blocks unrolled, XLA's cost
analysis gives the FLOPs and HBM bytes (halved to bf16) and the HLO the collectives, and attention
is compiled as a stand-in with a flash kernel's traffic (q, k, v read once, the output written
once) whose FLOPs are added analytically. The sparse step is compiled as the sparse model: the
selection (block means, scores, top-k, block lists), the tiling and the text rows' dense attention
are in the compiled program; only the block-sparse kernel is a stand-in (``sparse_stand_in``), and
its FLOPs are the listed blocks' (``--share``: the upper bound by default, i.e. every listed
block computed, as the Pallas kernel does). Added to both sides: the attention kernels' own HBM
reads of K and V, which the stand-in counts once: splash (dense) reads every key block once per
3072-row query block; the SSTA Pallas kernel (one 384-row query tile per grid row) reads each listed
K/V block once per query tile, an arithmetic intensity of bs FLOP per byte in bf16 (384 < v6e's
918e12 / 1.638e12 = 560), so it is bound by HBM, not the MXU. A note under the table counts the
Pallas kernel's grid steps, whose fixed per-step cost the roofline leaves out. Everything in the
projection is computed, nothing is measured on a TPU.

``cpu`` times one layer's image-row attention on this CPU (jitted, median of --repeats after a
warm-up): the portable block-sparse kernel (``attention.block_sparse_xla``) against dense
``attention.xla_attention`` over the same tiled sequence, their compiled temporary memory, and the
sparse kernel's relative L2 error against dense attention under the block mask expanded to tokens
(float32). ``--pallas`` adds the Pallas kernel in interpret mode (slow; a correctness check off
TPU, not a timing).

``drift`` runs the whole DiT (a widened tiny config, trained-scale random weights) eagerly in
float32 with SSTA and with the same weights dense (``config.dense()``) on a canvas where the mask
is really sparse, and prints their relative L2 per setting. The control row has a window that
covers every tile: it differs from dense only where SSTA follows the official kernel (zero
canvas padding attended, the padded text slots of the last live text block attended).
"""

from __future__ import annotations

import timing

THREADS = timing.pin_threads(timing.threads_flag())

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sharding  # noqa: E402
from hunyuan_tpu import attention, parallel, pipeline, projection, ssta  # noqa: E402
from hunyuan_tpu.config import SPARSE_ATTN_MODE, DiTConfig, SparseAttention, widened_tiny  # noqa: E402
from hunyuan_tpu.metrics import rel_l2  # noqa: E402
from hunyuan_tpu.model import Execution, HunyuanVideo15DiT  # noqa: E402
from hunyuan_tpu.random_init import randomize_like_trained_  # noqa: E402
from hunyuan_tpu.synthetic import random_inputs, stage1_embeddings  # noqa: E402

# the official text slots of a sparse model: 729 vision (masked in t2v) + 256 ByT5 + 1000 LLM
VISION_SLOTS, BYT5_SLOTS, LLM_SLOTS = 729, 256, 1000
TEXT_SLOTS = VISION_SLOTS + BYT5_SLOTS + LLM_SLOTS
LAYOUTS = sharding.EIGHT_DEVICE_LAYOUTS
SPLASH_BLOCK_Q, SPLASH_BLOCK_KV = attention.SPLASH_BLOCK_Q, attention.SPLASH_BLOCK_KV
BF16 = 2  # bytes


def machine() -> str:
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, "
            f"{jax.device_count()} {jax.default_backend()} device(s), jax {jax.__version__}, "
            f"torch {torch.__version__}; "
            f"{datetime.date.today()}")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---- the mask ----------------------------------------------------------------------------------------

def random_qk(grid: tuple[int, int, int], heads: int, head_dim: int, kind: str, seed: int,
              correlation: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (1, L, N, D) float32 q and k in t-major token order: i.i.d. normal ("iid"), or
    ("smooth") one random field varying over ``correlation`` latents, shared by q and k, plus as
    much i.i.d. noise each (so a query tile resembles the key tiles near it, as in real video)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, math.prod(grid), heads, head_dim, generator=g) for _ in range(2))
    if kind == "smooth":
        coarse = tuple(max(2, math.ceil(n / correlation) + 1) for n in grid)
        field = torch.randn(1, heads * head_dim, *coarse, generator=g)
        field = F.interpolate(field, size=grid, mode="trilinear", align_corners=True)
        field = (field / field.std()).reshape(heads, head_dim, -1).permute(2, 0, 1)[None]
        q, k = q + field, k + field
    return q, k


def image_selection(p: ssta.Plan, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, N or 1, n, n) bool: the image blocks each query tile attends (top-k | window)."""
    top = ssta.top_blocks(ssta.to_tiles(q, p), ssta.to_tiles(k, p), p)
    return top | torch.as_tensor(ssta.window_mask(p))


@dataclasses.dataclass(frozen=True)
class Canvas:
    """SSTA on one canvas with the official text slots, and the blocks its image rows attend."""

    frames: int
    plan: ssta.Plan
    text_slots: int
    live: int  # text blocks attended
    width: int  # K
    window: np.ndarray  # (n,) window blocks per row
    image_blocks: dict[str, float]  # "upper" / "iid" / "smooth" -> mean image blocks per row

    @property
    def n(self) -> int:
        return self.plan.image_blocks

    def share(self, kind: str) -> float:
        return self.image_blocks[kind] / self.n


def canvas(param: SparseAttention, frames: int, resolution: str, aspect_ratio: str, text_slots: int,
           text_valid: int, heads: int, seed: int) -> Canvas:
    height, width = pipeline.bucket_size(resolution, aspect_ratio)
    grid = pipeline.latent_shape(frames, height, width)
    p = ssta.plan(param, grid)
    window = ssta.window_mask(p)
    rows = window.sum(-1)
    text_mask = (torch.arange(text_slots) < text_valid)[None]
    live = int(ssta.live_text_blocks(text_mask, p)[0])
    blocks = {"upper": float(np.minimum(rows + p.topk, p.image_blocks).mean())}
    for kind in ("iid", "smooth"):
        q, k = random_qk(grid, heads, 128, kind, seed)
        blocks[kind] = float(image_selection(p, q, k).sum(-1).float().mean())
    return Canvas(frames, p, text_slots, live, ssta.list_width(p, p.text_blocks(text_slots)), rows, blocks)


def sparse_pairs(c: Canvas, kind: str, kernel: str = "pallas") -> float:
    """Query-key pairs one head of one sample computes in a sparse layer: image rows over their
    listed blocks ("pallas": the listed ones; "xla": all K entries, listed or not), text rows
    over the whole tiled canvas and the live text."""
    bs = c.plan.block_size
    per_row = c.width if kernel == "xla" else c.image_blocks[kind] + c.live
    return c.n * per_row * bs * bs + c.text_slots * (c.n + c.live) * bs


def dense_pairs(tokens: int, text: int) -> float:
    return float(tokens + text) ** 2


def sparse_kv_bytes(c: Canvas, kind: str) -> float:
    """HBM bytes one head of one sample reads for K and V in the Pallas kernel (each listed block
    once per query tile, bf16) and in the text rows' dense kernel (the keys once)."""
    bs, d = c.plan.block_size, 128
    return (c.n * (c.image_blocks[kind] + c.live) * bs + (c.n + c.live) * bs) * d * 2 * BF16


def splash_kv_bytes(q_len: int, kv_len: int) -> float:
    """HBM bytes one head of one sample reads for K and V in splash attention: all keys once per
    query block (the repository's default blocks), bf16."""
    block_q = min(SPLASH_BLOCK_Q, -(-q_len // 128) * 128)
    block_kv = min(SPLASH_BLOCK_KV, -(-kv_len // 128) * 128)
    return -(-q_len // block_q) * (-(-kv_len // block_kv) * block_kv) * 128 * 2 * BF16


def mask_report(args) -> list[Canvas]:
    param = SparseAttention()
    print(f"SSTA: default attn_param (tile {list(param.tile_size)}, window {list(param.win_size)}, ssta_topk "
          f"{param.ssta_topk}, lambda {param.ssta_lambda}, win_type {param.win_type}); {args.resolution} "
          f"{args.aspect_ratio}; text slots {args.text_slots} ({VISION_SLOTS} vision + {BYT5_SLOTS} ByT5 + "
          f"{LLM_SLOTS} LLM), {args.text_valid} valid; random q/k for the selection: {args.heads} heads, head dim "
          f"128, seed {args.seed}. {machine()}; load average {load()}\n")
    canvases = [canvas(param, f, args.resolution, args.aspect_ratio, args.text_slots, args.text_valid, args.heads,
                       args.seed) for f in args.frames]
    print("| frames | latents | tiles | image blocks n | block size | text blocks (live) | top-k | K (list width) | "
          "window blocks/row mean (min-max) | image blocks/row: upper bound | i.i.d. q/k | smooth q/k | "
          "share of image blocks: upper bound | i.i.d. | smooth |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for c in canvases:
        p = c.plan
        print(f"| {c.frames} | {'x'.join(map(str, p.grid))} | {'x'.join(map(str, p.tiles))} | {c.n} | "
              f"{p.block_size} | {p.text_blocks(c.text_slots)} ({c.live}) | {p.topk} (of {p.param.ssta_topk}) | "
              f"{c.width} | {c.window.mean():.1f} ({c.window.min()}-{c.window.max()}) | "
              f"{c.image_blocks['upper']:.1f} | {c.image_blocks['iid']:.1f} | {c.image_blocks['smooth']:.1f} | "
              f"{c.share('upper'):.3f} | {c.share('iid'):.3f} | {c.share('smooth'):.3f} |")

    cfg = DiTConfig.preset("720p_t2v_distilled_sparse")
    depth, heads, d = cfg.mm_double_blocks_depth, cfg.heads_num, cfg.head_dim
    dense_at = [i for i in range(depth) if dataclasses.replace(param, win_type="hybrid").dense_at(i, depth)]
    print(f"\nAttention FLOPs of one forward, batch 1, {depth} double blocks x {heads} heads x head dim {d} "
          f"(4 D per query-key pair; the refiner's attention, the same either way, left out). Dense over the "
          f"{args.text_slots} slots is what the sparse model's hybrid dense blocks do; dense over {args.text_valid} "
          f"slots is a dense checkpoint's (text trimmed to the valid slots). SSTA: image rows over their listed "
          f"blocks (the Pallas kernel skips entries past a row's count; the portable XLA kernel computes all K), "
          f"text rows over the tiled canvas and the live text. Hybrid: win_type hybrid, win_ratio "
          f"{param.win_ratio}: blocks {dense_at} dense.\n")
    print("| frames | dense, L+S TFLOP | dense, L+valid TFLOP | SSTA upper bound TFLOP (/ dense L+S) | "
          "SSTA i.i.d. q/k | SSTA smooth q/k | portable XLA kernel (K per row) | hybrid, upper bound |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    flop = 4 * d * heads * depth / 1e12
    for c in canvases:
        tokens = math.prod(c.plan.grid)
        dense = dense_pairs(tokens, c.text_slots) * flop
        cells = [f"{sparse_pairs(c, kind) * flop:.0f} ({sparse_pairs(c, kind) * flop / dense:.3f})"
                 for kind in ("upper", "iid", "smooth")]
        xla = sparse_pairs(c, "upper", "xla") * flop
        hybrid = ((depth - len(dense_at)) * sparse_pairs(c, "upper") + len(dense_at) * dense_pairs(tokens, c.text_slots)
                  ) * flop / depth
        print(f"| {c.frames} | {dense:.0f} | {dense_pairs(tokens, args.text_valid) * flop:.0f} | {' | '.join(cells)} | "
              f"{xla:.0f} ({xla / dense:.3f}) | {hybrid:.0f} ({hybrid / dense:.3f}) |")
    return canvases


# ---- the v6e projection ----------------------------------------------------------------------------

def dense_stand_in(q, k, v, key_mask, scale):
    """``projection.attention_stand_in``, and for queries and keys of different lengths (SSTA's
    text rows: 1985 queries over the tiled canvas) the traffic of reading k and v once."""
    if q.shape == k.shape:
        return projection.attention_stand_in(q, k, v, key_mask, scale)
    return q + k.sum(2, keepdims=True) + v.sum(2, keepdims=True)


def sparse_stand_in(q, k, v, kv_blocks, kv_counts, block_size, scale):
    """Not attention: the block-sparse kernel's shapes and the traffic of reading q and the image
    part of k and v once, writing the output once (add the FLOPs and the K/V re-reads analytically).
    It reads the block lists, so the selection that makes them stays in the compiled program."""
    length = q.shape[2]
    keep = (kv_blocks.max() + kv_counts.max()).astype(q.dtype) * 0
    return q + k[:, :, :length] + v[:, :, :length] + keep


def conditions_for(cfg: DiTConfig, shape, *, sparse: bool, llm_valid: int, byt5_valid: int, cfg_batch: bool):
    """Stage-1-like embeddings with ``llm_valid`` + ``byt5_valid`` valid slots: a sparse model gets the
    official padded slots (and the masked t2v vision tokens), a dense one the valid ones (trimmed)."""
    if sparse:
        emb = stage1_embeddings(cfg, latent_hw=shape[1:], text_len=LLM_SLOTS, byt5_len=BYT5_SLOTS)
    else:
        emb = stage1_embeddings(cfg, latent_hw=shape[1:], text_len=llm_valid, byt5_len=max(byt5_valid, 1))
    emb = {k: v.numpy() for k, v in emb.items()}
    for prefix in ("", "negative_"):
        emb[prefix + "prompt_mask"][:] = np.arange(emb[prefix + "prompt_mask"].shape[1]) < llm_valid
        emb[prefix + "prompt_mask_2"][:] = np.arange(emb[prefix + "prompt_mask_2"].shape[1]) < byt5_valid
    return pipeline.build_conditions(emb, task="t2v", shape=shape, cfg=cfg_batch, model=cfg)


def project_report(args, canvases: list[Canvas]) -> None:
    chip = projection.CHIPS[args.project.split("-")[0]]
    devices = int(args.project.split("-")[1])
    if devices != jax.device_count():
        raise SystemExit(f"--project {args.project} needs {devices} devices; set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}")
    byt5_valid = min(args.byt5_valid, args.text_valid - 1)
    llm_valid = args.text_valid - byt5_valid
    models = [("720p_t2v", False, True), ("720p_t2v_distilled", False, False),
              ("720p_t2v_distilled_sparse", True, False)]
    layouts = [layout for layout in LAYOUTS if args.layout is None or f"{layout[0]}:{layout[1]}" in args.layout]
    print(f"\nProjected on {args.project} ({chip.name}: {chip.peak_flops / 1e12:.0f} TFLOP/s, "
          f"{chip.hbm_bytes / 1e9:.0f} "
          f"GB HBM at {chip.hbm_bandwidth / 1e12:.2f} TB/s, {chip.ici_bandwidth / 1e9:.0f} GB/s ICI out per chip), "
          f"not measured: one denoising step, bf16, {args.resolution} {args.aspect_ratio}. Dense models: text trimmed "
          f"to the {args.text_valid} valid slots ({llm_valid} LLM + {byt5_valid} ByT5), attention 4 B N (L+S)^2 D "
          f"per block. SSTA: {args.text_slots} slots ({args.text_valid} valid), fixed window, image rows at the "
          f"'{args.share}' share of the table above, text rows dense over canvas and live text. KV GB: the "
          f"attention kernels' K/V reads (splash: once per {SPLASH_BLOCK_Q}-row query block; SSTA Pallas: each "
          f"listed block once per query tile), added to the compiled step's HBM bytes (where the stand-ins count "
          f"q, k, v once). step s = max(compute, memory) + ICI (overlapped: the max of the three). dp=2 needs "
          f"CFG's batch of 2.\n")
    print("| frames | strategy | mesh | model | batch | HBM need GB/chip | TFLOP/chip (attention) | HBM GB/chip (of it "
          "KV) | ICI GB/chip | compute s | memory s | ICI s | step s (overlapped) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for c in canvases:
        if c.frames not in args.project_frames:
            continue
        shape = c.plan.grid
        for name, mesh_spec in layouts:
            for preset, sparse, cfg_batch in models:
                if preset not in args.models:
                    continue
                cfg = DiTConfig.preset(preset)
                batch = 2 if cfg_batch else 1
                settings = pipeline.SamplingSettings(num_inference_steps=50, guidance_scale=6.0 if cfg_batch else 1.0)
                prefix = f"| {c.frames} | {name} | {mesh_spec} | {preset} | {batch} |"
                try:
                    placement = parallel.placement(cfg, name, mesh_spec, batch=batch)
                except ValueError as e:  # InputError: dp=2 with one sample
                    reason = f"n/a: dp=2 needs 2 samples, this step has {batch}" if batch == 1 else str(e)
                    print(f"{prefix} {reason} |" + " |" * 7, flush=True)
                    continue
                padded = projection.padded_tokens(shape, placement)
                conditions = conditions_for(cfg, shape, sparse=sparse, llm_valid=llm_valid, byt5_valid=byt5_valid,
                                            cfg_batch=cfg_batch)
                refiner = cfg.refiner_depth * projection.attention_flops(
                    batch, cfg.heads_num, conditions["prompt_embeds"].shape[1],
                    conditions["prompt_embeds"].shape[1], cfg.head_dim)
                if sparse:
                    pairs, kv = sparse_pairs(c, args.share), sparse_kv_bytes(c, args.share)
                else:
                    text = conditions["prompt_embeds"].shape[1] + conditions["prompt_embeds_2"].shape[1]
                    pairs, kv = dense_pairs(padded, text), splash_kv_bytes(padded + text, padded + text)
                attn = cfg.mm_double_blocks_depth * 4 * cfg.head_dim * cfg.heads_num * batch * pairs + refiner
                kv_total = cfg.mm_double_blocks_depth * cfg.heads_num * batch * kv
                r = projection.project_step(cfg, placement, shape, conditions, settings, chip, attention_flops=attn,
                                            kv_bytes=kv_total, attention=dense_stand_in,
                                            sparse_attention=sparse_stand_in)
                fits = "" if r.fits(chip) else ": does not fit"
                print(f"{prefix} {r.need_bytes / 1e9:.1f}{fits} | {r.flops / 1e12:.0f} "
                      f"({r.attention_flops / 1e12:.0f}) | {r.hbm_bytes / 1e9:.0f} ({r.kv_bytes / 1e9:.0f}) | "
                      f"{r.wire_bytes / 1e9:.1f} | {r.roofline.cells()} |", flush=True)
                print(f"<!-- {c.frames} {name} {mesh_spec} {preset}: compiled in {r.compile_s:.0f} s; "
                      f"{projection.describe_collectives(r.collectives, digits=0)} -->", flush=True)
    cfg = DiTConfig.preset("720p_t2v_distilled_sparse")
    for c in canvases:
        if c.frames in args.project_frames:
            group = attention.SPARSE_BLOCKS_PER_STEP
            per_row = -(-c.width // group)
            steps, bs = cfg.mm_double_blocks_depth * cfg.heads_num * c.n * per_row / devices, c.plan.block_size
            print(f"\nNot in the roofline: the SSTA Pallas kernel's grid (batch, head, query tile, step of {group} "
                  f"list entries) has {steps / 1e6:.2f} M steps per chip per forward at {c.frames} frames (54 blocks "
                  f"x 16 heads x {c.n} tiles x ceil(K {c.width} / {group}) / {devices} chips; entries past a row's "
                  f"count are in steps too). At a fixed cost of {args.grid_step_us} us per grid step (--grid_step_us; "
                  f"not measured here) that is {steps * args.grid_step_us / 1e6:.2f} s, against "
                  f"{group * 4 * bs * bs * 128 / chip.peak_flops * 1e9:.0f} ns of MXU work and "
                  f"{group * 2 * bs * 128 * BF16 / chip.hbm_bandwidth * 1e9:.0f} ns of K/V DMA per step.")
    print(f"\nload average {load()} at the end")


# ---- one layer on this CPU -----------------------------------------------------------------------------

def compiled_call(fn, args) -> tuple[Callable[[], jax.Array], int]:
    """(one call of jit(fn)(*args), waited for; the compiled temporary bytes)."""
    compiled = jax.jit(fn).lower(*args).compile()
    return (lambda: jax.block_until_ready(compiled(*args))), compiled.memory_analysis().temp_size_in_bytes


def masked_reference(q, k, v, selected: np.ndarray, bs: int, scale: float, budget: float = 5e8) -> np.ndarray:
    """Dense float32 attention under the block mask expanded to tokens, a few query tiles at a time."""
    b, n, length, _ = q.shape
    nq, s = length // bs, k.shape[2]
    chunk = max(c for c in range(1, nq + 1) if nq % c == 0 and c * bs * s * n * b * 4 * 3 <= budget or c == 1)
    tokens = jnp.asarray(np.repeat(selected, bs, axis=-1))
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))

    @jax.jit  # the arrays as arguments: closed over, XLA would constant-fold the attention
    def part(q, k, v, tokens, i):
        rows = jax.lax.dynamic_slice_in_dim(q, i * chunk * bs, chunk * bs, axis=2)
        mask = jnp.repeat(jax.lax.dynamic_slice_in_dim(tokens, i * chunk, chunk, axis=2), bs, axis=2)
        return attention.xla_attention(rows, k, v, mask, scale)

    return np.concatenate([np.asarray(part(q, k, v, tokens, i)) for i in range(nq // chunk)], axis=2)


def cpu_report(args) -> None:
    print(timing.check_quiet(args.allow_busy))
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    param = SparseAttention(tile_size=tuple(args.tile), win_size=tuple(args.window),
                            ssta_topk=args.topk or SparseAttention.ssta_topk)
    grid, heads, d = tuple(args.latents), args.heads, args.head_dim
    p = ssta.plan(param, grid)
    bs, n, n_txt = p.block_size, p.image_blocks, p.text_blocks(args.text_slots)
    text_mask = (torch.arange(args.text_slots) < args.text_valid)[None]
    live = int(ssta.live_text_blocks(text_mask, p)[0])
    width = ssta.list_width(p, n_txt)

    q, k = random_qk(grid, heads, d, args.qk, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    v = torch.randn(q.shape, generator=g)
    txt = [torch.randn(1, args.text_slots, heads, d, generator=g) for _ in range(2)]
    selected_img = image_selection(p, q, k).expand(1, heads, n, n)
    text_columns = (torch.arange(n_txt) < live).expand(1, heads, n, n_txt)
    selected = torch.cat([selected_img, text_columns], -1)
    kv_blocks, kv_counts = ssta.block_lists(selected, width)
    pad = n_txt * bs - args.text_slots
    k_txt, v_txt = (torch.cat([x, x[:, -1:].expand(1, pad, heads, d)], 1) for x in txt)
    q_t = ssta.to_tiles(q, p).transpose(1, 2)
    k_t = torch.cat([ssta.to_tiles(k, p), k_txt], 1).transpose(1, 2)
    v_t = torch.cat([ssta.to_tiles(v, p), v_txt], 1).transpose(1, 2)
    q_j, k_j, v_j = (jnp.asarray(x.contiguous().numpy(), dtype) for x in (q_t, k_t, v_t))
    blocks_j, counts_j = jnp.asarray(kv_blocks.numpy()), jnp.asarray(kv_counts.numpy())
    key_mask = jnp.asarray(np.concatenate([np.ones(n * bs, bool), np.arange(n_txt * bs) < live * bs]))[None, None, None]
    scale = d ** -0.5

    length, keys = n * bs, (n + n_txt) * bs
    share = float(selected_img.float().sum(-1).mean()) / n
    listed = float(kv_counts.float().mean())
    print(f"One layer's image-row attention: latents {'x'.join(map(str, grid))} = {math.prod(grid)} tokens, tile "
          f"{'x'.join(map(str, p.tile))} -> {'x'.join(map(str, p.tiles))} = {n} image blocks of {bs} ({length} rows), "
          f"{args.text_slots} text slots -> {n_txt} blocks ({live} live, {args.text_valid} valid); {heads} heads x "
          f"{d}; window {list(p.window)}, top-k {p.topk} (ssta_topk {param.ssta_topk}); {args.qk} random q/k, seed "
          f"{args.seed}; {args.dtype}; K = {width}, listed blocks per row {listed:.1f} (image {share * n:.1f} of {n}: "
          f"share {share:.3f}). {machine()}; load average {load()} at the start\n")

    sparse_fn = functools.partial(attention.block_sparse_xla, block_size=bs, scale=scale)
    sparse_out = np.asarray(jax.jit(sparse_fn)(q_j, k_j, v_j, blocks_j, counts_j), np.float32)
    listed_pairs = float(kv_counts.sum()) * bs * bs
    dense_pairs_ = float(length) * (length + live * bs) * heads
    kernels = {"block_sparse_xla (portable)": (sparse_fn, (q_j, k_j, v_j, blocks_j, counts_j),
                                               width * n * heads * bs * bs, listed_pairs)}
    dense_out = None
    if not args.no_dense:
        for name, fn in (("blocked_attention (dense, masked text; the CPU default)", attention.blocked_attention),
                         ("xla_attention (dense, masked text; materialises the scores)", attention.xla_attention)):
            kernels[name] = (functools.partial(fn, scale=scale), (q_j, k_j, v_j, key_mask),
                             float(length) * keys * heads, dense_pairs_)
        dense_out = np.asarray(jax.jit(kernels[name][0])(q_j, k_j, v_j, key_mask), np.float32)
    calls, temps = {}, {}
    for name, (fn, fn_args, _, _) in kernels.items():
        calls[name], temps[name] = compiled_call(fn, fn_args)
    times = timing.round_robin(calls, args.repeats)
    rows = [(name, *timing.min_median(times[name]), temps[name], computed, needed)
            for name, (_, _, computed, needed) in kernels.items()]
    if args.pallas:
        pallas_fn = functools.partial(attention.block_sparse_pallas(interpret=True), block_size=bs, scale=scale)
        pallas_call, pallas_temp = compiled_call(pallas_fn, (q_j, k_j, v_j, blocks_j, counts_j))
        pallas_s = timing.round_robin({"pallas": pallas_call}, 1)["pallas"][0]
        pallas_out = np.asarray(jax.jit(pallas_fn)(q_j, k_j, v_j, blocks_j, counts_j), np.float32)
        rows.append(("block_sparse_pallas (interpret mode; not a timing)", pallas_s, pallas_s, pallas_temp,
                     listed_pairs, listed_pairs))

    print(f"{timing.budget_line(THREADS)}; the kernels take turns, {args.repeats} timed calls each after a warm-up\n")
    print("| kernel | min s | median s | temp MiB (compiled) | query-key pairs computed (M) | of them attended (M) | "
          "GFLOP/s computed (median) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, fastest, seconds, temp, computed, needed in rows:
        print(f"| {name} | {fastest:.4f} | {seconds:.4f} | {temp / 2**20:.1f} | {computed / 1e6:.1f} | "
              f"{needed / 1e6:.1f} | {4 * d * computed / seconds / 1e9:.1f} |")

    reference = masked_reference(q_j, k_j, v_j, selected.numpy(), bs, scale)
    print(f"\nrel L2 against dense float32 attention under the expanded block mask: block_sparse_xla "
          f"{rel_l2(sparse_out, reference):.2e}", end="")
    if args.pallas:
        print(f", block_sparse_pallas (interpret) {rel_l2(pallas_out, reference):.2e}", end="")
    if dense_out is not None:
        print(f"; SSTA against dense attention (what the mask changes on random q/k): "
              f"{rel_l2(sparse_out, dense_out):.2e}", end="")
    print(f"\nshare of blocks computed: image {share:.3f} of {n} per row, listed {listed:.1f} of {n + live} live "
          f"blocks; portable kernel walks all K = {width} entries ({width / (n + live):.3f} of dense work); load "
          f"average {load()} at the end")


# ---- drift of the whole DiT --------------------------------------------------------------------------

def drift_report(args) -> None:
    base = widened_tiny(args.hidden, args.depth)
    grid = tuple(args.latents)
    inputs = random_inputs(base, batch=args.batch, latent=grid, text_len=args.text_len, byt5_len=args.byt5_len,
                           seed=args.seed)
    print(f"Whole DiT, eager torch float32: widened tiny (hidden {args.hidden}, {base.heads_num} heads of "
          f"{base.head_dim}, {args.depth} double blocks), latents {'x'.join(map(str, grid))} = {math.prod(grid)} "
          f"tokens, batch {args.batch}, {args.text_len} LLM + {args.byt5_len} ByT5 slots (random_inputs: padding "
          f"differs per sample), t=999 and random; trained-scale random weights (seed {args.seed}); each SSTA "
          f"model against the same weights with dense attention (config.dense()). {machine()}; load average "
          f"{load()}\n")

    dense_model = HunyuanVideo15DiT(base.dense()).eval()
    randomize_like_trained_(dense_model, seed=args.seed)
    with torch.no_grad():
        reference = dense_model(**inputs)
    settings = [(tuple(args.window), topk, win_type, "") for topk in args.topk for win_type in ("fixed", "hybrid")]
    tiles = ssta.plan(SparseAttention(tile_size=tuple(args.tile)), grid).tiles
    settings.append((tuple(2 * t + 1 for t in tiles), args.topk[0], "fixed", " (control: covers every tile)"))

    print("| tile | window | top-k (ssta_topk) | win_type | dense blocks | image blocks attended per row (share) | "
          "rel L2 vs dense | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for window, topk, win_type, note in settings:
        param = SparseAttention(tile_size=tuple(args.tile), win_size=window, ssta_topk=topk, win_type=win_type,
                                win_ratio=args.win_ratio)
        cfg = dataclasses.replace(base, attn_mode=SPARSE_ATTN_MODE, attn_param=param)
        seen = []

        def recording(img_q, img_k, img_v, txt_q, txt_k, txt_v, text_mask, p, seen=seen):
            seen.append(float(image_selection(p, img_q, img_k).sum(-1).float().mean()))
            return ssta.sparse_attention(img_q, img_k, img_v, txt_q, txt_k, txt_v, text_mask, p)

        model = HunyuanVideo15DiT(cfg, Execution(sparse_attention=recording)).eval()
        model.load_state_dict(dense_model.state_dict())
        begin = time.perf_counter()
        with torch.no_grad():
            out = model(**inputs)
        seconds = time.perf_counter() - begin
        p = ssta.plan(param, grid)
        dense_blocks = [i for i in range(args.depth) if param.dense_at(i, args.depth)]
        per_row = statistics.mean(seen) if seen else float(p.image_blocks)
        print(f"| {'x'.join(map(str, p.tile))} -> {'x'.join(map(str, p.tiles))} | {'x'.join(map(str, p.window))}"
              f"{note} | {p.topk} ({topk}) | {win_type} | {dense_blocks or 'none'} | {per_row:.1f} of "
              f"{p.image_blocks} ({per_row / p.image_blocks:.3f}) | {rel_l2(out, reference):.3e} | {seconds:.2f} |",
              flush=True)


def main() -> None:
    if sys.argv[1:2] == ["mask"]:  # the projection lays the step out over 8 virtual devices (read by
        os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # the first JAX use)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mask", help="the official mask at 720p, attention FLOPs, the v6e-8 projection")
    m.add_argument("--frames", type=int, nargs="+", default=[121, 241])
    m.add_argument("--resolution", default="720p")
    m.add_argument("--aspect_ratio", default="16:9")
    m.add_argument("--text_slots", type=int, default=TEXT_SLOTS, help="the sparse model's text slots "
                   "(default: the official %(default)s)")
    m.add_argument("--text_valid", type=int, default=900, help="valid text slots (ByT5 + LLM; default: %(default)s)")
    m.add_argument("--byt5_valid", type=int, default=64, help="of them ByT5 (default: %(default)s)")
    m.add_argument("--heads", type=int, default=2, help="heads of random q/k for the selection (default: %(default)s)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--project", default="v6e-8", metavar="CHIP-N", help="projection target (default: %(default)s)")
    m.add_argument("--no_project", action="store_true", help="skip the projection (it compiles the full model "
                   "once per strategy and model: minutes)")
    m.add_argument("--project_frames", type=int, nargs="+", default=[121], help="canvases to project "
                   "(default: %(default)s)")
    m.add_argument("--layout", nargs="+", metavar="STRATEGY:MESH", help="only these, e.g. tp_fc2_replicated:tp=8 "
                   "(default: all of sharding_strategies.py's)")
    m.add_argument("--models", nargs="+", default=["720p_t2v", "720p_t2v_distilled", "720p_t2v_distilled_sparse"],
                   help="presets to project (default: %(default)s)")
    m.add_argument("--share", choices=["upper", "iid", "smooth"], default="upper",
                   help="SSTA image blocks per row in the projection (default: %(default)s)")
    m.add_argument("--grid_step_us", type=float, default=0.35, help="assumed fixed cost of one Pallas grid step, "
                   "for the note under the projection (default: %(default)s)")

    c = sub.add_parser("cpu", help="one layer's attention on this CPU: sparse vs dense, error")
    c.add_argument("--latents", type=int, nargs=3, default=[12, 32, 48], metavar=("T", "H", "W"))
    c.add_argument("--heads", type=int, default=2)
    c.add_argument("--head_dim", type=int, default=128)
    c.add_argument("--tile", type=int, nargs=3, default=[6, 8, 8])
    c.add_argument("--window", type=int, nargs=3, default=[3, 3, 3])
    c.add_argument("--topk", type=int, help="ssta_topk before the halving rule (default: the official 64)")
    c.add_argument("--text_slots", type=int, default=256)
    c.add_argument("--text_valid", type=int, default=100)
    c.add_argument("--qk", choices=["iid", "smooth"], default="iid")
    c.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--pallas", action="store_true", help="also the Pallas kernel in interpret mode (slow)")
    c.add_argument("--no_dense", action="store_true", help="skip timing dense attention")
    timing.add_flags(c)

    d = sub.add_parser("drift", help="the whole DiT with SSTA against dense attention, same weights")
    d.add_argument("--hidden", type=int, default=256, help="8 heads (default: %(default)s)")
    d.add_argument("--depth", type=int, default=4)
    d.add_argument("--latents", type=int, nargs=3, default=[6, 16, 24], metavar=("T", "H", "W"))
    d.add_argument("--tile", type=int, nargs=3, default=[2, 4, 4])
    d.add_argument("--window", type=int, nargs=3, default=[3, 3, 3])
    d.add_argument("--topk", type=int, nargs="+", default=[64, 8], help="ssta_topk values (halved at <= 31 frames)")
    d.add_argument("--win_ratio", type=int, default=10, help="hybrid: every win_ratio-th block and the last dense")
    d.add_argument("--batch", type=int, default=2)
    d.add_argument("--text_len", type=int, default=12)
    d.add_argument("--byt5_len", type=int, default=6)
    d.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if args.command == "mask":
        canvases = mask_report(args)
        if not args.no_project:
            project_report(args, canvases)
    elif args.command == "cpu":
        cpu_report(args)
    else:
        drift_report(args)


if __name__ == "__main__":
    main()
