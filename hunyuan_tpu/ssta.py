"""SSTA, the sparse attention of the ``*_sparse`` checkpoints, as model math in plain PyTorch.

Image tokens are cut into 3D tiles of ``tile_size`` latents, one attention block each (the canvas
zero-padded to whole tiles: padded tokens are keys with k = v = 0, as in the official code). The
queries of a tile attend every token of a set of blocks: the tiles in a 3D window around it, the
``topk`` tiles of highest importance for it (per head and per sample), and the text; text
queries attend everything. Text is appended as whole blocks (padded with its last token); when
the text mask is used, text blocks past the valid text are attended by no one.

What this module decides is which blocks are attended; the attention itself goes through the
``hunyuan_tpu::block_sparse_attention`` op, whose eager meaning here is dense attention under
the expanded block mask, and which the JAX runtime replaces with a block-sparse kernel
(``hunyuan_tpu.attention``). Text queries go through ``F.scaled_dot_product_attention`` with a
key mask, like dense attention.

Shapes: B batch, N heads, D head dim, L image tokens, S text slots, bs block size, n blocks.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import SparseAttention

# The official 2D tiles of a one-frame canvas, by block size (attention.py, get_image_tile).
IMAGE_TILES = {384: (1, 16, 24), 128: (1, 16, 8), 64: (1, 8, 8), 16: (1, 4, 4)}
# Up to this many latent frames (5 s of video) the official code halves top-k.
SHORT_VIDEO_FRAMES = 31


@dataclasses.dataclass(frozen=True)
class Plan:
    """SSTA on one canvas: what is fixed before any tensor is seen."""

    param: SparseAttention
    grid: tuple[int, int, int]  # latent (T, H, W) after patching
    tile: tuple[int, int, int]
    window: tuple[int, int, int]
    topk: int

    @property
    def tiles(self) -> tuple[int, int, int]:
        return tuple(-(-g // t) for g, t in zip(self.grid, self.tile))

    @property
    def block_size(self) -> int:
        return math.prod(self.tile)

    @property
    def image_blocks(self) -> int:
        return math.prod(self.tiles)

    def text_blocks(self, text_slots: int) -> int:
        return -(-text_slots // self.block_size)


def plan(param: SparseAttention, grid: tuple[int, int, int]) -> Plan:
    """The tile, window and top-k for a canvas, by the official rules: a one-frame canvas uses
    the 2D tile of the same block size and no window; at most 31 frames halve top-k."""
    tile, window, topk = param.tile_size, param.win_size, param.ssta_topk
    if grid[0] == 1:
        if param.block_size not in IMAGE_TILES:
            raise ValueError(f"attn_param tile_size {list(tile)}: a one-frame canvas needs a block of "
                             f"{', '.join(map(str, IMAGE_TILES))} tokens, not {param.block_size}")
        tile, window = IMAGE_TILES[param.block_size], (1, 1, 1)
    elif grid[0] <= SHORT_VIDEO_FRAMES:
        topk //= 2
    return Plan(param, tuple(grid), tuple(tile), tuple(window), topk)


# ---- layout ------------------------------------------------------------------------------------

def to_tiles(x: torch.Tensor, p: Plan) -> torch.Tensor:
    """(B, L, N, D) tokens in t-major order -> (B, n*bs, N, D) tile by tile, zero-padded canvas."""
    b, _, heads, d = x.shape
    (t, h, w), (nt, nh, nw), (tt, th, tw) = p.grid, p.tiles, p.tile
    x = x.reshape(b, t, h, w, heads * d)
    x = F.pad(x, (0, 0, 0, nw * tw - w, 0, nh * th - h, 0, nt * tt - t))
    x = x.reshape(b, nt, tt, nh, th, nw, tw, heads, d).permute(0, 1, 3, 5, 2, 4, 6, 7, 8)
    return x.reshape(b, -1, heads, d)


def from_tiles(x: torch.Tensor, p: Plan) -> torch.Tensor:
    """The inverse of ``to_tiles``: (B, n*bs, N, D) -> (B, L, N, D), the padding dropped."""
    b, _, heads, d = x.shape
    (t, h, w), (nt, nh, nw), (tt, th, tw) = p.grid, p.tiles, p.tile
    x = x.reshape(b, nt, nh, nw, tt, th, tw, heads, d).permute(0, 1, 4, 2, 5, 3, 6, 7, 8)
    x = x.reshape(b, nt * tt, nh * th, nw * tw, heads, d)[:, :t, :h, :w]
    return x.reshape(b, t * h * w, heads, d)


# ---- which blocks --------------------------------------------------------------------------------

def window_mask(p: Plan) -> np.ndarray:
    """(n, n) bool: query tile -> the tiles of the window around it, the window's centre clamped
    so that it stays inside the canvas (a tile at the edge sees a shifted, not a cut, window)."""
    coords = np.stack(np.meshgrid(*(np.arange(n) for n in p.tiles), indexing="ij"), -1).reshape(-1, 3)
    half = np.array(p.window) // 2
    centre = np.minimum(np.maximum(coords, half), np.array(p.tiles) - 1 - half)
    return (np.abs(centre[:, None] - coords[None]) <= half).all(-1)


def block_means(x: torch.Tensor, p: Plan) -> torch.Tensor:
    """(B, n*bs, N, D) tiled tokens -> (B, N, n, D) float32 means per tile (taken in x's dtype,
    as the official code pools before casting)."""
    b, _, heads, d = x.shape
    return x.reshape(b, p.image_blocks, p.block_size, heads, d).mean(2).float().transpose(1, 2)


def top_blocks(q_tiles: torch.Tensor, k_tiles: torch.Tensor, p: Plan) -> torch.Tensor:
    """(B, N or 1, n, n) bool: for each query tile the ``topk`` key tiles by importance,
    ``lambda * similarity - (1 - lambda) * redundancy`` of the tiles' mean q and k (cosines
    mapped to [0, 1]; a key tile's redundancy is its mean similarity to the other key tiles)."""
    q, k = block_means(q_tiles, p), block_means(k_tiles, p)
    if p.param.attn_mask_share_within_head:
        q, k = q.mean(1, keepdim=True), k.mean(1, keepdim=True)
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    similarity = (q @ k.transpose(-1, -2) + 1) / 2
    kk = (k @ k.transpose(-1, -2) + 1) / 2
    n = kk.shape[-1]
    redundancy = (kk.sum(-2) - kk.diagonal(dim1=-2, dim2=-1)) / max(n - 1, 1)
    lam = p.param.ssta_lambda
    scores = lam * similarity - (1 - lam) * redundancy[..., None, :]
    chosen = scores.topk(min(p.topk, n), dim=-1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, chosen, True)


def live_text_blocks(text_mask: torch.Tensor, p: Plan) -> torch.Tensor:
    """(B,) text blocks attended: those holding valid text (at least one), or all of them
    without the text mask. Padded slots inside the last of them are attended like valid ones."""
    blocks = p.text_blocks(text_mask.shape[1])
    if not p.param.attn_use_text_mask:
        return torch.full_like(text_mask[:, 0], blocks, dtype=torch.int32)
    valid = text_mask.sum(1, dtype=torch.int32)
    return torch.clamp((valid + p.block_size - 1) // p.block_size, min=1)


def block_lists(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., n) bool rows -> (the selected block indices ascending, (..., width) int32, each row
    padded with its last index, so a kernel walking the list fetches nothing new; their count)."""
    counts = mask.sum(-1)
    order = torch.argsort((~mask).to(torch.int32), dim=-1, stable=True)[..., :width]
    last = order.gather(-1, (counts[..., None] - 1).clamp(min=0))
    within = torch.arange(width, device=mask.device) < counts[..., None]
    return torch.where(within, order, last).to(torch.int32), counts.to(torch.int32)


# ---- the attention ---------------------------------------------------------------------------------

@torch.library.custom_op("hunyuan_tpu::block_sparse_attention", mutates_args=())
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_blocks: torch.Tensor,
                           kv_counts: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block-sparse attention: every query of q block i attends every token of the key blocks
    ``kv_blocks[b, h, i, :kv_counts[b, h, i]]``; scale 1/sqrt(D).

    q (B, N, nq*bs, D), k and v (B, N, nk*bs, D), kv_blocks (B, N, nq, K) int32, kv_counts
    (B, N, nq) int32 >= 1. Eagerly this is dense attention under the expanded block mask (a
    reference for small inputs); the JAX runtime overrides the op with a block-sparse kernel.
    """
    nk = k.shape[2] // block_size
    listed = torch.arange(kv_blocks.shape[-1], device=q.device) < kv_counts[..., None]
    blocks = (F.one_hot(kv_blocks.long(), nk).bool() & listed[..., None]).any(-2)
    tokens = blocks.repeat_interleave(block_size, -1).repeat_interleave(block_size, -2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=tokens)


@block_sparse_attention.register_fake
def _(q, k, v, kv_blocks, kv_counts, block_size):
    return torch.empty_like(q)


def selected_blocks(q_tiles: torch.Tensor, k_tiles: torch.Tensor, text_mask: torch.Tensor, p: Plan) -> torch.Tensor:
    """(B, N, n_img, n_img + n_txt) bool: the blocks each image tile's queries attend, from
    tiled q and k (B, n_img*bs, N, D) and the (B, S) text mask: window OR top-k, and the live
    text blocks."""
    b, _, heads, _ = q_tiles.shape
    n_img, n_txt = p.image_blocks, p.text_blocks(text_mask.shape[1])
    image = top_blocks(q_tiles, k_tiles, p) | torch.as_tensor(window_mask(p), device=q_tiles.device)
    text = torch.arange(n_txt, device=q_tiles.device) < live_text_blocks(text_mask, p)[:, None, None, None]
    return torch.cat([image.expand(b, heads, n_img, n_img), text.expand(b, heads, n_img, n_txt)], -1)


def list_width(p: Plan, text_blocks: int) -> int:
    """K: the most blocks an image tile can attend (window + top-k, capped, plus the text)."""
    widest_window = int(window_mask(p).sum(-1).max())
    return min(p.image_blocks, widest_window + p.topk) + text_blocks


def sparse_attention(
    img_q: torch.Tensor, img_k: torch.Tensor, img_v: torch.Tensor,
    txt_q: torch.Tensor, txt_k: torch.Tensor, txt_v: torch.Tensor,
    text_mask: torch.Tensor, p: Plan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSTA over [image, text]: img_* (B, L, N, D), txt_* (B, S, N, D), text_mask (B, S) bool
    with the valid slots first -> (image out (B, L, N, D), text out (B, S, N, D)).

    Text rows past the last live text block are not attended by anything the image depends on;
    they get the text rows' dense result here (the official kernel has them attend their own
    block only), so only the image output and the live text rows are the official values.
    """
    b, slots, heads, d = txt_q.shape
    n_img, n_txt, bs = p.image_blocks, p.text_blocks(slots), p.block_size
    q_tiles, k_tiles, v_tiles = (to_tiles(x, p) for x in (img_q, img_k, img_v))
    pad = n_txt * bs - slots
    k_txt, v_txt = (torch.cat([x, x[:, -1:].expand(b, pad, heads, d)], 1) for x in (txt_k, txt_v))
    keys = torch.cat([k_tiles, k_txt], 1).transpose(1, 2)
    values = torch.cat([v_tiles, v_txt], 1).transpose(1, 2)

    kv_blocks, kv_counts = block_lists(selected_blocks(q_tiles, k_tiles, text_mask, p), list_width(p, n_txt))
    img_out = block_sparse_attention(q_tiles.transpose(1, 2), keys, values, kv_blocks, kv_counts, bs)

    live_tokens = torch.arange(n_txt * bs, device=img_q.device) < live_text_blocks(text_mask, p)[:, None] * bs
    key_mask = torch.cat([torch.ones_like(live_tokens[:, :1]).expand(b, n_img * bs), live_tokens], 1)
    txt_out = F.scaled_dot_product_attention(txt_q.transpose(1, 2), keys, values, attn_mask=key_mask[:, None, None])
    return from_tiles(img_out.transpose(1, 2), p), txt_out.transpose(1, 2)
