"""The HunyuanVideo-1.5 diffusion transformer in plain PyTorch, with the official parameter names.

Static shapes throughout: no boolean indexing, no Python branch on tensor values, so the same
module runs eagerly on CPU and traces once under ``jax.jit`` through torchax. Attention goes
through ``F.scaled_dot_product_attention`` with a key padding mask; the runtime swaps the kernel
underneath without touching this file.

Shapes: B batch, L image tokens (T*H*W after patching), S text slots, C hidden, N heads, D head dim.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from sharding import IMG, IMG_ATTN, IMG_HEADS, IMG_MLP, TXT, TXT_ATTN, TXT_HEADS, TXT_MLP

from . import ssta
from .config import DiTConfig

Rope = tuple[torch.Tensor, torch.Tensor]
QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # each (B, tokens, N, D)
Streams = tuple[torch.Tensor, torch.Tensor]  # (img (B, L, C), txt (B, S, C)) between two blocks
Layout = Callable[[torch.Tensor, str], torch.Tensor]
Scope = Callable[[str], contextlib.AbstractContextManager]
# run_block(block, img, txt) -> (img, txt): one double block on the streams, with this forward's
# timestep embedding, RoPE, key mask, layout and checkpoint; ``block`` is a DoubleStreamBlock or
# anything called like one.
BlockCall = Callable[[Callable[..., Streams], torch.Tensor, torch.Tensor], Streams]
# runner(blocks, span, streams, run_block, scope) -> streams after blocks[i] for i in span, in order.
BlockRunner = Callable[[nn.ModuleList, range, Streams, BlockCall, Scope], Streams]
# attend(img_qkv, txt_qkv, key_mask) -> (img (B, L, N*D), txt (B, S, N*D)): a double block's attention.
Attend = Callable[[QKV, QKV, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# sparse(img_q, img_k, img_v, txt_q, txt_k, txt_v, text_mask, plan) -> (img, txt) (B, tokens, N, D).
SparseAttend = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def keep_layout(x: torch.Tensor, name: str) -> torch.Tensor:
    return x


def no_scope(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def no_checkpoint(fn: Callable) -> Callable:
    return fn


def loop_blocks(blocks: nn.ModuleList, span: range, streams: Streams, run_block: BlockCall, scope: Scope) -> Streams:
    """The default block runner: one Python call per block, each in its own scope
    ("double_block_<i>"). Under ``jax.jit`` this unrolls a copy of the block per layer."""
    for i in span:
        with scope(f"double_block_{i}"):
            streams = run_block(blocks[i], *streams)
    return streams


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a forward is placed on devices. The defaults run the model as plain PyTorch.

    ``layout(x, name)`` is called on named activations so that a sharded runtime can pin their
    placement (the names and their shapes: ``sharding.ACTIVATIONS``). ``token_multiple``
    pads the image tokens to a multiple of itself; padded tokens are masked keys and are
    dropped before the output, so they never change the result. ``scope(name)`` names a phase
    ("embed", "blocks", "double_block_<i>", "final_layer") for profiler traces (the block
    runner names the blocks' scopes).
    ``checkpoint(fn)`` wraps each double block's call (tensors in, tensors out); a trainer
    passes a rematerialising wrapper so that a block's activations are recomputed in the
    backward pass instead of kept. ``run_blocks`` runs a range of double blocks (see
    ``BlockRunner``); the default is a Python loop, a JAX runtime substitutes one loop whose
    body is a single block (``hunyuan_tpu.scan.scanned_blocks``) so that a jitted step holds
    one copy of the block however deep the model.
    ``sparse_attention`` is SSTA's attention for a sparse model (``ssta.sparse_attention``,
    whose kernel the runtime overrides); another implementation of the same contract (a
    reference, a variant) plugs in here.
    """

    layout: Layout = keep_layout
    token_multiple: int = 1
    scope: Scope = no_scope
    checkpoint: Callable[[Callable], Callable] = no_checkpoint
    run_blocks: BlockRunner = loop_blocks
    sparse_attention: SparseAttend = ssta.sparse_attention


# ---- functional pieces -----------------------------------------------------------------------

def condition_order(
    text_mask: torch.Tensor, byt5_mask: torch.Tensor, vision_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, S) stable order that puts valid condition slots first, and their mask in it.

    Slots as concatenated: [vision (i2v only), ByT5, LLM]; the masks are bool.
    """
    masks = [byt5_mask, text_mask]
    if vision_mask is not None:
        masks.insert(0, vision_mask)
    mask = torch.cat(masks, dim=1)
    order = torch.argsort((~mask).to(torch.int32), dim=1, stable=True)
    return order, torch.gather(mask, 1, order)


def vision_key_mask(vision_states: torch.Tensor | None, vision_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The (B, S3) bool mask of the vision tokens: ``vision_mask`` if given, else all valid (None for t2v)."""
    if vision_states is None:
        return None
    if vision_mask is None:
        return torch.ones_like(vision_states[..., 0], dtype=torch.bool)
    return vision_mask.bool()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample (B, C) modulation over (B, L, C)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters (eps 1e-6), as in the double blocks and final layer."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of raw timesteps (0..1000), [cos, sin] order, in float32: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_frequencies(grid: tuple[int, int, int], dims: tuple[int, ...], theta: float, device) -> Rope:
    """3D RoPE tables (cos, sin), each (T*H*W, D), for tokens in t-major order t*H*W + h*W + w.

    Per axis of width d the angles are pos * theta^(-2j/d), j < d/2; the three axes are
    concatenated (t, h, w) and every angle is repeated for its (even, odd) channel pair.
    """
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in grid]
    positions = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).reshape(3, -1)
    angles = []
    for pos, d in zip(positions, dims):
        inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
        angles.append(pos[:, None] * inv_freq[None])
    angles = torch.cat(angles, dim=1)
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate interleaved channel pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); (B, L, N, D), float32 math."""
    cos, sin = (r[None, :, None, :] for r in rope)
    x32 = x.float()
    even, odd = x32.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-odd, even], dim=-1).flatten(-2)
    return (x32 * cos + rotated * sin).type_as(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention, scale 1/sqrt(D), keys where ``key_mask`` is False ignored.

    q, k, v: (B, L, N, D); key_mask: (B, S) bool -> (B, L, N*D).
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask[:, None, None, :]
    )
    return out.transpose(1, 2).flatten(2)


def joint_attention(img: QKV, txt: QKV, key_mask: torch.Tensor, *, zero_masked_rows: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention over [img, txt] with a (B, L + S) key mask. Padded text rows never reach
    the image of a dense model. In a sparse model's dense (hybrid) blocks ``zero_masked_rows``
    sets them to zeros, as the official flash kernel leaves them, because SSTA attends the padded
    slots that share a block with valid text. (Masking the whole output, not the text part only,
    keeps the partitioner's collectives as they are without it.)"""
    q, k, v = (torch.cat(pair, 1) for pair in zip(img, txt))
    out = attention(q, k, v, key_mask)
    if zero_masked_rows:
        out = out * key_mask[..., None]
    return out.split([img[0].shape[1], txt[0].shape[1]], dim=1)


def sparse_joint_attention(img: QKV, txt: QKV, key_mask: torch.Tensor, *, plan: ssta.Plan,
                           sparse: SparseAttend) -> tuple[torch.Tensor, torch.Tensor]:
    """SSTA over [img, txt] for a double block: image tokens past the canvas (padding for a
    device mesh) are left out of the tiles and come back as zeros."""
    length, tokens = img[0].shape[1], math.prod(plan.grid)
    img_out, txt_out = sparse(*(x[:, :tokens] for x in img), *txt, key_mask[:, length:], plan)
    return F.pad(img_out.flatten(2), (0, 0, 0, length - tokens)), txt_out.flatten(2)


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, L, C*pt*ph*pw), tokens t-major, features in Conv3d weight order."""
    b, c, t, h, w = x.shape
    pt, ph, pw = patch
    x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, -1, c * pt * ph * pw)


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, L, C*pt*ph*pw) -> (B, C, T, H, W); the inverse of ``patchify`` for the output layer."""
    (t, h, w), (pt, ph, pw) = grid, patch
    x = x.reshape(x.shape[0], t, h, w, -1, pt, ph, pw)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(x.shape[0], -1, t * pt, h * ph, w * pw)


# ---- layers ----------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Per-head RMSNorm of q and k: statistics in float32, gain applied in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: nn.Module):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Modulation(nn.Module):
    """``linear(silu(vec))`` split into ``factor`` (B, C) chunks."""

    def __init__(self, dim: int, factor: int):
        super().__init__()
        self.factor = factor
        self.linear = nn.Linear(dim, factor * dim)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(vec)).chunk(self.factor, dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))


class TextProjection(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = patch, computed as a matmul over patches (same weights)."""

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int]):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(patchify(x, self.patch), self.proj.weight.flatten(1), self.proj.bias)


class RefinerBlock(nn.Module):
    """Token-refiner block: gated self-attention (fused qkv, no qk-norm, no RoPE) and SiLU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn_qkv = nn.Linear(dim, 3 * dim)
        self.self_attn_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, 4 * dim, nn.SiLU())  # width ratio 4 is fixed in the official refiner
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        gate_attn, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=-1)
        q, k, v = self.self_attn_qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).unbind(2)
        x = x + gate_attn[:, None] * self.self_attn_proj(attention(q, k, v, key_mask))
        return x + gate_mlp[:, None] * self.mlp(self.norm2(x))


class TokenRefiner(nn.Module):
    """``txt_in``: embeds LLM hidden states, conditioned on the timestep and the pooled prompt."""

    def __init__(self, in_dim: int, dim: int, heads: int, depth: int):
        super().__init__()
        self.input_embedder = nn.Linear(in_dim, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.c_embedder = TextProjection(in_dim, dim)
        # A container only so that parameter names read `individual_token_refiner.blocks.i`.
        self.individual_token_refiner = nn.ModuleDict(
            {"blocks": nn.ModuleList(RefinerBlock(dim, heads) for _ in range(depth))}
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.float()[..., None]
        pooled = (x.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        c = self.t_embedder(t) + self.c_embedder(pooled.to(x.dtype))
        # Slot 0 always counts as a key (official IndividualTokenRefiner), so no row is all-masked.
        key_mask = torch.cat([torch.ones_like(mask[:, :1]), mask[:, 1:]], dim=1)
        x = self.input_embedder(x)
        for block in self.individual_token_refiner["blocks"]:
            x = block(x, c, key_mask)
        return x


class ByT5Mapper(nn.Module):
    """``byt5_in``: LayerNorm -> fc1 -> GELU -> fc2 -> GELU -> fc3 (exact GELU)."""

    def __init__(self, in_dim: int, hidden: int, dim: int):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(self.layernorm(x))))))


class VisionProjection(nn.Module):
    """``vision_in``: LayerNorm -> Linear -> GELU -> Linear -> LayerNorm (SigLIP features, i2v)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, dim), nn.LayerNorm(dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, joined in one attention over [img, txt]."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim, hd, mlp = cfg.hidden_size, cfg.head_dim, cfg.mlp_hidden_dim
        self.heads = cfg.heads_num
        self.img_mod = Modulation(dim, 6)
        self.img_attn_q, self.img_attn_k, self.img_attn_v = (nn.Linear(dim, dim) for _ in range(3))
        self.img_attn_q_norm, self.img_attn_k_norm = RMSNorm(hd), RMSNorm(hd)
        self.img_attn_proj = nn.Linear(dim, dim)
        self.img_mlp = MLP(dim, mlp, nn.GELU(approximate="tanh"))
        self.txt_mod = Modulation(dim, 6)
        self.txt_attn_q, self.txt_attn_k, self.txt_attn_v = (nn.Linear(dim, dim) for _ in range(3))
        self.txt_attn_q_norm, self.txt_attn_k_norm = RMSNorm(hd), RMSNorm(hd)
        self.txt_attn_proj = nn.Linear(dim, dim)
        self.txt_mlp = MLP(dim, mlp, nn.GELU(approximate="tanh"))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1))

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        rope: Rope,
        key_mask: torch.Tensor,
        layout: Layout = keep_layout,
        attend: Attend = joint_attention,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)

        x = modulate(layer_norm(img), img_shift1, img_scale1)
        img_q = apply_rope(self.img_attn_q_norm(self._heads(self.img_attn_q(x))), rope)
        img_k = apply_rope(self.img_attn_k_norm(self._heads(self.img_attn_k(x))), rope)
        img_v = self._heads(self.img_attn_v(x))
        img_q, img_k, img_v = (layout(a, IMG_HEADS) for a in (img_q, img_k, img_v))

        x = modulate(layer_norm(txt), txt_shift1, txt_scale1)
        txt_q = self.txt_attn_q_norm(self._heads(self.txt_attn_q(x)))
        txt_k = self.txt_attn_k_norm(self._heads(self.txt_attn_k(x)))
        txt_v = self._heads(self.txt_attn_v(x))
        txt_q, txt_k, txt_v = (layout(a, TXT_HEADS) for a in (txt_q, txt_k, txt_v))

        img_attn, txt_attn = attend((img_q, img_k, img_v), (txt_q, txt_k, txt_v), key_mask)

        img = img + img_gate1[:, None] * self.img_attn_proj(layout(img_attn, IMG_ATTN))
        x = modulate(layer_norm(img), img_shift2, img_scale2)
        img = img + img_gate2[:, None] * self.img_mlp.fc2(layout(self.img_mlp.act(self.img_mlp.fc1(x)), IMG_MLP))
        txt = txt + txt_gate1[:, None] * self.txt_attn_proj(layout(txt_attn, TXT_ATTN))
        x = modulate(layer_norm(txt), txt_shift2, txt_scale2)
        txt = txt + txt_gate2[:, None] * self.txt_mlp.fc2(layout(self.txt_mlp.act(self.txt_mlp.fc1(x)), TXT_MLP))
        return layout(img, IMG), layout(txt, TXT)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_features)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))


# ---- the model -------------------------------------------------------------------------------

class HunyuanVideo15DiT(nn.Module):
    """HunyuanVideo-1.5 DiT: 65-channel latents (98 for super-resolution) + text conditions ->
    32-channel velocity."""

    def __init__(self, config: DiTConfig, execution: Execution = Execution()):
        super().__init__()
        self.config = cfg = config
        self.execution = execution
        dim = cfg.hidden_size
        self.img_in = PatchEmbed(cfg.img_in_channels, dim, cfg.patch_size)
        self.txt_in = TokenRefiner(cfg.text_states_dim, dim, cfg.heads_num, cfg.refiner_depth)
        self.byt5_in = ByT5Mapper(cfg.byt5_states_dim, cfg.byt5_hidden_dim, dim)
        self.vision_in = VisionProjection(cfg.vision_states_dim, dim)
        self.time_in = TimestepEmbedder(dim)
        self.time_r_in = TimestepEmbedder(dim) if cfg.use_meanflow else None
        self.cond_type_embedding = nn.Embedding(3, dim)  # 0: LLM, 1: ByT5, 2: vision tokens
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.mm_double_blocks_depth))
        self.final_layer = FinalLayer(dim, math.prod(cfg.patch_size) * cfg.out_channels)

    def _attention_runs(self, span: range, grid: tuple[int, int, int]) -> list[tuple[range, Attend]]:
        """``span`` cut into runs of blocks with the same attention: all dense in a dense model;
        SSTA in a sparse one, except the blocks its hybrid window type runs dense."""
        param = self.config.sparse
        if param is None or not span:
            return [(span, joint_attention)] if span else []
        sparse = functools.partial(sparse_joint_attention, plan=ssta.plan(param, grid),
                                   sparse=self.execution.sparse_attention)
        dense = functools.partial(joint_attention, zero_masked_rows=True)
        depth, runs, start = len(self.double_blocks), [], span.start
        for i in span:
            if i + 1 == span.stop or param.dense_at(i, depth) != param.dense_at(i + 1, depth):
                runs.append((range(start, i + 1), dense if param.dense_at(i, depth) else sparse))
                start = i + 1
        return runs

    def embed_text(
        self,
        t: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        byt5_states: torch.Tensor,
        byt5_mask: torch.Tensor,
        vision_states: torch.Tensor | None,
        vision_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All condition tokens, valid ones first: (B, S, C) tokens and their (B, S) bool mask.

        Order [valid vision, valid ByT5, valid LLM, padded ByT5 (zeroed), padded LLM (zeroed)]
        as in the official reordering, here a stable sort by validity so shapes stay static.
        Text tokens carry no position, so the order never changes a dense model's image output; it
        puts every padded slot at the end, where a key mask is just a key length. Padded ByT5 and
        LLM slots are zeros; masked vision slots hold the vision type embedding (official). t2v
        needs no vision tokens in a dense model (the official model masks its zero vision tokens
        out); a sparse model is given them masked, as the official pipeline does.
        ``vision_mask`` (B, S3) marks the samples whose vision tokens count (a training batch
        mixes t2v and i2v samples); without it every vision token counts.
        """
        text_mask, byt5_mask = text_mask.bool(), byt5_mask.bool()
        type_embedding = self.cond_type_embedding.weight
        llm = self.txt_in(text_states, t, text_mask) + type_embedding[0]
        byt5 = self.byt5_in(byt5_states) + type_embedding[1]
        tokens = [byt5.masked_fill(~byt5_mask[..., None], 0), llm.masked_fill(~text_mask[..., None], 0)]
        vision_mask = vision_key_mask(vision_states, vision_mask)
        if vision_states is not None:
            # masked vision tokens keep their type embedding (official: features zeroed, then
            # the embedding added); sparse attention can see them
            vision = self.vision_in(vision_states).masked_fill(~vision_mask[..., None], 0) + type_embedding[2]
            tokens.insert(0, vision)
        order, mask = condition_order(text_mask, byt5_mask, vision_mask)
        tokens = torch.gather(torch.cat(tokens, dim=1), 1, order[..., None].expand(-1, -1, self.config.hidden_size))
        return tokens, mask

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        byt5_states: torch.Tensor,
        byt5_mask: torch.Tensor,
        vision_states: torch.Tensor | None = None,
        timestep_r: torch.Tensor | None = None,
        *,
        vision_mask: torch.Tensor | None = None,
        save: tuple[int, ...] = (),
        start: int = 0,
        streams: Streams | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[Streams]]:
        """Predict the flow-matching velocity.

        x: (B, 65, T, H, W) = [noisy latents, condition latents, mask] (SR: 98, + LR latents, mask);
        t: (B,) timesteps in 0..1000; text_states (B, S1, text_states_dim) with text_mask (B, S1);
        byt5_states (B, S2, byt5_states_dim) with byt5_mask (B, S2); vision_states (B, S3,
        vision_states_dim) for i2v, None for t2v; timestep_r (B,) for meanflow models;
        vision_mask (B, S3), where a batch mixes i2v samples (True) and t2v ones (False). Returns (B, 32, T, H, W).

        The feature caches (``hunyuan_tpu.cache``) cut the forward between blocks (block ``depth``:
        the final layer). ``save``: also return the (img, txt) streams entering those blocks,
        ``(velocity, [streams, ...])``. ``start``: run the blocks from there on, from ``streams``
        (saved at an earlier step: nothing is embedded, ``x`` gives only the shape) or from this
        step's embedded streams with ``residual`` added to the image stream; either way with this
        step's timestep embedding.
        """
        cfg, layout, scope, depth = self.config, self.execution.layout, self.execution.scope, len(self.double_blocks)
        if timestep_r is not None and self.time_r_in is None:
            raise ValueError("timestep_r given but this model has no time_r_in (use_meanflow=False)")
        if not all(start <= k <= depth for k in save) or not 0 <= start <= depth:
            raise ValueError(f"blocks to save {save} and start {start} must be in order within 0..{depth}")
        grid = tuple(n // p for n, p in zip(x.shape[2:], cfg.patch_size))
        tokens = math.prod(grid)
        padding = -tokens % self.execution.token_multiple

        with scope("embed"):
            vec = self.time_in(t)
            if timestep_r is not None:
                vec = vec + self.time_r_in(timestep_r)
            if streams is None:
                img = layout(F.pad(self.img_in(x), (0, 0, 0, padding)), IMG)
                txt, txt_mask = self.embed_text(
                    t, text_states, text_mask, byt5_states, byt5_mask, vision_states, vision_mask)
                txt = layout(txt, TXT)
            else:
                img, txt = layout(streams[0], IMG), layout(streams[1], TXT)
                vision_mask = vision_key_mask(vision_states, vision_mask)
                _, txt_mask = condition_order(text_mask.bool(), byt5_mask.bool(), vision_mask)
            cos, sin = rope_frequencies(grid, cfg.rope_dim_list, cfg.rope_theta, x.device)
            rope = F.pad(cos, (0, 0, 0, padding), value=1.0), F.pad(sin, (0, 0, 0, padding))
            image_mask = torch.arange(tokens + padding, device=x.device) < tokens
            key_mask = torch.cat([image_mask.expand(x.shape[0], -1), txt_mask], dim=1)

        def run_block(block: Callable[..., Streams], img: torch.Tensor, txt: torch.Tensor,
                      attend: Attend = joint_attention) -> Streams:
            call = functools.partial(block, layout=layout, attend=attend)
            return self.execution.checkpoint(call)(img, txt, vec, rope, key_mask)

        def run_span(span: range, streams: Streams) -> Streams:
            for part, attend in self._attention_runs(span, grid):
                streams = self.execution.run_blocks(
                    self.double_blocks, part, streams, functools.partial(run_block, attend=attend), scope)
            return streams

        img, saved = img if residual is None else layout(img + residual, IMG), []
        with scope("blocks"):
            for stop in (*sorted(save), depth):
                img, txt = run_span(range(start, stop), (img, txt))
                saved.append((img, txt))
                start = stop
        with scope("final_layer"):
            velocity = unpatchify(self.final_layer(img[:, :tokens], vec), grid, cfg.patch_size)
        return (velocity, saved[:-1]) if save else velocity
