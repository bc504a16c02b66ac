"""The feature caches: schedules, the cut forward, each cache against the official helpers'
semantics on the eager model, two executables per run, resume, and the caches on a mesh."""

import dataclasses
import functools
import json
import re

import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec

import cache_reference
import compiles
import sharding
from hunyuan_tpu import hlo, parallel, pipeline
from hunyuan_tpu.cache import (
    Calibration, DeepCache, MagCache, MagCacheCalibration, NoCache, Schedule, TaylorCache, TeaCache,
    magcache_schedule, read_calibration, split_frequencies, write_calibration,
)
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
SCHEDULE = Schedule(start=2, end=7, interval=3)  # full 0 1 2 5 7, cached 3 4 6
CFG = dataclasses.replace(DiTConfig.preset("tiny"), mm_double_blocks_depth=DEPTH)
SPARSE = dataclasses.replace(DiTConfig.preset("tiny_sparse"), mm_double_blocks_depth=DEPTH)
# calibrated ratios under which MagCache at 0.3 caches steps 1, 3, 4, 6 and 7
RATIOS = (1.0, 1.2, 1.05, 1.02, 0.8, 1.01, 0.9, 0.95)
CALIBRATION = Calibration(RATIOS, "tiny", None, "digest", 5.0, 5.0)
CACHES = {
    "deepcache": DeepCache(SCHEDULE, keep_blocks=2),
    "teacache": TeaCache(SCHEDULE),
    # the bands' orders differ, so that their split matters (with equal orders it cancels out)
    "taylorcache": TaylorCache(SCHEDULE, low_freqs_order=2, high_freqs_order=1),
    "magcache": MagCache(CALIBRATION, threshold=0.3),
}


def _formula(start: int, end: int, interval: int, total: int) -> list[int]:
    return sorted(cache_reference.official_full_steps(start, end, interval, total))


@pytest.mark.parametrize("start,end,interval,total", [
    (11, 45, 4, 50), (0, 50, 1, 50), (0, 50, 7, 50), (5, 20, 3, 30), (10, 10, 4, 20), (3, 12, 2, 12),
])
def test_full_steps_follow_the_formula(start, end, interval, total):
    for cache in (DeepCache(Schedule(start, end, interval)), TeaCache(Schedule(start, end, interval))):
        assert cache.full_steps(total) == _formula(start, end, interval, total)


def test_defaults_are_the_official_ones():
    assert len(DeepCache().full_steps(50)) == 25 and DeepCache().keep_blocks == 1
    assert TaylorCache().full_steps(50) == DeepCache().full_steps(50)
    taylor = TaylorCache()
    assert (taylor.max_order, taylor.low_freqs_order, taylor.high_freqs_order, taylor.cutoff_ratio) == (2, 2, 2, 0.1)
    assert (MagCache.threshold, MagCache.max_skips, MagCache.retention_ratio) == (0.24, 4, 0.2)


@pytest.mark.parametrize("cache,flag", [
    (DeepCache(Schedule(start=20, end=10)), "--cache_start_step 20 is after --cache_end_step 10"),
    (TeaCache(Schedule(interval=0)), "--cache_step_interval 0"),
    (TaylorCache(Schedule(end=60)), "--cache_end_step 60 is past the last step"),
    (DeepCache(Schedule(start=-1)), "--cache_start_step -1"),
    (DeepCache(keep_blocks=0), "--cache_keep_blocks 0"),
    (DeepCache(keep_blocks=5), "--cache_keep_blocks 5"),
    (TaylorCache(Schedule(start=0)), "--cache_start_step 0: TaylorCache needs two full steps"),
    (TaylorCache(max_order=-1), "--taylor_max_order -1"),
    (MagCache(CALIBRATION, threshold=-0.1), "--magcache_threshold -0.1"),
    (MagCache(CALIBRATION, max_skips=-1), "--magcache_max_skips -1"),
    (MagCache(CALIBRATION, retention_ratio=1.5), "--magcache_retention_ratio 1.5"),
    (MagCache(dataclasses.replace(CALIBRATION, ratios=RATIOS[:5])), "--magcache_calibration holds 5 steps"),
])
def test_invalid_settings_name_the_flag(cache, flag):
    """The library speaks of settings; a command line renders each as its flag."""
    with pytest.raises(InputError) as error:
        cache.check(50 if "holds" not in flag else STEPS, depth=DEPTH)
    assert flag.replace("--", "") in str(error.value)
    assert flag in error.value.render(lambda name: f"--{name}")


def test_magcache_schedule_accumulates_and_resets():
    # 20% of 8 steps: step 0 in full. Then (accumulated ratio, error): 1: (1.2, .2) cached; 2: (1.26,
    # .46) full; 3: (1.02, .02) cached; 4: (.816, .204) cached; 5: (.824, .38) full; 6: (.9, .1) and
    # 7: (.855, .245) cached
    assert magcache_schedule(RATIOS, 0.3, 4, 0.2) == (True, False, True, False, False, True, False, False)
    assert magcache_schedule(RATIOS, 0.0, 4, 0.2) == (True,) * 8  # a threshold of 0 caches nothing
    # at most 2 skips in a row; the first step runs in full even without retention (nothing to reuse)
    assert magcache_schedule(RATIOS, 10.0, 2, 0.0) == (True, False, False, True, False, False, True, False)
    assert magcache_schedule(RATIOS, 10.0, 2, 0.5) == (True,) * 4 + (False, False, True, False)


def test_calibration_file_round_trip_and_checks(tmp_path):
    path = tmp_path / "calibration.json"
    write_calibration(CALIBRATION, path)
    assert read_calibration(path) == CALIBRATION and not list(tmp_path.glob("*.partial"))
    run = dataclasses.replace(CALIBRATION, ratios=())
    CALIBRATION.check_run(run, path)
    with pytest.raises(InputError, match="calibrated with flow_shift=5.0, the run has 7.0"):
        CALIBRATION.check_run(dataclasses.replace(run, flow_shift=7.0), path)
    data = json.loads(path.read_text())
    for broken, message in (({**data, "version": 0}, "calibration version 0"),
                            ({**data, "format": "x"}, "not a MagCache calibration file"),
                            ({**data, "ratios": [1.0, float("nan")]}, "ratios must be finite and > 0"),
                            ({k: v for k, v in data.items() if k != "model"}, "entry missing or malformed"),
                            ("{not json", "not valid JSON"), ([1, 2], "expected a JSON object")):
        path.write_text(broken if isinstance(broken, str) else json.dumps(broken))
        with pytest.raises(InputError, match=message):
            read_calibration(path)


def test_frequency_bands_are_angelslims_and_skip_the_padding():
    x = torch.randn(2, 30, 8)
    low, high = cache_reference.fft_bands(x)
    padded = np.pad(x.numpy(), ((0, 0), (0, 2), (0, 0)), constant_values=7.0)
    ours = [np.asarray(b) for b in split_frequencies(padded, 30, 0.1)]
    np.testing.assert_allclose(ours[0][:, :30], low.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours[1][:, :30], high.numpy(), atol=1e-5)
    assert not ours[0][:, 30:].any() and not ours[1][:, 30:].any()
    assert np.abs(low.numpy()).max() > 0.1 and np.abs(high.numpy()).max() > 0.1  # both bands carry signal


@torch.no_grad()
@pytest.mark.parametrize("cfg", [CFG, SPARSE], ids=["dense", "sparse"])
def test_cut_forward_saves_and_resumes_where_it_stopped(cfg):
    """Streams saved at block k and fed back at the same timestep give the full forward's output
    (SSTA included: the blocks from k on attend as in the whole forward); so does the saved
    residual added to the embedded input."""
    model = randomize_like_trained_(HunyuanVideo15DiT(cfg).eval(), seed=5)
    inputs = random_inputs(cfg, latent=(2, 4, 6), vision_len=5, seed=2)
    whole = model(**inputs)
    velocity, saved = model(**inputs, save=(0, 2, DEPTH))
    assert [s[0].shape for s in saved] == [(2, 48, cfg.hidden_size)] * 3 and torch.isfinite(whole).all()
    torch.testing.assert_close(velocity, whole, rtol=0, atol=0)
    for k, streams in zip((0, 2, DEPTH), saved):
        torch.testing.assert_close(model(**inputs, start=k, streams=streams), whole, rtol=1e-6, atol=1e-6)
    residual = saved[-1][0] - saved[0][0]
    torch.testing.assert_close(model(**inputs, start=DEPTH, residual=residual), whole, rtol=1e-5, atol=1e-5)
    # at another timestep the skipped blocks are not recomputed: the output is not the full forward's
    later = {**inputs, "t": inputs["t"] * 0.5}
    assert rel_l2(model(**later, start=2, streams=saved[1]), model(**later)) > 1e-4


# the model variants the caches run on: CFG (batch 2), meanflow without CFG
VARIANTS = {"cfg": (CFG, 5.0), "meanflow": (dataclasses.replace(CFG, use_meanflow=True), 1.0)}


@functools.cache
def _inputs(variant: str = "cfg"):
    cfg, guidance = VARIANTS[variant]
    emb = {k: v.numpy() for k, v in stage1_embeddings(cfg, latent_hw=SHAPE[1:], seed=1).items()}
    conditions = pipeline.build_conditions(emb, task="t2v", shape=SHAPE, cfg=guidance > 1, model=cfg)
    return cfg, conditions, pipeline.SamplingSettings(num_inference_steps=STEPS, guidance_scale=guidance)


@functools.cache
def run(cache=NoCache(), strategy: str | None = None, mesh_spec: str | None = None, variant: str = "cfg"):
    cfg, conditions, settings = _inputs(variant)
    placement = parallel.Placement()
    if strategy is not None:
        placement = parallel.placement(cfg, strategy, mesh_spec, batch=2)
    params = random_params(cfg, torch.float32, seed=3, shardings=placement.params)
    denoiser = pipeline.Denoiser(cfg, params, conditions, settings, placement=placement, cache=cache)
    with compiles.recorded() as compiled:
        result = pipeline.denoise(denoiser, pipeline.initial_noise(0, SHAPE), progress=False)
    return denoiser, result, compiled


def test_no_cached_step_gives_the_uncached_latents():
    _, plain, _ = run()
    _, cached, _ = run(MagCache(CALIBRATION, threshold=0.0))  # a threshold of 0 caches nothing
    assert all(cached.full)
    np.testing.assert_array_equal(cached.latents, plain.latents)


def _eager_model(variant: str) -> HunyuanVideo15DiT:
    """The eager torch model with the weights ``run`` gives the Denoiser."""
    cfg, _, _ = _inputs(variant)
    model = HunyuanVideo15DiT(cfg).eval()
    params = random_params(cfg, torch.float32, seed=3)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params.items()})
    return model


def _reference(name: str, variant: str = "cfg") -> np.ndarray:
    """The official semantics on the eager model with the same weights (``cache_reference``)."""
    _, conditions, settings = _inputs(variant)
    model = _eager_model(variant)
    cache = CACHES[name]
    full = cache_reference.official_full_steps(SCHEDULE.start, SCHEDULE.end, SCHEDULE.interval, STEPS)
    orders = {"low": getattr(cache, "low_freqs_order", 2), "high": getattr(cache, "high_freqs_order", 2)}
    hooks = cache_reference.Hooks(model, name, full, keep_blocks=getattr(cache, "keep_blocks", 1), orders=orders,
                                  ratios=RATIOS, threshold=0.3)
    return cache_reference.cached_loop(model, conditions, pipeline.initial_noise(0, SHAPE), STEPS,
                                       settings.guidance_scale, settings.flow_shift, hooks)


@pytest.mark.parametrize("name", list(CACHES))
def test_cache_follows_the_official_semantics(name):
    """Each cache against its official helper re-done on the eager model: the same steps skipped,
    the same tensors reused; and the result is not the uncached one (the cache did something)."""
    cache = CACHES[name]
    denoiser, result, compiled = run(cache)
    _, plain, _ = run()
    expected = _reference(name)
    assert np.isfinite(result.latents).all()
    assert rel_l2(result.latents, expected) <= 1e-5, rel_l2(result.latents, expected)
    assert 1e-4 < rel_l2(result.latents, plain.latents) < 1.0
    assert result.full == [cache.is_full(i) for i in range(STEPS)] and not all(result.full)
    if not isinstance(cache, MagCache):
        assert [i for i, full in enumerate(result.full) if full] == _formula(2, 7, 3, STEPS)
    # two executables for the whole run: the full step and the cached step
    assert compiled == ["jit(step)"] * 2


def test_meanflow_without_cfg_follows_the_official_semantics():
    """Batch 1, and the model also sees the next timestep."""
    _, result, _ = run(CACHES["teacache"], variant="meanflow")
    _, plain, _ = run(variant="meanflow")
    assert rel_l2(result.latents, _reference("teacache", "meanflow")) <= 1e-5
    assert rel_l2(result.latents, plain.latents) > 1e-4


def test_cached_step_computes_only_what_the_cache_needs():
    # the blocks run as loops over ranges of layers, each in its scope "double_blocks_<first>_to_<last>"
    scopes = lambda compiled: set(re.findall(r"/dit/(?:blocks/)?(\w+)", compiled.as_text()))  # noqa: E731
    flops = lambda compiled: hlo.dot_flops(compiled.as_text())  # noqa: E731
    denoiser, _, _ = run(CACHES["deepcache"])
    assert {"double_blocks_0_to_1", "double_blocks_2_to_3", "final_layer"} <= scopes(denoiser.compiled)
    cached = scopes(denoiser.compiled_cached)
    assert {"double_blocks_2_to_3", "final_layer"} <= cached and "double_blocks_0_to_1" not in cached
    # nothing is embedded either: the cached step costs less than its share of the blocks (matmul
    # FLOPs with each loop iteration counted; XLA's cost analysis counts a loop body once)
    assert flops(denoiser.compiled_cached) < 0.5 * flops(denoiser.compiled)
    for name in ("teacache", "taylorcache", "magcache"):  # no block runs on their cached steps
        denoiser, _, _ = run(CACHES[name])
        assert not any(s.startswith("double_blocks") for s in scopes(denoiser.compiled_cached))
        assert flops(denoiser.compiled_cached) < 0.1 * flops(denoiser.compiled)


@pytest.mark.parametrize("name", ["taylorcache", "deepcache"])
def test_resume_from_a_checkpointed_state_equals_the_whole_run(name):
    """A run resumed at a full step with the carried state saved there (TaylorCache: the
    derivatives) ends where the uninterrupted run does, bit for bit."""
    denoiser, whole, _ = run(CACHES[name])
    saved = {}

    def keep(step, x, state):
        if step == 5:
            saved.update(latents=np.asarray(x), state={k: np.asarray(state[k]) for k in denoiser.cache.carried})

    pipeline.denoise(denoiser, pipeline.initial_noise(0, SHAPE), on_step=keep, progress=False)
    resumed = pipeline.denoise(denoiser, saved["latents"], 5, state=saved["state"], progress=False)
    np.testing.assert_array_equal(resumed.latents, whole.latents)
    if name == "taylorcache":  # the carried state matters: restarting it changes the result
        restarted = pipeline.denoise(denoiser, saved["latents"], 5, progress=False)
        assert rel_l2(restarted.latents, whole.latents) > 1e-4


def test_calibration_run_records_the_residual_ratios():
    denoiser, result, _ = run(MagCacheCalibration())
    _, plain, _ = run()
    np.testing.assert_array_equal(result.latents, plain.latents)  # every step full
    x, state, ratios = denoiser.place(pipeline.initial_noise(0, SHAPE)), denoiser.initial_state((1, 32, *SHAPE)), []
    for i in range(STEPS):
        x, state = denoiser.step(x, i, state)
        ratios.append(float(state["ratio"]))
    # the same ratios from the eager model: |r_i| / |r_(i-1)| per token, averaged
    _, conditions, settings = _inputs()
    model = _eager_model("cfg")
    norms = []
    model.double_blocks[0].register_forward_pre_hook(lambda block, args: norms.append([args[0]]))
    model.double_blocks[-1].register_forward_hook(lambda block, args, out: norms[-1].append(out[0]))
    cache_reference.cached_loop(model, conditions, pipeline.initial_noise(0, SHAPE), STEPS, settings.guidance_scale,
                                settings.flow_shift, None)
    residual = [torch.linalg.norm(out - entering, dim=-1) for entering, out in norms]
    expected = [1.0] + [float((residual[i] / residual[i - 1]).mean()) for i in range(1, STEPS)]
    np.testing.assert_allclose(ratios, expected, rtol=1e-4)
    assert np.std(ratios) > 1e-3


@pytest.mark.parametrize("name,strategy,mesh_spec", [
    ("deepcache", "tp_fc2_replicated", "tp=8"), ("teacache", "tp", "tp=8"), ("taylorcache", "sp", "sp=8"),
    ("magcache", "fsdp", "dp=2,fsdp=4"),
])
def test_cache_on_a_mesh_matches_one_device(name, strategy, mesh_spec):
    denoiser, sharded, _ = run(CACHES[name], strategy, mesh_spec)
    _, single, _ = run(CACHES[name])
    assert sharded.full == single.full
    assert rel_l2(sharded.latents, single.latents) <= 1e-5
    # the state stays laid out like the streams between blocks
    strat = sharding.get(strategy)
    for key, kind in denoiser.cache.layout.items():
        spec = strat.activations[kind] if kind else PartitionSpec()
        assert denoiser.compiled.output_shardings[1][key].spec == spec, key
    assert denoiser.compiled_cached.input_shardings[0][4] == denoiser.compiled.output_shardings[1]


def test_starting_at_a_cached_step_is_refused():
    denoiser, _, _ = run(CACHES["deepcache"])
    with pytest.raises(ValueError, match="step 3 is a cached step"):
        pipeline.denoise(denoiser, pipeline.initial_noise(0, SHAPE), start_step=3, progress=False)
    x = denoiser.place(pipeline.initial_noise(0, SHAPE))
    with pytest.raises(ValueError, match="step 4 is a cached step, but no full step"):
        denoiser.step(x, 4, denoiser.initial_state(x.shape))
