"""run/stage2_transformer.py end to end on the weight-free tiny demo: in-process through main(argv),
and as a subprocess killed part-way and resumed."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cli_runner
from adapters import tiny_adapter
from hunyuan_tpu.checkpoint import save_transformer
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.files import locked_folder
from hunyuan_tpu.model import HunyuanVideo15DiT
from hunyuan_tpu.random_init import randomize_like_trained_

SCRIPT = "stage2_transformer.py"


def stage2(*args, check=True, devices=1) -> cli_runner.Result:
    return cli_runner.call(SCRIPT, *args, devices=devices, check=check)


def latents(folder: Path) -> np.ndarray:
    return load_file(str(folder / "latents.safetensors"))["latents"].numpy()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo")
    proc = stage2("--demo", "--output_dir", folder)
    assert "stage 2: compile" in proc.stdout and "s/step" in proc.stdout
    return folder


def test_demo_writes_latents_and_record(demo):
    config = json.loads((demo / "config.json").read_text())
    record = config["stage2"]
    for key in ("steps", "full_steps", "cached_steps", "compile_s", "mean_step_s", "total_s", "devices"):
        assert key in record
    assert record["steps"] == record["full_steps"] == 50 and record["cached_steps"] == 0
    assert record["model"] == "tiny" and config["stage1"]["demo"] is True
    out = latents(demo)
    assert out.dtype == np.float32 and out.shape == (1, 32, *record["latent_shape"]) and np.isfinite(out).all()


def test_same_seed_is_bit_identical(demo, tmp_path):
    stage2("--demo", "--output_dir", tmp_path)
    assert np.array_equal(latents(tmp_path), latents(demo))
    stage2("--input_dir", tmp_path, "--seed", 43)
    assert not np.allclose(latents(tmp_path), latents(demo))


def test_precedence_cli_then_config_then_default(demo, tmp_path):
    shutil.copytree(demo, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(num_inference_steps=3, seed=5, guidance_scale=2.5)
    (tmp_path / "config.json").write_text(json.dumps(config))
    stage2("--input_dir", tmp_path, "--seed", 9, "--warmup_steps", 0)
    record = json.loads((tmp_path / "config.json").read_text())["stage2"]
    assert record["num_inference_steps"] == 3 and record["steps"] == 3  # from config.json
    assert record["seed"] == 9  # command line beats config.json
    assert record["guidance_scale"] == 2.5
    assert record["flow_shift"] == 5.0 and record["video_length"] == 9  # default / demo config


def test_checkpoint_path_gives_the_preset_weights(demo, tmp_path):
    model = randomize_like_trained_(HunyuanVideo15DiT(DiTConfig.preset("tiny")), seed=0)
    save_transformer(model, tmp_path / "ckpt")
    stage2("--input_dir", demo, "--output_dir", tmp_path / "out", "--model", tmp_path / "ckpt")
    assert np.array_equal(latents(tmp_path / "out"), latents(demo))


def test_help_is_grouped():
    out = stage2("--help").stdout
    for group in ("input and output:", "model:", "video:", "sampling:", "feature cache:", "run:"):
        assert group in out
    for flag in ("--input_dir", "--output_dir", "--video_length", "--num_inference_steps", "--guidance_scale",
                 "--seed", "--warmup_steps", "--model", "--dtype", "--aspect_ratio", "--height", "--width",
                 "--checkpoint_every", "--resume", "--demo", "--cache_type", "--enable_cache", "--cache_start_step",
                 "--cache_end_step", "--cache_step_interval", "--cache_keep_blocks", "--taylor_max_order",
                 "--taylor_low_freqs_order", "--taylor_high_freqs_order", "--magcache_calibration",
                 "--magcache_threshold", "--magcache_max_skips", "--magcache_retention_ratio", "--magcache_calibrate"):
        assert flag in out


def _checkpoint_step(path: Path) -> int:
    try:
        with safe_open(str(path), "pt") as f:
            return int(f.metadata()["step"])
    except Exception:
        return -1


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stop_and_resume_matches_uninterrupted(demo, tmp_path):
    # A bigger canvas than the demo's so that steps take long enough to stop the run part-way.
    # SIGTERM: one line, exit 143, no temporaries, the checkpoint kept. A SIGKILL's leftovers
    # (temporaries of a dead process) go when the next run starts in the folder.
    # Checkpoints land only before full steps, with the state TaylorCache carries past them (its
    # derivatives): the resumed run must pick those up to end where the uninterrupted one does.
    common = ["--input_dir", demo, "--height", 192, "--width", 192, "--video_length", 17,
              "--num_inference_steps", 40, "--warmup_steps", 0,
              "--cache_type", "taylorcache", "--cache_start_step", 2, "--cache_end_step", 38]
    stage2(*common, "--output_dir", tmp_path / "straight")
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(cli_runner.command(SCRIPT, *common, "--output_dir", interrupted, "--checkpoint_every", 1),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli_runner.environment())
    checkpoint = interrupted / "stage2_checkpoint.safetensors"
    deadline = time.time() + 120
    while _checkpoint_step(checkpoint) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: ") and "--resume" in stderr
    stopped_at = _checkpoint_step(checkpoint)
    assert 3 <= stopped_at < 40 and not (interrupted / "latents.safetensors").exists(), "not stopped part-way"
    assert not [p for p in interrupted.iterdir() if ".tmp" in p.name]
    stale = [interrupted / f".latents.safetensors.tmp{_dead_pid()}", interrupted / f".config.tmp{_dead_pid()}.json"]
    for path in stale:
        path.write_bytes(b"half-written by a killed run")
    resumed = stage2(*common, "--output_dir", interrupted, "--checkpoint_every", 1, "--resume")
    assert "resuming at step" in resumed.stderr
    assert np.array_equal(latents(interrupted), latents(tmp_path / "straight"))
    assert not checkpoint.exists() and not any(path.exists() for path in stale)
    assert json.loads((interrupted / "config.json").read_text())["stage2"]["resumed_from_step"] >= stopped_at


def test_a_second_run_into_a_busy_folder_is_refused(demo, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(demo, folder)
    before = (folder / "latents.safetensors").read_bytes()
    with locked_folder(folder):  # another run holds it (flock: a second descriptor conflicts, even in-process)
        proc = stage2("--input_dir", folder, "--num_inference_steps", 2, check=False)
    assert proc.returncode == 2 and "another run is writing into this folder" in proc.stderr.strip().splitlines()[-1]
    assert (folder / "latents.safetensors").read_bytes() == before
    stage2("--input_dir", folder, "--num_inference_steps", 2)  # free again


def test_demo_refused_leaves_no_inputs(tmp_path):
    """--demo writes its inputs only once every setting is checked."""
    for flags in (["--num_inference_steps", 0], ["--mesh", "tp=3"], ["--cache_type", "taylorcache",
                                                                      "--cache_start_step", 0]):
        proc = stage2("--demo", "--output_dir", tmp_path / "new", *flags, check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
        assert not (tmp_path / "new").exists(), flags


def test_sharded_run_matches_one_device(demo, tmp_path):
    stage2("--input_dir", demo, "--output_dir", tmp_path / "sp", "--sharding", "sp", "--mesh", "dp=2,sp=4", devices=8)
    record = json.loads((tmp_path / "sp" / "config.json").read_text())["stage2"]
    assert (record["sharding"], record["mesh"], record["devices"]["count"]) == ("sp", "dp=2,sp=4", 8)
    out, reference = latents(tmp_path / "sp"), latents(demo)
    assert np.linalg.norm(out - reference) / np.linalg.norm(reference) <= 1e-5
    stage2("--input_dir", demo, "--output_dir", tmp_path / "default", devices=8)
    record = json.loads((tmp_path / "default" / "config.json").read_text())["stage2"]
    assert (record["sharding"], record["mesh"]) == ("tp_fc2_replicated", "tp=8")


def test_cache_run_reports_full_and_cached_steps(demo, tmp_path):
    proc = stage2("--input_dir", demo, "--output_dir", tmp_path, "--enable_cache")
    assert re.search(r"25 full \(mean [\d.]+ s\), 25 cached \(mean [\d.]+ s\)", proc.stdout), proc.stdout
    record = json.loads((tmp_path / "config.json").read_text())["stage2"]
    assert (record["full_steps"], record["cached_steps"], record["cache_keep_blocks"]) == (25, 25, 1)
    assert record["cache_type"] == "deepcache"  # the official --enable_cache
    assert 0 < record["mean_cached_step_s"] and 0 < record["mean_full_step_s"]
    out, reference = latents(tmp_path), latents(demo)
    assert np.isfinite(out).all() and 1e-4 < np.linalg.norm(out - reference) / np.linalg.norm(reference) < 0.5


def test_magcache_calibrate_then_run(demo, tmp_path):
    """--magcache_calibrate writes the ratios (and the uncached latents); a MagCache run reads them:
    at threshold 0 it equals the uncached run, at a higher one it caches steps; another step count
    or another shift is refused by name."""
    steps = ["--num_inference_steps", 12]
    calibration = tmp_path / "calibration.json"
    proc = stage2("--input_dir", demo, "--output_dir", tmp_path / "full", *steps, "--magcache_calibrate", calibration)
    assert "MagCache calibration ->" in proc.stdout and "PSNR" in proc.stdout
    data = json.loads(calibration.read_text())
    assert data["version"] == 1 and data["num_inference_steps"] == 12 and data["model"] == "tiny"
    assert len(data["ratios"]) == 12 and data["ratios"][0] == 1.0 and len(set(data["ratios"])) > 2
    magcache = ["--input_dir", demo, *steps, "--cache_type", "magcache", "--magcache_calibration", calibration]
    stage2(*magcache, "--output_dir", tmp_path / "exact", "--magcache_threshold", 0)
    assert np.array_equal(latents(tmp_path / "exact"), latents(tmp_path / "full"))
    proc = stage2(*magcache, "--output_dir", tmp_path / "fast", "--magcache_threshold", 1.0)
    record = json.loads((tmp_path / "fast" / "config.json").read_text())["stage2"]
    assert record["cache_type"] == "magcache" and record["cached_steps"] > 0 and record["magcache_threshold"] == 1.0
    for flags, message in ((["--num_inference_steps", 10], "holds 12 steps, the run has --num_inference_steps 10"),
                           (["--flow_shift", 7], "calibrated with flow_shift=5.0, the run has 7.0")):
        proc = stage2(*magcache, "--output_dir", tmp_path / "bad", *flags, check=False)
        assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "bad").exists()


def test_splash_run_with_profiler_trace(demo, tmp_path):
    proc = stage2("--input_dir", demo, "--output_dir", tmp_path / "out", "--attention", "splash",
                  "--splash_block_q", 128, "--splash_block_kv", 128,
                  "--enable_profiler", "--profiler_output_dir", tmp_path / "trace", "--profiler_steps", 2)
    assert "profiler: 2 steps traced" in proc.stderr
    assert list((tmp_path / "trace").rglob("*.xplane.pb")), "no trace file written"
    out, reference = latents(tmp_path / "out"), latents(demo)
    assert np.linalg.norm(out - reference) / np.linalg.norm(reference) <= 1e-5
    assert json.loads((tmp_path / "out" / "config.json").read_text())["stage2"]["attention"] == "splash"


def test_sparse_model_runs_ssta_without_a_flag(demo, tmp_path):
    common = ["--input_dir", demo, "--model", "tiny_sparse", "--num_inference_steps", 3, "--warmup_steps", 0]
    # the Pallas kernel (interpreted here) against the XLA one: tests/test_ssta.py, in the jitted DiT
    stage2(*common, "--output_dir", tmp_path / "xla")
    stage2(*common, "--output_dir", tmp_path / "dense", "--dense_attention")
    record = json.loads((tmp_path / "xla" / "config.json").read_text())["stage2"]
    assert record["guidance_scale"] == 1.0 and record["dense_attention"] is False  # sparse models are CFG-distilled
    assert record["sparse_attention"] == "auto"
    sparse, dense = latents(tmp_path / "xla"), latents(tmp_path / "dense")
    assert np.linalg.norm(dense - sparse) >= 1e-4 * np.linalg.norm(sparse)
    help_text = stage2("--help").stdout
    assert "--sparse_attention" in help_text and "block-sparse kernel" in help_text


@pytest.mark.parametrize("flags,message", [
    (["--attention", "cudnn"], "--attention cudnn needs a GPU"),
    (["--splash_block_kv", 1024, "--splash_block_kv_compute", 384], "--splash_block_kv_compute 384 does not divide"),
    (["--mesh", "tp=3"], "--mesh tp=3: uses 3 devices, but 8 are available"),
    (["--mesh", "tp=8", "--sharding", "sp"], "axis tp=8 is not used by strategy sp"),
    (["--mesh", "sp=4,tp=2", "--sharding", "sp"], "axis tp=2 is not used"),
])
def test_bad_mesh(demo, tmp_path, flags, message):
    proc = stage2("--input_dir", demo, "--output_dir", tmp_path / "out", *flags, check=False, devices=8)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ---- bad input: one line on stderr, exit 2, nothing created or clobbered ---------------------

def _break_tensor(folder: Path, name: str, value) -> None:
    tensors = load_file(str(folder / "embeddings.safetensors"))
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value(tensors[name])
    save_file(tensors, str(folder / "embeddings.safetensors"))


def _truncate(folder: Path) -> None:
    data = (folder / "embeddings.safetensors").read_bytes()
    (folder / "embeddings.safetensors").write_bytes(data[: len(data) // 2])


def _set_config(folder: Path, **updates) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(updates)
    (folder / "config.json").write_text(json.dumps(config))


def _nan(t):
    t = t.clone()
    t[0, 0, 0] = float("nan")
    return t


BAD_INPUTS = {
    "missing folder": (lambda f: shutil.rmtree(f), [], "no such folder"),
    "folder is a file": (lambda f: (shutil.rmtree(f), f.write_text("x")), [], "in: is a file, not a stage folder"),
    "missing embeddings": (lambda f: (f / "embeddings.safetensors").unlink(), [], "embeddings.safetensors: no such file"),
    "truncated embeddings": (_truncate, [], "embeddings.safetensors: cannot read safetensors file"),
    "missing tensor": (lambda f: _break_tensor(f, "negative_prompt_mask_2", None), [], "missing tensor\\(s\\) negative_prompt_mask_2"),
    "wrong width": (lambda f: _break_tensor(f, "prompt_embeds", lambda t: torch.zeros(1, t.shape[1], 3584)), [],
                    "prompt_embeds is 3584 wide but the model takes 64"),
    "non-finite": (lambda f: _break_tensor(f, "prompt_embeds_2", _nan), [], "prompt_embeds_2 has non-finite values"),
    "video length": (lambda f: None, ["--video_length", 50], "--video_length 50 must be of the form 4k\\+1"),
    "config video length": (lambda f: _set_config(f, video_length=50), [],
                            "config.json: video_length 50 must be of the form 4k\\+1"),  # named where it came from
    "config steps": (lambda f: _set_config(f, num_inference_steps=0), [], "config.json: num_inference_steps must be"),
    "resolution": (lambda f: None, ["--width", 100], "--width 100 must be a positive multiple of 16"),
    "config value": (lambda f: _set_config(f, seed="many"), [], "seed='many' is not an integer"),
    "unknown model": (lambda f: None, ["--model", "nonexistent"], "--model nonexistent: no such checkpoint"),
    "missing lora": (lambda f: None, ["--lora", "/nonexistent/adapter.safetensors"], "adapter.safetensors: no such file"),
    "cache order": (lambda f: None, ["--enable_cache", "--cache_start_step", 30, "--cache_end_step", 20],
                    "--cache_start_step 30 is after --cache_end_step 20"),
    "cache interval": (lambda f: None, ["--enable_cache", "--cache_step_interval", 0], "--cache_step_interval 0 must be >= 1"),
    "cache end": (lambda f: None, ["--enable_cache", "--num_inference_steps", 30],
                  r"--cache_end_step 45 is past the last step \(--num_inference_steps 30\)"),
    "cache blocks": (lambda f: None, ["--enable_cache", "--cache_keep_blocks", 3], "--cache_keep_blocks 3 must be between 1"),
    "cache on and off": (lambda f: None, ["--enable_cache", "--cache_type", "none"],
                         "--enable_cache turns a cache on and --cache_type none turns it off"),
    "magcache without file": (lambda f: None, ["--cache_type", "magcache"], "needs --magcache_calibration FILE"),
    "missing calibration": (lambda f: None, ["--cache_type", "magcache", "--magcache_calibration", "/no.json"],
                            "/no.json: no such MagCache calibration file"),
    "calibrate with a cache": (lambda f: None, ["--cache_type", "teacache", "--magcache_calibrate", "c.json"],
                               "--magcache_calibrate runs every step in full: drop --cache_type teacache"),
    "taylor too early": (lambda f: None, ["--cache_type", "taylorcache", "--cache_start_step", 0],
                         "--cache_start_step 0: TaylorCache needs two full steps"),
    "config cache type": (lambda f: _set_config(f, cache_type="fastcache"), [],
                          "cache_type 'fastcache' is not one of none, deepcache"),
    "does not fit": (lambda f: None, ["--height", 16000, "--width", 16000, "--video_length", 1001],
                     r"the step needs at least [\d,.]+ GB per device .* use a shorter --video_length"),
    "zero shift": (lambda f: None, ["--flow_shift", 0], r"--flow_shift 0.0 must be > 0"),
    "nan shift": (lambda f: None, ["--flow_shift", "nan"], "argument --flow_shift: 'nan' is not a finite number"),
    "inf guidance": (lambda f: None, ["--guidance_scale", "inf"], "argument --guidance_scale: 'inf' is not a finite"),
    "nan lora scale": (lambda f: None, ["--lora_scale", "nan"], "argument --lora_scale: 'nan' is not a finite"),
    "zero width": (lambda f: None, ["--width", 0], "--width 0 must be a positive multiple of 16"),
    "fractional config int": (lambda f: _set_config(f, video_length=9.9), [], "video_length=9.9 is not an integer"),
    "bool config int": (lambda f: _set_config(f, height=True), [], "height=True is not an integer"),
    "huge seed": (lambda f: None, ["--seed", 2**70], "--seed 1180591620717411303424 must be between 0 and 2"),
    "zero heads": (lambda f: _checkpoint_config(f, heads_num=0), [], "heads_num must be a positive integer, got 0"),
    "string width": (lambda f: _checkpoint_config(f, hidden_size="2048"), [],
                     "hidden_size must be a positive integer, got '2048'"),
    "sparse kernel": (lambda f: _set_config(f, sparse_attention="flash"), [],
                      "--sparse_attention 'flash' is not one of auto, xla, pallas"),
    "splash block": (lambda f: None, ["--splash_block_q", 100], "--splash_block_q 100 must be a positive multiple of 128"),
    "sparse checkpoint": (lambda f: _sparse_checkpoint(f, ssta_threshold=0.5), [],
                          "attn_param ssta_threshold=0.5 is not implemented"),
}


def _checkpoint_config(folder: Path, **updates) -> None:
    """A tiny checkpoint (in ``folder``/ckpt, the run's model) whose config.json has ``updates``."""
    save_transformer(HunyuanVideo15DiT(DiTConfig.preset("tiny")), folder / "ckpt")
    config = json.loads((folder / "ckpt" / "config.json").read_text())
    config.update(updates)
    (folder / "ckpt" / "config.json").write_text(json.dumps(config))
    _set_config(folder, model=str(folder / "ckpt"))


def _sparse_checkpoint(folder: Path, **attn_param) -> None:
    """A tiny checkpoint whose config.json asks for SSTA with ``attn_param``."""
    _checkpoint_config(folder, attn_mode="flex-block-attn", attn_param=attn_param)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(case, demo, tmp_path):
    breaker, extra, message = BAD_INPUTS[case]
    folder = tmp_path / "in"
    shutil.copytree(demo, folder)
    (folder / "latents.safetensors").write_bytes(b"previous run")
    out = tmp_path / "out"
    breaker(folder)
    proc = stage2("--input_dir", folder, "--output_dir", out, *extra, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()
    if folder.is_dir():
        assert (folder / "latents.safetensors").read_bytes() == b"previous run"


def test_non_finite_result_replaces_nothing(demo, tmp_path):
    # a finite but absurd adapter strength blows the latents up: exit 2, the earlier output untouched
    folder = tmp_path / "in"
    shutil.copytree(demo, folder)
    (folder / "latents.safetensors").write_bytes(b"previous run")
    common = ["--lora", tiny_adapter(tmp_path), "--lora_scale", 1e30, "--num_inference_steps", 2, "--warmup_steps", 0]
    proc = stage2("--input_dir", folder, "--output_dir", tmp_path / "new", *common, check=False)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "the denoised latents hold NaN or inf: nothing written" in line and "--lora_scale" in line
    assert not (tmp_path / "new").exists()  # the folder the run made is gone
    (folder / "latents.safetensors").write_bytes(b"previous run")  # into the input folder: the old file stays
    assert stage2("--input_dir", folder, *common, check=False).returncode == 2
    assert (folder / "latents.safetensors").read_bytes() == b"previous run"
    # a NaN in the file itself is refused before anything runs
    proc = stage2("--input_dir", folder, "--lora", tiny_adapter(tmp_path, poison=True), check=False)
    assert proc.returncode == 2 and "nan.safetensors: tensor" in proc.stderr and "holds NaN or inf" in proc.stderr


def test_output_path_that_is_a_file_is_one_line(demo, tmp_path):
    (tmp_path / "taken").write_text("a file")
    proc = stage2("--input_dir", demo, "--output_dir", tmp_path / "taken", "--num_inference_steps", 1, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'taken'}: File exists"
    assert (tmp_path / "taken").read_text() == "a file"


def test_demo_refuses_to_overwrite_real_inputs(demo, tmp_path):
    shutil.copytree(demo, tmp_path, dirs_exist_ok=True)
    _set_config(tmp_path, stage1={"text_encoder": "qwen"})
    before = (tmp_path / "embeddings.safetensors").read_bytes()
    proc = stage2("--demo", "--output_dir", tmp_path, check=False)
    assert proc.returncode == 2 and "holds real stage-1 outputs" in proc.stderr
    assert (tmp_path / "embeddings.safetensors").read_bytes() == before
