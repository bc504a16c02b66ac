"""SSTA (the sparse checkpoints' attention) against a transcription of the official code
(``ssta_reference``): the block selection, the attention, the whole DiT, the JAX kernels on one
device and on every sharding strategy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ssta_reference as official
from hunyuan_tpu import attention, parallel, pipeline, ssta
from hunyuan_tpu.config import DiTConfig, SparseAttention
from hunyuan_tpu.metrics import rel_l2
from hunyuan_tpu.model import Execution, HunyuanVideo15DiT, joint_attention
from hunyuan_tpu.params import random_params
from hunyuan_tpu.random_init import randomize_like_trained_
from hunyuan_tpu.runtime import jax_view, tracing
from hunyuan_tpu.synthetic import random_inputs, stage1_embeddings

# (grid, attn_param): each case makes a different rule matter
CASES = {
    # a canvas no tile divides, 4 tiles on the long axis (a 3x3x3 window is not everything)
    "uneven": ((5, 6, 9), SparseAttention(tile_size=(2, 2, 2), ssta_topk=6)),
    # more than 31 frames: top-k is not halved
    "long": ((33, 2, 3), SparseAttention(tile_size=(4, 2, 2), ssta_topk=3)),
    # one frame: the 2D tile of the same block size (16 -> 1x4x4) and no window
    "one_frame": ((1, 12, 20), SparseAttention(tile_size=(2, 2, 4), ssta_topk=4)),
    "no_text_mask": ((5, 6, 9), SparseAttention(tile_size=(1, 2, 2), ssta_topk=8, attn_use_text_mask=False)),
    "shared_heads": ((5, 6, 9), SparseAttention(tile_size=(1, 2, 2), ssta_topk=8, attn_mask_share_within_head=True)),
}


def _qkv(grid, text_slots=13, valid=(3, 13), heads=2, dim=8, seed=0):
    """Random (B, L + S, N, D) q, k, v and a (B, S) text mask, valid slots first."""
    g = torch.Generator().manual_seed(seed)
    length = int(np.prod(grid)) + text_slots
    q, k, v = (torch.randn(len(valid), length, heads, dim, generator=g) for _ in range(3))
    text_mask = torch.arange(text_slots)[None] < torch.tensor(valid)[:, None]
    return q, k, v, text_mask


@pytest.mark.parametrize("case", list(CASES))
def test_selected_blocks_are_the_official_mask(case):
    grid, param = CASES[case]
    q, k, _, text_mask = _qkv(grid)
    p = ssta.plan(param, grid)
    tokens = int(np.prod(grid))
    ours = ssta.selected_blocks(ssta.to_tiles(q[:, :tokens], p), ssta.to_tiles(k[:, :tokens], p), text_mask, p)
    theirs = official.official_block_mask(
        q.transpose(1, 2), k.transpose(1, 2), grid, text_mask.shape[1], text_mask if param.attn_use_text_mask else None,
        topk=p.topk, tile_thw=p.tile, kernel_thw=p.window, lambda_=param.ssta_lambda,
        share_within_head=param.attn_mask_share_within_head)
    n_img = p.image_blocks
    assert torch.equal(ours, theirs[:, :, :n_img].expand_as(ours))
    assert not ours[..., :n_img].all(), "the case must be sparse"
    kv_blocks, counts = ssta.block_lists(ours, ssta.list_width(p, p.text_blocks(13)))
    assert torch.equal(counts, ours.sum(-1).int())
    rebuilt = torch.zeros_like(ours).scatter(-1, kv_blocks.long(), True)
    assert torch.equal(rebuilt, ours)


def test_plan_follows_the_official_rules():
    param = SparseAttention()
    assert ssta.plan(param, (31, 45, 80)).topk == 32 and ssta.plan(param, (32, 45, 80)).topk == 64
    image = ssta.plan(param, (1, 45, 80))
    assert image.tile == (1, 16, 24) and image.window == (1, 1, 1) and image.topk == 64
    with pytest.raises(ValueError, match="one-frame canvas needs a block of"):
        ssta.plan(SparseAttention(tile_size=(1, 2, 2)), (1, 8, 8))
    assert ssta.plan(param, (31, 45, 80)).tiles == (6, 6, 10)


def _official_sparse(img_q, img_k, img_v, txt_q, txt_k, txt_v, text_mask, plan):
    """``Execution.sparse_attention`` by the official code (the raw attn_param and canvas, so
    the one-frame and short-video rules are the official code's too)."""
    q, k, v = (torch.cat(pair, 1) for pair in ((img_q, txt_q), (img_k, txt_k), (img_v, txt_v)))
    out = official.official_flex_block_attn(q, k, v, plan.grid, text_mask, plan.param.to_official())
    return out.split([img_q.shape[1], txt_q.shape[1]], 1)


@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_the_official(case):
    grid, param = CASES[case]
    q, k, v, text_mask = _qkv(grid)
    tokens = int(np.prod(grid))
    p = ssta.plan(param, grid)
    split = lambda x: (x[:, :tokens], x[:, tokens:])  # noqa: E731
    (iq, tq), (ik, tk), (iv, tv) = split(q), split(k), split(v)
    ours = ssta.sparse_attention(iq, ik, iv, tq, tk, tv, text_mask, p)
    theirs = _official_sparse(iq, ik, iv, tq, tk, tv, text_mask, p)
    assert rel_l2(ours[0], theirs[0]) <= 1e-5
    # text rows of live blocks are official too (rows past the cut reach nothing)
    live = ssta.live_text_blocks(text_mask, p) * p.block_size
    for b in range(len(text_mask)):
        rows = slice(0, int(live[b]))
        assert rel_l2(ours[1][b, rows], theirs[1][b, rows]) <= 1e-5


# ---- the whole DiT ---------------------------------------------------------------------------------

DIT_GRID = (5, 6, 9)


def _dit_config(**param) -> DiTConfig:
    sparse = SparseAttention(tile_size=(1, 2, 2), ssta_topk=8, **param)
    return dataclasses.replace(DiTConfig.preset("tiny"), mm_double_blocks_depth=4, attn_mode="flex-block-attn",
                               attn_param=sparse)


def _dit_inputs(cfg: DiTConfig, task: str) -> dict:
    """Two samples with different text lengths; t2v with the official masked vision tokens."""
    inputs = random_inputs(cfg, latent=DIT_GRID, text_len=18, byt5_len=6, vision_len=5, seed=1)
    if task == "t2v":
        inputs["vision_states"] = torch.zeros_like(inputs["vision_states"])
        inputs["vision_mask"] = torch.zeros(2, 5, dtype=torch.long)
    return inputs


@pytest.mark.parametrize("task,param", [("t2v", {}), ("i2v", {}), ("t2v", {"win_type": "hybrid", "win_ratio": 2})])
def test_dit_matches_the_official_attention(task, param):
    cfg = _dit_config(**param)
    model = randomize_like_trained_(HunyuanVideo15DiT(cfg), seed=0)
    reference = HunyuanVideo15DiT(cfg, Execution(sparse_attention=_official_sparse))
    reference.load_state_dict(model.state_dict())
    dense = HunyuanVideo15DiT(cfg.dense())
    dense.load_state_dict(model.state_dict())
    inputs = _dit_inputs(cfg, task)
    with torch.no_grad():
        ours, theirs, full = model(**inputs), reference(**inputs), dense(**inputs)
    assert torch.isfinite(ours).all()
    assert rel_l2(ours, theirs) <= 1e-5
    assert rel_l2(ours, full) >= 1e-3, "sparse attention must change this model's output"
    if param:
        dense_blocks = [i for i in range(4) if official.official_uses_dense(i, 4, cfg.attn_param.to_official())]
        assert dense_blocks == [1, 3] == [i for i in range(4) if cfg.attn_param.dense_at(i, 4)]


def test_padded_rows_are_zero_and_masked_vision_keeps_its_type_embedding():
    """What SSTA can see of padded slots: dense attention leaves their rows zero (the official
    flash kernel's output), and masked vision tokens hold the vision type embedding, placed
    right after the valid text (the official t2v order)."""
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(2, 7, 2, 4, generator=g) for _ in range(6)]
    key_mask = torch.ones(2, 10, dtype=torch.bool)
    key_mask[0, 8:] = False
    img, txt = joint_attention(tuple(qkv[:3]), (qkv[3][:, :3], qkv[4][:, :3], qkv[5][:, :3]), key_mask,
                               zero_masked_rows=True)
    assert (txt[0, 1:] == 0).all() and (txt[0, 0] != 0).all() and (txt[1] != 0).all()
    hybrid = HunyuanVideo15DiT(_dit_config(win_type="hybrid", win_ratio=2))
    dense_runs = [attend for part, attend in hybrid._attention_runs(range(4), DIT_GRID) if part.start in (1, 3)]
    assert len(dense_runs) == 2 and all(attend.keywords == {"zero_masked_rows": True} for attend in dense_runs)

    cfg = DiTConfig.preset("tiny")
    model = randomize_like_trained_(HunyuanVideo15DiT(cfg), seed=0)
    inputs = _dit_inputs(cfg, "t2v")
    tokens, mask = model.embed_text(inputs["t"], inputs["text_states"], inputs["text_mask"], inputs["byt5_states"],
                                    inputs["byt5_mask"], inputs["vision_states"], inputs["vision_mask"])
    valid = int(mask[1].sum())
    vision = model.cond_type_embedding.weight[2]
    assert torch.allclose(tokens[1, valid:valid + 5], vision.expand(5, -1))
    assert (tokens[1, valid + 5:] == 0).all()


# ---- JAX ---------------------------------------------------------------------------------------

def test_kernels_match_dense_masked_attention():
    rng = np.random.default_rng(0)
    b, n, bs, d, nq, nk, width = 2, 3, 8, 16, 5, 7, 4
    q = jnp.asarray(rng.standard_normal((b, n, nq * bs, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, n, nk * bs, d)), jnp.float32) for _ in range(2))
    mask = rng.random((b, n, nq, nk)) < 0.4
    mask[..., 0] = True
    counts = np.minimum(mask.sum(-1), width)
    mask &= np.cumsum(mask, -1) <= width  # at most `width` blocks a row
    lists = np.stack([np.resize(np.flatnonzero(row), width) for row in mask.reshape(-1, nk)])
    lists = np.where(np.arange(width) < counts.reshape(-1, 1), lists, np.take_along_axis(
        lists, counts.reshape(-1, 1) - 1, 1)).reshape(b, n, nq, width)
    tokens = np.repeat(np.repeat(mask, bs, -1), bs, -2)
    expected = attention.xla_attention(q, k, v, jnp.asarray(tokens), d ** -0.5)
    for kernel in (attention.block_sparse_xla, attention.block_sparse_pallas(interpret=True),
                   attention.block_sparse_pallas(interpret=True, blocks_per_step=3)):
        got = jax.jit(kernel, static_argnums=(5, 6))(q, k, v, jnp.asarray(lists), jnp.asarray(counts), bs, d ** -0.5)
        assert rel_l2(got, expected) <= 1e-5


@pytest.mark.parametrize("kernel", ["xla", "pallas"])
def test_jitted_dit_equals_eager(kernel):
    # two blocks, one sparse and one dense: the interpreted Pallas kernel runs slowly on CPU, so
    # it runs once (the 4-block model's sparse blocks are the same program twice)
    cfg = dataclasses.replace(_dit_config(win_type="hybrid", win_ratio=2), mm_double_blocks_depth=2)
    assert [cfg.attn_param.dense_at(i, 2) for i in range(2)] == [False, True]
    model = randomize_like_trained_(HunyuanVideo15DiT(cfg), seed=0)
    inputs = _dit_inputs(cfg, "t2v")
    with torch.no_grad():
        expected = model(**inputs).numpy()
    params, apply = jax_view(model)
    args = {name: jnp.asarray(value.numpy()) for name, value in inputs.items()}
    with tracing(sparse=attention.sparse_kernel(kernel, platform="cpu")):
        got = jax.jit(lambda p, a: apply(p, **a))(params, args)
    assert rel_l2(np.asarray(got), expected) <= 1e-5


SHARDED = {"replicated": "tp=8", "tp": "tp=8", "tp_fc2_replicated": "tp=8", "sp": "sp=8", "fsdp": "fsdp=8",
           "tp_dp": ("tp", "dp=2,tp=4")}


def _denoised(strategy: str | None) -> np.ndarray:
    cfg = dataclasses.replace(DiTConfig.preset("tiny_sparse"), mm_double_blocks_depth=2)
    shape = (3, 4, 7)
    emb = {k: v.numpy() for k, v in stage1_embeddings(cfg, latent_hw=shape[1:], seed=1).items()}
    conditions = pipeline.build_conditions(emb, task="t2v", shape=shape, cfg=True, model=cfg)
    placement = parallel.Placement()
    if strategy is not None:
        name, mesh = SHARDED[strategy] if isinstance(SHARDED[strategy], tuple) else (strategy, SHARDED[strategy])
        placement = parallel.placement(cfg, name, mesh, batch=2)
    params = random_params(cfg, torch.float32, seed=3, shardings=placement.params)
    settings = pipeline.SamplingSettings(num_inference_steps=2, guidance_scale=5.0)
    denoiser = pipeline.Denoiser(cfg, params, conditions, settings, placement=placement)
    return pipeline.denoise(denoiser, pipeline.initial_noise(0, shape), progress=False).latents


def test_every_strategy_gives_the_one_device_result():
    one = _denoised(None)
    assert np.isfinite(one).all()
    for strategy in SHARDED:
        assert rel_l2(_denoised(strategy), one) <= 1e-5, strategy
