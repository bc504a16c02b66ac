"""The DiT under torchax + jax.jit against eager PyTorch."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
import torch

from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.metrics import rel_l2
from hunyuan_tpu.model import HunyuanVideo15DiT
from hunyuan_tpu.random_init import randomize_like_trained_
from hunyuan_tpu.runtime import jax_view, torchax_env
from hunyuan_tpu.synthetic import random_inputs

CASES = {"t2v": {}, "i2v": {"vision_len": 7}, "meanflow": {"vision_len": 7, "meanflow": True}}


def _model(meanflow: bool) -> HunyuanVideo15DiT:
    cfg = dataclasses.replace(DiTConfig.preset("tiny"), use_meanflow=meanflow)
    return randomize_like_trained_(HunyuanVideo15DiT(cfg).eval(), seed=5)


@pytest.mark.parametrize("case", CASES)
def test_jit_matches_eager(case):
    model = _model(case == "meanflow")
    inputs = random_inputs(model.config, batch=2, latent=(2, 6, 4), seed=6, **CASES[case])
    with torch.no_grad():
        expected = model(**inputs)
    params, apply = jax_view(model)
    forward = jax.jit(apply)
    jax_inputs = {k: jnp.asarray(v.numpy()) for k, v in inputs.items()}
    got = forward(params, **jax_inputs)
    assert got.shape == tuple(expected.shape) and got.dtype == jnp.float32
    assert rel_l2(got, expected) <= 1e-5

    bf16 = lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    params16 = jax.tree.map(bf16, params)
    states16 = {k: bf16(v) if k.endswith("states") or k == "x" else v for k, v in jax_inputs.items()}
    got16 = forward(params16, **states16)
    assert got16.dtype == jnp.bfloat16
    assert rel_l2(got16, expected) <= 2e-2


def test_env_is_created_once():
    assert torchax_env() is torchax_env()
