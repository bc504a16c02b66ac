"""DeepCache: the schedule, the cut forward, the two compiled steps, and the cache on a mesh."""

import dataclasses
import functools
import re

import numpy as np
import pytest
import torch

import sharding
from hunyuan_tpu import hlo, parallel, pipeline
from hunyuan_tpu.cache import CacheSchedule
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.files import InputError
from hunyuan_tpu.metrics import rel_l2
from hunyuan_tpu.model import HunyuanVideo15DiT
from hunyuan_tpu.params import random_params
from hunyuan_tpu.random_init import randomize_like_trained_
from hunyuan_tpu.synthetic import random_inputs, stage1_embeddings

DEPTH = 4
SHAPE = (3, 4, 7)  # 84 image tokens: sp=8 pads them, so cached streams carry padding too
STEPS = 8
CACHE = CacheSchedule(start=2, end=7, interval=3, keep_blocks=1)  # full 0 1 2 5 7, cached 3 4 6


def _formula(start: int, end: int, interval: int, total: int) -> list[int]:
    return sorted({*range(start), *range(start, end, interval), *range(end, total)})


@pytest.mark.parametrize("start,end,interval,total", [
    (11, 45, 4, 50), (0, 50, 1, 50), (0, 50, 7, 50), (5, 20, 3, 30), (10, 10, 4, 20), (3, 12, 2, 12),
])
def test_full_steps_follow_the_formula(start, end, interval, total):
    assert CacheSchedule(start, end, interval).full_steps(total) == _formula(start, end, interval, total)


def test_defaults_are_the_official_ones():
    assert len(CacheSchedule().full_steps(50)) == 25 and CacheSchedule().split(54) == 53


@pytest.mark.parametrize("schedule,flag", [
    (CacheSchedule(start=20, end=10), "--cache_start_step 20 is after --cache_end_step 10"),
    (CacheSchedule(interval=0), "--cache_step_interval 0"),
    (CacheSchedule(end=60), "--cache_end_step 60 is past the last step"),
    (CacheSchedule(start=-1), "--cache_start_step -1"),
    (CacheSchedule(keep_blocks=0), "--cache_keep_blocks 0"),
    (CacheSchedule(keep_blocks=5), "--cache_keep_blocks 5"),
])
def test_invalid_schedules_name_the_setting(schedule, flag):
    """The library speaks of settings; a command line renders each as its flag."""
    with pytest.raises(InputError) as error:
        schedule.check(50, depth=DEPTH)
    assert flag.replace("--", "") in str(error.value)
    assert flag in error.value.render(lambda name: f"--{name}")


@torch.no_grad()
@pytest.mark.parametrize("split", [0, 2, DEPTH - 1])
def test_cut_forward_resumes_where_it_stopped(split):
    """Streams saved at block k and fed back at the same timestep give the full forward's output."""
    cfg = dataclasses.replace(DiTConfig.preset("tiny"), mm_double_blocks_depth=DEPTH)
    model = randomize_like_trained_(HunyuanVideo15DiT(cfg).eval(), seed=5)
    inputs = random_inputs(cfg, latent=(2, 4, 6), vision_len=5, seed=2)
    whole = model(**inputs)
    velocity, streams = model(**inputs, split=split)
    assert streams[0].shape == (2, 48, cfg.hidden_size) and torch.isfinite(whole).all()
    torch.testing.assert_close(velocity, whole, rtol=0, atol=0)
    torch.testing.assert_close(model(**inputs, split=split, streams=streams), whole, rtol=1e-6, atol=1e-6)
    # at another timestep the skipped blocks are not recomputed: the output is not the full forward's
    later = {**inputs, "t": inputs["t"] * 0.5}
    assert rel_l2(model(**later, split=split, streams=streams), model(**later)) > 1e-4 or split == 0


@functools.cache
def run(cache: CacheSchedule | None, strategy: str | None = None, mesh_spec: str | None = None):
    cfg = dataclasses.replace(DiTConfig.preset("tiny"), mm_double_blocks_depth=DEPTH)
    emb = {k: v.numpy() for k, v in stage1_embeddings(cfg, latent_hw=SHAPE[1:], seed=1).items()}
    conditions = pipeline.build_conditions(emb, task="t2v", shape=SHAPE, cfg=True)
    settings = pipeline.SamplingSettings(num_inference_steps=STEPS, guidance_scale=5.0)
    placement = parallel.Placement()
    if strategy is not None:
        placement = parallel.placement(cfg, strategy, mesh_spec, batch=2)
    params = random_params(cfg, torch.float32, seed=3, shardings=placement.params)
    denoiser = pipeline.Denoiser(cfg, params, conditions, settings, placement=placement, cache=cache)
    result = pipeline.denoise(denoiser, pipeline.initial_noise(0, SHAPE), progress=False)
    return denoiser, result


def test_schedule_without_cached_steps_gives_the_uncached_latents():
    _, plain = run(None)
    for schedule in (CacheSchedule(start=STEPS, end=STEPS), CacheSchedule(start=0, end=STEPS, interval=1)):
        _, cached = run(schedule)
        assert all(cached.full)
        np.testing.assert_array_equal(cached.latents, plain.latents)


def test_cached_steps_run_as_scheduled_and_change_the_result():
    _, plain = run(None)
    _, cached = run(CACHE)
    assert [i for i, full in enumerate(cached.full) if full] == _formula(2, 7, 3, STEPS)
    assert np.isfinite(cached.latents).all()
    assert 1e-4 < rel_l2(cached.latents, plain.latents) < 0.5


def test_cached_step_computes_only_the_kept_blocks():
    denoiser, _ = run(dataclasses.replace(CACHE, keep_blocks=2))
    # the blocks run as loops over ranges of layers, each in its scope "double_blocks_<first>_to_<last>"
    scopes = lambda compiled: set(re.findall(r"/dit/(?:blocks/)?(\w+)", compiled.as_text()))  # noqa: E731
    assert {"double_blocks_0_to_1", "double_blocks_2_to_3", "final_layer"} <= scopes(denoiser.compiled)
    cached = scopes(denoiser.compiled_cached)
    assert {"double_blocks_2_to_3", "final_layer"} <= cached
    assert "double_blocks_0_to_1" not in cached
    # nothing is embedded either: the cached step costs less than its share of the blocks (matmul
    # FLOPs with each loop iteration counted; XLA's cost analysis counts a loop body once)
    flops = lambda compiled: hlo.dot_flops(compiled.as_text())  # noqa: E731
    assert flops(denoiser.compiled_cached) < 0.5 * flops(denoiser.compiled)


@pytest.mark.parametrize("strategy,mesh_spec", [("tp", "tp=8"), ("tp_fc2_replicated", "tp=8"), ("sp", "sp=8"),
                                               ("fsdp", "dp=2,fsdp=4")])
def test_cache_on_a_mesh_matches_one_device(strategy, mesh_spec):
    denoiser, sharded = run(CACHE, strategy, mesh_spec)
    _, single = run(CACHE)
    assert sharded.full == single.full
    assert rel_l2(sharded.latents, single.latents) <= 1e-5
    # the streams stay laid out like the residual streams between blocks
    strat = sharding.get(strategy)
    img, txt = denoiser.compiled.output_shardings[1]
    assert img.spec == strat.activations[sharding.IMG] and txt.spec == strat.activations[sharding.TXT]
    assert denoiser.compiled_cached.input_shardings[0][4] == denoiser.compiled.output_shardings[1]


def test_starting_at_a_cached_step_is_refused():
    denoiser, _ = run(CACHE)
    with pytest.raises(ValueError, match="step 3 is a cached step"):
        pipeline.denoise(denoiser, pipeline.initial_noise(0, SHAPE), start_step=3, progress=False)
    with pytest.raises(ValueError, match="step 4 is a cached step, but no full step"):
        denoiser.step(denoiser.place(pipeline.initial_noise(0, SHAPE)), 4)
