"""The super-resolution stage: upsamplers against the official re-statement, the bucket map, the LR
condition (noise, order, zeroed below t=700), the loop against an eager official-style loop, and
run/stage2_sr.py end to end."""

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import cli_runner
import upsampler_reference as ref
from hunyuan_tpu import pipeline
from hunyuan_tpu.checkpoint import save_transformer
from hunyuan_tpu import super_resolution as sr
from hunyuan_tpu import upsampler as up
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.files import InputError
from hunyuan_tpu.metrics import rel_l2
from hunyuan_tpu.model import HunyuanVideo15DiT
from hunyuan_tpu.random_init import randomize_like_trained_
from hunyuan_tpu.runtime import jax_view
from hunyuan_tpu.synthetic import stage1_embeddings

LR_HR = [(1, 3, 4), (1, 6, 8)]  # latent (T, H, W) of a small LR canvas and its x2 target


# ---- upsamplers --------------------------------------------------------------------------------

def _reference(class_name: str, weights: dict, x: torch.Tensor) -> torch.Tensor:
    config = up.TINY_CONFIGS[class_name]
    if class_name == "SRTo720pUpsampler":
        return ref.sr_to_720p(weights, x, num_blocks=config["num_blocks"], global_residual=config["global_residual"])
    return ref.sr_to_1080p(weights, x, levels=len(config["block_out_channels"]),
                           num_res_blocks=config["num_res_blocks"])


@pytest.mark.parametrize("class_name", list(up.CLASSES))
def test_upsampler_matches_the_official_restatement(class_name):
    model = up.tiny_upsampler(class_name, seed=3)
    weights = model.state_dict()
    x = torch.randn(1, 32, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    expected = _reference(class_name, weights, x)
    assert torch.isfinite(out).all() and out.shape == (1, 32, 3, 5, 6)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    # the comparison sees every block: one block's weights changed moves the re-statement
    broken = dict(weights)
    name = "blocks.1.block.2.conv.weight" if class_name == "SRTo720pUpsampler" else "up.1.block.0.conv2.conv.weight"
    broken[name] = broken[name].flip(0)
    assert not torch.allclose(out, _reference(class_name, broken, x), atol=1e-3)
    # causal in time: the first frame does not see the later ones
    later = x.clone()
    later[:, :, 1:] += 1.0
    with torch.no_grad():
        assert torch.equal(model(later)[:, :, 0], out[:, :, 0])


@pytest.mark.parametrize("version", list(up.RELEASED_CONFIGS))
def test_released_upsamplers_have_the_official_names_and_shapes(version):
    class_name, config = up.RELEASED_CONFIGS[version]
    with torch.device("meta"):
        model = up.build(class_name, config)
    names = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert names == ref.official_names(class_name, config)
    # what the released files hold: 100 tensors (720p), about 201 MB of float32 (1080p)
    if version == "720p_sr_distilled":
        assert len(names) == 100
    else:
        assert abs(sum(np.prod(s) for s in names.values()) * 4 / 1e6 - 201.4) < 0.5


def _write_folder(folder: Path, model, class_name: str, config: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.35.0",
                                                    **config}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / up.WEIGHTS_NAME))
    return folder


def test_load_upsampler_and_its_errors(tmp_path):
    class_name = "SRTo1080pUpsampler"
    model = up.tiny_upsampler(class_name, seed=5)
    folder = _write_folder(tmp_path / "1080p_sr_distilled", model, class_name, up.TINY_CONFIGS[class_name])
    loaded = up.load_upsampler(folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values())
    tensors = load_file(str(folder / up.WEIGHTS_NAME))
    del tensors["norm_out.gamma"]
    save_file(tensors, str(folder / up.WEIGHTS_NAME))
    with pytest.raises(InputError, match=r"model.safetensors: not the weights .*missing norm_out.gamma"):
        up.load_upsampler(folder)
    with pytest.raises(InputError, match="no such folder"):
        up.load_upsampler(tmp_path / "nowhere")


def test_upsample_runs_in_float32_whatever_the_weights_dtype():
    model = up.tiny_upsampler("SRTo720pUpsampler", seed=1)
    x = np.random.default_rng(0).standard_normal((1, 32, 2, 4, 5)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    out = up.upsample(model, x)
    assert out.dtype == np.float32 and rel_l2(out, expected) < 1e-5  # bfloat16 compute is ~1e-2 off
    # bfloat16 weights are computed with in float32: the same as their float32 copy, bit for bit
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert np.array_equal(up.upsample(half, x), up.upsample(half.float(), x))


# ---- the bucket map and the LR condition -------------------------------------------------------

def _official_bucket_map(lr_base: int, hr_base: int) -> dict:
    """The official BucketMap: generate_crop_size_list read as (W, H), the closest W/H ratio."""
    def crop_sizes(base):
        n, out, wp, hp = round((base / 16) ** 2), [], round((base / 16) ** 2), 1
        while wp > 0:
            if max(wp, hp) / min(wp, hp) <= 4.0:
                out.append((wp * 16, hp * 16))
            if (hp + 1) * wp <= n:
                hp += 1
            else:
                wp -= 1
        return out
    lr, hr = crop_sizes(lr_base), crop_sizes(hr_base)
    ratios = np.array([w / h for w, h in hr])
    return {(w, h): hr[int(np.abs(ratios - w / h).argmin())] for w, h in lr}


@pytest.mark.parametrize("base,target", [("480p", "720p"), ("720p", "1080p"), ("96p", "144p")])
def test_hr_bucket_is_the_official_bucket_map(base, target):
    official = _official_bucket_map(pipeline.RESOLUTION_BASE[base], pipeline.RESOLUTION_BASE[target])
    for (w, h), (hr_w, hr_h) in official.items():
        assert sr.hr_bucket(h, w, target) == (hr_h, hr_w), (w, h)
    assert sr.hr_bucket(480, 848, "720p") == (720, 1280)
    assert sr.hr_bucket(848, 480, "720p") == (1280, 720)  # portrait stays portrait
    assert sr.hr_bucket(720, 1280, "1080p") == (1072, 1904)


def test_lr_latents_are_resized_per_frame_bilinearly():
    x = np.random.default_rng(1).standard_normal((1, 2, 3, 4, 5)).astype(np.float32)
    out = sr.resize_latents(x, 8, 10)
    for f in range(3):
        frame = torch.nn.functional.interpolate(torch.from_numpy(x[:, :, f]), size=(8, 10), mode="bilinear",
                                                align_corners=False)
        np.testing.assert_allclose(out[:, :, f], frame.numpy(), rtol=1e-6, atol=1e-6)


def test_lq_noise_is_seeded_at_strength_0_7():
    lq = np.random.default_rng(2).standard_normal((1, 32, 2, 3, 4)).astype(np.float32)
    noised = sr.noised(lq, seed=7)
    np.testing.assert_allclose(noised, 0.3 * lq + 0.7 * pipeline.initial_noise(7, (2, 3, 4)), rtol=1e-6, atol=1e-6)
    assert np.array_equal(noised, sr.noised(lq, seed=7)) and not np.allclose(noised, sr.noised(lq, seed=8))
    prepared = sr.prepare_lq(lq[:, :, :, :2, :2], (2, 3, 4), lambda z: z, seed=7)
    resized = sr.resize_latents(lq[:, :, :, :2, :2], 3, 4)
    np.testing.assert_allclose(prepared, sr.noised(resized, seed=7), rtol=1e-6)


def _step_inputs(steps: int):
    cfg = DiTConfig.preset("tiny_sr")
    t, h, w = LR_HR[1]
    emb = {k: v.numpy() for k, v in stage1_embeddings(cfg, latent_hw=(h, w), seed=3).items()}
    lq = np.random.default_rng(4).standard_normal((1, 32, t, h, w)).astype(np.float32)
    settings = pipeline.SamplingSettings(steps, 1.0, 2.0)
    conditions = sr.sr_conditions(emb, lq, task="t2v", cfg=False, model=cfg)
    return cfg, emb, lq, settings, conditions


def test_step_input_order_and_lr_condition_off_below_700():
    cfg, _, lq, settings, conditions = _step_inputs(6)
    seen = []

    def apply(params, x, *args, **kwargs):  # records the model input, predicts zero velocity
        seen.append(np.asarray(x))
        return x[:, :32] * 0

    step = pipeline.make_step(apply, cfg=False, meanflow=True, dtype=np.float32)
    host = pipeline.device_conditions(conditions, settings, np.float32)
    latents = pipeline.initial_noise(0, lq.shape[2:])
    for i in range(6):
        step(None, host, latents, i)
    timesteps = pipeline.scheduler.timesteps(host["sigmas"])
    assert [t >= 700 for t in timesteps] == [True, True, True, False, False, False]
    for x, t in zip(seen, timesteps):
        assert x.shape[1] == 98
        np.testing.assert_array_equal(x[:, :32], latents)
        np.testing.assert_array_equal(x[:, 32:65], 0)  # t2v: no image latents, mask 0
        if t >= 700:
            np.testing.assert_array_equal(x[:, 65:97], lq)
            np.testing.assert_array_equal(x[:, 97], 1)
        else:
            np.testing.assert_array_equal(x[:, 65:], 0)  # the LR latents and their mask channel


@torch.no_grad()
def _official_sr_loop(model, emb, lq, noise, settings):
    """The official SR loop written out: [latents, cond, LR cond] in, the LR condition zeroed
    (mask too) once t < 1000 * 0.7, meanflow's next timestep, Euler."""
    sigmas = pipeline.scheduler.sigmas(settings.num_inference_steps, settings.flow_shift)
    cond = torch.zeros(1, 33, *lq.shape[2:])
    lq_cond = torch.cat([torch.from_numpy(lq), torch.ones(1, 1, *lq.shape[2:])], dim=1)
    condition = torch.cat([cond, lq_cond], dim=1)
    zero_lq = condition.clone()
    zero_lq[:, 33:65] = 0
    zero_lq[:, 65] = 0
    latents = torch.from_numpy(noise)
    text = {k: torch.from_numpy(emb[k]) for k in ("prompt_embeds", "prompt_mask", "prompt_embeds_2", "prompt_mask_2")}
    for i, t in enumerate(torch.from_numpy(pipeline.scheduler.timesteps(sigmas))):
        if t < 1000 * 0.7:
            condition = zero_lq
        x = torch.cat([latents, condition], dim=1)
        v = model(x, t[None], text["prompt_embeds"], text["prompt_mask"], text["prompt_embeds_2"],
                  text["prompt_mask_2"], None, torch.tensor([sigmas[i + 1] * 1000]))
        latents = latents + v * float(sigmas[i + 1] - sigmas[i])
    return latents.numpy()


def test_sr_loop_matches_the_official_loop():
    cfg, emb, lq, settings, conditions = _step_inputs(6)
    model = randomize_like_trained_(HunyuanVideo15DiT(cfg).eval(), seed=11)
    noise = pipeline.initial_noise(42, lq.shape[2:])
    expected = _official_sr_loop(model, emb, lq, noise, settings)
    params, _ = jax_view(model, torch.float32)
    result = pipeline.denoise(pipeline.Denoiser(cfg, params, conditions, settings), noise, progress=False)
    assert np.isfinite(result.latents).all()
    assert rel_l2(result.latents, expected) <= 1e-5
    # the LR condition matters: without it the result moves
    dropped = {**conditions, "lr_latents": np.zeros_like(conditions["lr_latents"])}
    other = pipeline.denoise(pipeline.Denoiser(cfg, params, dropped, settings), noise, progress=False)
    assert rel_l2(other.latents, expected) > 1e-3


def test_sr_version_by_the_base_model():
    assert sr.sr_version(DiTConfig.preset("480p_t2v"), "480p") == "720p_sr_distilled"
    assert sr.sr_version(DiTConfig.preset("720p_i2v_distilled_sparse"), "720p") == "1080p_sr_distilled"
    assert sr.sr_version(DiTConfig.preset("tiny"), "480p") == "tiny_sr"  # tiny's own 96p family
    with pytest.raises(InputError, match="no super-resolution model takes it"):
        sr.sr_version(DiTConfig(ideal_resolution=None), "1080p")
    released = DiTConfig.preset("720p_sr_distilled")
    assert (released.img_in_channels, released.latent_channels, released.use_meanflow) == (98, 32, True)
    assert DiTConfig.from_dict(released.to_official_dict()) == released
    with pytest.raises(ValueError, match="concat_condition false"):
        DiTConfig(in_channels=65, concat_condition=False)


# ---- run/stage2_sr.py ------------------------------------------------------------------------------

SCRIPT = "stage2_sr.py"


def _sr(*args, check=True, devices=1) -> cli_runner.Result:
    return cli_runner.call(SCRIPT, *args, devices=devices, check=check)


def _latents(folder: Path, name: str = "sr_latents.safetensors") -> np.ndarray:
    return load_file(str(folder / name))["latents"].numpy()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base")
    cli_runner.call("stage2_transformer.py", "--demo", "--output_dir", folder, "--num_inference_steps", 2,
                    "--warmup_steps", 0)
    return folder


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sr")
    proc = _sr("--input_dir", base, "--output_dir", out, "--warmup_steps", 0)
    assert "SR: compile" in proc.stdout and "6 steps" in proc.stdout
    return out


def test_stage_writes_sr_latents_and_record(straight):
    config = json.loads((straight / "config.json").read_text())
    record = config["sr"]
    assert (record["model"], record["num_inference_steps"], record["guidance_scale"], record["flow_shift"]) == \
        ("tiny_sr", 6, 1.0, 2.0)
    assert (record["seed"], record["lq_noise_seed"]) == (42, 43)  # the base run's seed, and the next one
    assert record["lr_latent_shape"] == config["stage2"]["latent_shape"] == [3, 4, 7]
    assert (record["height"], record["width"], record["latent_shape"]) == (144, 256, [3, 9, 16])
    out = _latents(straight)
    assert out.shape == (1, 32, 3, 9, 16) and np.isfinite(out).all()


def test_a_new_stage2_run_retires_the_sr_record(base, straight, tmp_path):
    shutil.copytree(base, tmp_path, dirs_exist_ok=True)
    shutil.copy(straight / "config.json", tmp_path / "config.json")  # as after an SR run in this folder
    cli_runner.call("stage2_transformer.py", "--input_dir", tmp_path, "--num_inference_steps", 1, "--warmup_steps", 0)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "stage2" in config and "sr" not in config  # stage 3 now decodes the new base latents


def test_interrupted_run_resumes_to_the_same_latents(base, straight, tmp_path, monkeypatch):
    step = pipeline.Denoiser.step

    def interrupted(self, latents, i, streams=None):
        if i == 3:
            raise KeyboardInterrupt
        return step(self, latents, i, streams)

    monkeypatch.setattr(pipeline.Denoiser, "step", interrupted)  # Ctrl-C during step 3
    proc = _sr("--input_dir", base, "--output_dir", tmp_path, "--warmup_steps", 0, "--checkpoint_every", 1,
               check=False)
    assert proc.returncode == 130 and proc.stderr.strip().splitlines()[-1].startswith("interrupted: ")
    monkeypatch.setattr(pipeline.Denoiser, "step", step)
    assert (tmp_path / "sr_checkpoint.safetensors").exists() and not (tmp_path / "sr_latents.safetensors").exists()
    proc = _sr("--input_dir", base, "--output_dir", tmp_path, "--warmup_steps", 0, "--checkpoint_every", 1, "--resume")
    assert "resuming at step 3" in proc.stderr
    assert np.array_equal(_latents(tmp_path), _latents(straight))
    assert not (tmp_path / "sr_checkpoint.safetensors").exists()


def test_sharded_sr_matches_one_device_and_seeds_matter(base, straight, tmp_path):
    # stage 2 ran with CFG split over dp=2: the SR run (no CFG) keeps the strategy, over all 8 devices
    folder = tmp_path / "in"
    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    config["stage2"].update(sharding="tp", mesh="dp=2,tp=4")
    (folder / "config.json").write_text(json.dumps(config))
    proc = _sr("--input_dir", folder, "--output_dir", tmp_path / "tp", "--warmup_steps", 0, devices=8)
    assert "mesh dp=2,tp=4 splits the CFG batch" in proc.stderr
    record = json.loads((tmp_path / "tp" / "config.json").read_text())["sr"]
    assert (record["sharding"], record["mesh"]) == ("tp", "tp=8")
    assert rel_l2(_latents(tmp_path / "tp"), _latents(straight)) <= 1e-5
    _sr("--input_dir", base, "--output_dir", tmp_path / "seed", "--lq_noise_seed", 5, "--warmup_steps", 0)
    assert rel_l2(_latents(tmp_path / "seed"), _latents(straight)) > 1e-3


def test_official_layout_checkpoints_load_beside_each_other(base, straight, tmp_path):
    # ckpts/transformer/<version> and ckpts/upsampler/<version>, holding the preset's seeded weights
    cfg = DiTConfig.preset("tiny_sr")
    root = tmp_path / "ckpts"
    save_transformer(randomize_like_trained_(HunyuanVideo15DiT(cfg), seed=0), root / "transformer" / "tiny_sr")
    class_name = sr.SR_VERSIONS["tiny_sr"].upsampler
    _write_folder(root / "upsampler" / "tiny_sr", up.tiny_upsampler(class_name), class_name,
                  up.TINY_CONFIGS[class_name])
    _sr("--input_dir", base, "--output_dir", tmp_path / "out", "--model", root / "transformer" / "tiny_sr",
        "--warmup_steps", 0)
    record = json.loads((tmp_path / "out" / "config.json").read_text())["sr"]
    assert record["upsampler"] == str(root / "upsampler" / "tiny_sr")
    assert (record["num_inference_steps"], record["flow_shift"]) == (6, 2.0)  # the version's defaults, by folder name
    assert np.array_equal(_latents(tmp_path / "out"), _latents(straight))


def test_sr_with_deepcache(base, tmp_path):
    proc = _sr("--input_dir", base, "--output_dir", tmp_path, "--enable_cache", "--cache_start_step", 1,
               "--cache_end_step", 5, "--cache_step_interval", 2, "--warmup_steps", 0)
    assert re.search(r"4 full \(mean [\d.]+ s\), 2 cached", proc.stdout), proc.stdout  # full: 0, 1, 3, 5
    assert np.isfinite(_latents(tmp_path)).all()


def _no_stage2(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    del config["stage2"]
    (folder / "config.json").write_text(json.dumps(config))


SR_BAD_INPUTS = {
    "no stage 2": (_no_stage2, [], r"config.json: no stage-2 record \(run stage 2 first\)"),
    "no latents": (lambda f: (f / "latents.safetensors").unlink(), [], "latents.safetensors: no such file"),
    "not an SR model": (lambda f: None, ["--model", "tiny"], "--model tiny: not a super-resolution model"),
    "bad upsampler": (lambda f: None, ["--upsampler", "/nowhere/up"], "--upsampler /nowhere/up: no such folder"),
    "i2v without --sr": (lambda f: _as_i2v(f), [], r"missing tensor\(s\) sr_vision_states, sr_image_cond_latents"),
    "cache past the end": (lambda f: None, ["--enable_cache"], r"--cache_end_step 45 is past the last step"),
    "zero shift": (lambda f: None, ["--flow_shift", 0], r"--flow_shift 0.0 must be > 0"),
    "negative noise seed": (lambda f: None, ["--lq_noise_seed", -1], r"--lq_noise_seed -1 must be between 0 and 2"),
    "nan guidance": (lambda f: None, ["--guidance_scale", "nan"], "argument --guidance_scale: 'nan' is not a finite"),
}


def _as_i2v(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["stage2"]["task"] = "i2v"
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case", SR_BAD_INPUTS)
def test_bad_input(case, base, tmp_path):
    breaker, extra, message = SR_BAD_INPUTS[case]
    folder = tmp_path / "in"
    shutil.copytree(base, folder)
    breaker(folder)
    proc = _sr("--input_dir", folder, "--output_dir", tmp_path / "out", *extra, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()
