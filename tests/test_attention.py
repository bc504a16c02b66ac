"""Attention backends against the xla reference, and the profiler/named-scope plumbing."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hunyuan_tpu import attention, parallel, pipeline
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.metrics import rel_l2
from hunyuan_tpu.params import random_params
from hunyuan_tpu.synthetic import stage1_embeddings

SHAPE = (3, 4, 7)  # 84 image tokens + text: no block size divides the joint length


@pytest.mark.parametrize("batch,heads,q_len,kv_len,dim,block", [
    (2, 4, 200, 200, 16, 128),  # padded keys at the end of sample 0, lengths not multiples of the block
    (1, 2, 130, 300, 32, 128),  # cross lengths
    (2, 8, 77, 77, 16, 512),    # blocks larger than the sequence shrink to it
])
def test_splash_matches_xla_with_padding(batch, heads, q_len, kv_len, dim, block):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((batch, heads, q_len, dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((batch, heads, kv_len, dim)), jnp.float32) for _ in range(2))
    mask = np.ones((batch, 1, 1, kv_len), bool)
    mask[0, ..., kv_len - 37:] = False
    mask[-1, ..., 5:9] = False  # not a suffix: segment ids take any pattern
    expected = attention.xla_attention(q, k, v, jnp.asarray(mask), dim ** -0.5)
    kernel = attention.kernel("splash", platform="cpu", block_q=block, block_kv=block)
    got = jax.jit(kernel, static_argnums=4)(q, k, v, jnp.asarray(mask), dim ** -0.5)
    assert got.shape == expected.shape
    assert rel_l2(got, expected) <= 1e-5


@pytest.mark.parametrize("kv_len,block", [(200, 64), (77, 512), (300, 128)])
def test_blocked_matches_xla(kv_len, block):
    """Key blocks the length does not divide, a block longer than the keys, masks of any pattern."""
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((2, 3, 90, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 3, kv_len, 16)), jnp.float32) for _ in range(2))
    mask = np.ones((2, 1, 1, kv_len), bool)
    mask[0, ..., kv_len - 37:] = False
    mask[1, ..., :40] = False  # a whole first block masked: the running max starts at a floor, not -inf
    expected = attention.xla_attention(q, k, v, jnp.asarray(mask), 0.25)
    got = jax.jit(attention.blocked_attention, static_argnums=(4, 5))(q, k, v, jnp.asarray(mask), 0.25, block)
    assert rel_l2(got, expected) <= 1e-6


def test_backend_choice():
    assert attention.kernel("auto", platform="cpu") is attention.blocked_attention
    assert attention.kernel("auto", platform="gpu") is attention.cudnn_attention
    assert attention.kernel("auto", platform="gpu", dtype=jnp.float32) is attention.blocked_attention
    with pytest.raises(ValueError, match="attention cudnn needs bfloat16 or float16"):
        attention.kernel("cudnn", platform="gpu", dtype=jnp.float32)
    assert attention.kernel("xla", platform="tpu") is attention.xla_attention
    with pytest.raises(ValueError, match="attention cudnn needs a GPU"):
        attention.kernel("cudnn", platform="cpu")
    with pytest.raises(ValueError, match="attention 'flash' is not one of"):
        attention.kernel("flash", platform="cpu")


def test_cudnn_call_with_any_key_mask_matches_xla():
    """The cuDNN path's call (keys sorted valid-first, the mask as key lengths) through XLA's
    implementation of the same API: equal to the reference for masks that are not a prefix."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 4, 90, 16)), jnp.float32) for _ in range(3))
    mask = np.ones((2, 1, 1, 90), bool)
    mask[0, ..., 60:70] = False  # image-token padding in the middle, as sequence parallelism makes
    mask[1, ..., 80:] = False
    expected = attention.xla_attention(q, k, v, jnp.asarray(mask), 0.25)
    got = attention.cudnn_attention(q, k, v, jnp.asarray(mask), 0.25, implementation="xla")
    assert rel_l2(got, expected) <= 1e-5


def _denoise(kernel, strategy=None, mesh_spec=None):
    cfg = DiTConfig.preset("tiny")
    emb = {k: v.numpy() for k, v in stage1_embeddings(cfg, latent_hw=SHAPE[1:], seed=2).items()}
    conditions = pipeline.build_conditions(emb, task="t2v", shape=SHAPE, cfg=True)
    settings = pipeline.SamplingSettings(num_inference_steps=2, guidance_scale=4.0)
    placement = parallel.placement(cfg, strategy, mesh_spec, batch=2) if strategy else parallel.Placement()
    params = random_params(cfg, torch.float32, seed=1, shardings=placement.params)
    denoiser = pipeline.Denoiser(cfg, params, conditions, settings, placement=placement, attention=kernel)
    return denoiser, pipeline.denoise(denoiser, pipeline.initial_noise(0, SHAPE), progress=False).latents


def test_model_with_splash_matches_xla_on_one_and_eight_devices():
    _, reference = _denoise(attention.xla_attention)
    splash = attention.kernel("splash", platform="cpu", block_q=128, block_kv=128)
    _, single = _denoise(splash)
    _, sharded = _denoise(splash, "sp", "dp=2,sp=4")  # the kernel runs per device under shard_map
    assert rel_l2(single, reference) <= 1e-5 and rel_l2(sharded, reference) <= 1e-5


def test_trace_names_the_phases():
    denoiser, _ = _denoise(attention.xla_attention)
    scopes = set(re.findall(r'op_name="jit\(step\)/([\w/]+)', denoiser.compiled.as_text()))
    for phase in ("dit/embed", "dit/blocks/double_blocks_0_to_1/while/body", "dit/final_layer", "scheduler"):
        assert any(s.startswith(phase) for s in scopes), (phase, sorted(scopes)[:20])
    assert any(s.startswith("dit/blocks/double_blocks_0_to_1/while/body") and "/double_block/" in s for s in scopes)
