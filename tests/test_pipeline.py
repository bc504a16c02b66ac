"""The jitted denoising loop against an eager loop built from diffusers' scheduler and the torch model."""

import dataclasses

import numpy as np
import pytest
import torch

import compiles
from hunyuan_tpu import pipeline
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.files import InputError
from hunyuan_tpu.metrics import rel_l2
from hunyuan_tpu.model import HunyuanVideo15DiT
from hunyuan_tpu.random_init import randomize_like_trained_
from hunyuan_tpu.runtime import jax_view, torchax_env
from hunyuan_tpu.synthetic import stage1_embeddings

diffusers = pytest.importorskip("diffusers")
SHAPE = (3, 4, 6)  # latent T, H, W


def _denoiser(model, conditions, settings, dtype=torch.float32):
    params, _ = jax_view(model, dtype)
    return pipeline.Denoiser(model.config, params, conditions, settings)


def _setup(task: str, meanflow: bool = False, guidance: float = 4.0, steps: int = 5):
    cfg = dataclasses.replace(DiTConfig.preset("tiny"), use_meanflow=meanflow)
    model = randomize_like_trained_(HunyuanVideo15DiT(cfg).eval(), seed=11)
    emb = {k: v.numpy() for k, v in stage1_embeddings(cfg, task=task, latent_hw=SHAPE[1:], seed=3).items()}
    settings = pipeline.SamplingSettings(num_inference_steps=steps, guidance_scale=guidance, flow_shift=5.0)
    return model, emb, settings


@torch.no_grad()
def _eager_reference(model, emb, task, settings, noise):
    """CFG + Euler written out with diffusers' scheduler and the eager torch model."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=settings.flow_shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, settings.num_inference_steps + 1)[:-1])
    cond = torch.zeros(1, 33, *SHAPE)
    if task == "i2v":
        cond[:, :32, 0] = torch.from_numpy(emb["image_cond_latents"][:, :, 0])
        cond[:, 32, 0] = 1
    cfg = settings.guidance_scale > 1
    both = lambda key: torch.from_numpy(  # noqa: E731
        np.concatenate([emb["negative_" + key], emb[key]]) if cfg else emb[key])
    batch = 2 if cfg else 1
    vision = torch.from_numpy(emb["vision_states"]).repeat(batch, 1, 1) if task == "i2v" else None
    latents = torch.from_numpy(noise)
    for i, t in enumerate(sched.timesteps):
        x = torch.cat([latents, cond], dim=1).repeat(batch, 1, 1, 1, 1)
        t_r = (sched.sigmas[i + 1] * 1000).repeat(batch) if model.config.use_meanflow else None
        v = model(x, t.repeat(batch), both("prompt_embeds"), both("prompt_mask"), both("prompt_embeds_2"),
                  both("prompt_mask_2"), vision, t_r)
        if cfg:
            v = v[:1] + settings.guidance_scale * (v[1:] - v[:1])
        latents = sched.step(v, t, latents).prev_sample
    return latents.numpy()


@pytest.mark.parametrize("task,meanflow,guidance", [("t2v", False, 4.0), ("i2v", False, 4.0), ("i2v", True, 1.0)])
def test_loop_matches_eager_reference(task, meanflow, guidance):
    model, emb, settings = _setup(task, meanflow, guidance)
    noise = pipeline.initial_noise(42, SHAPE)
    expected = _eager_reference(model, emb, task, settings, noise)
    conditions = pipeline.build_conditions(emb, task=task, shape=SHAPE, cfg=settings.cfg)
    result = pipeline.denoise(_denoiser(model, conditions, settings), noise, progress=False)
    assert result.latents.dtype == np.float32 and result.latents.shape == (1, 32, *SHAPE)
    assert rel_l2(result.latents, expected) <= 1e-5


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_compiled_once_for_five_steps(task):
    torchax_env()  # the process's one-time torchax set-up is not part of a run
    model, emb, settings = _setup(task)
    with compiles.recorded() as compiled:
        conditions = pipeline.build_conditions(emb, task=task, shape=SHAPE, cfg=True)
        denoiser = _denoiser(model, conditions, settings, torch.bfloat16)
        result = pipeline.denoise(denoiser, pipeline.initial_noise(0, SHAPE), progress=False)
    assert len(result.step_seconds) == 5
    # the step, once; besides it only the one-time stacking of the block weights by layer
    assert compiled.count("jit(step)") == 1 and set(compiled) <= {"jit(step)", "jit(_stack)"}
    assert result.latents.dtype == np.float32 and np.isfinite(result.latents).all()


def test_trimmed_padding_gives_the_same_latents():
    """A dense model's image does not see padded slots: trimmed conditions (the LLM's 300 slots,
    225 valid, kept to 256: a multiple of TEXT_BUCKET), and the sparse models' (no slot dropped,
    t2v's masked vision tokens added), give the same latents."""
    model, _, settings = _setup("t2v", steps=3)
    emb = {k: v.numpy() for k, v in stage1_embeddings(model.config, latent_hw=SHAPE[1:], text_len=300, seed=3).items()}
    noise = pipeline.initial_noise(1, SHAPE)
    outs = []
    for sparse in (False, True):
        conditions = pipeline.build_conditions(emb, task="t2v", shape=SHAPE, cfg=True,
                                               model=DiTConfig.preset("tiny_sparse") if sparse else None)
        outs.append(pipeline.denoise(_denoiser(model, conditions, settings), noise, progress=False).latents)
        assert conditions["prompt_embeds"].shape[1] == (300 if sparse else 2 * pipeline.TEXT_BUCKET)
        assert conditions["prompt_embeds_2"].shape[1] == 16  # under one bucket: all 16 slots stay
        assert ("vision_mask" in conditions) == sparse
    assert conditions["vision_states"].shape == (2, pipeline.T2V_VISION_TOKENS, 48)
    assert not conditions["vision_mask"].any()
    assert rel_l2(outs[0], outs[1]) <= 1e-6


def test_official_buckets_and_defaults(tmp_path):
    assert pipeline.bucket_size("480p", "16:9") == (480, 848)
    assert pipeline.bucket_size("720p", "16:9") == (720, 1280)
    assert pipeline.bucket_size("480p", "9:16") == (848, 480)
    assert pipeline.bucket_size("720p", "1:1") == (960, 960)
    assert pipeline.latent_shape(121, 720, 1280) == (31, 45, 80)
    assert pipeline.latent_shape(121, 480, 848) == (31, 30, 53)
    assert pipeline.default_sampling(DiTConfig.preset("720p_t2v")).flow_shift == 9.0
    assert pipeline.default_sampling(DiTConfig.preset("720p_i2v")).flow_shift == 7.0
    assert pipeline.default_sampling(DiTConfig.preset("480p_i2v")) == pipeline.SamplingSettings(50, 6.0, 5.0)
    assert pipeline.default_sampling(DiTConfig.preset("480p_i2v_step_distilled")) == pipeline.SamplingSettings(12, 1.0, 7.0)
    # the distilled checkpoints share their base's configuration: the variant's name decides
    for variant in ("720p_t2v_distilled", "720p_t2v_distilled_sparse"):
        assert pipeline.default_sampling(DiTConfig.preset(variant), variant) == pipeline.SamplingSettings(50, 1.0, 9.0)
    assert pipeline.default_sampling(DiTConfig.preset("720p_i2v_distilled_sparse")).guidance_scale == 1.0
    assert pipeline.released_variant("720p_i2v_distilled") == "720p_i2v_distilled"
    checkpoint = tmp_path / "transformer" / "480p_t2v_distilled" / "model.safetensors"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.touch()
    assert pipeline.released_variant(str(checkpoint)) == "480p_t2v_distilled"
    assert pipeline.released_variant("tiny") is None


@pytest.mark.parametrize("call,message", [
    (lambda: pipeline.latent_shape(50, 480, 848), "4k\\+1"),
    (lambda: pipeline.latent_shape(49, 100, 848), "^height 100 must be a positive multiple of 16"),
    (lambda: pipeline.bucket_size("480p", "wide"), "aspect_ratio 'wide'"),
    (lambda: pipeline.bucket_size("4k", "16:9"), "resolution '4k'"),
])
def test_bad_sizes(call, message):
    with pytest.raises(InputError, match=message):
        call()
