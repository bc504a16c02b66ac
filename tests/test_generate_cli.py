"""run/stage1_text_encoder.py, run/stage3_vae_decoder.py and run/generate.py end to end on the
weight-free tiny default: the README's first command as a subprocess, the rest in-process. (The
stage commands chained equal generate.py and the Python API byte for byte: test_generation.py.)"""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import cli_runner

PROMPT = 'A neon sign that says "OPEN" flickers at night'
cli = cli_runner.call


def config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Path, float, subprocess.CompletedProcess]:
    """The README's first command, as a user runs it: every setting at its default."""
    folder = tmp_path_factory.mktemp("generate") / "out"
    begin = time.perf_counter()
    proc = cli_runner.spawn("generate.py", "--prompt", PROMPT, "--output_dir", folder)
    return folder, time.perf_counter() - begin, proc


def test_default_run_makes_a_video_in_under_two_minutes(default_run):
    folder, seconds, proc = default_run
    assert seconds < 120, f"generate.py took {seconds:.0f} s"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "embeddings.safetensors", "first_frame.png", "latents.safetensors", "video.mp4"]
    assert not list(folder.parent.glob(".out.tmp*"))
    for line in ("no --text_encoder", "no --byt5", "no --vae"):
        assert line in proc.stderr
    c = config(folder)
    assert (c["task"], c["model"], c["resolution"]) == ("t2v", "tiny", "96p")
    assert c["stage1"]["glyph_texts"] == ["OPEN"] and c["stage2"]["steps"] == 50
    assert c["stage2"]["latent_shape"] == [13, 6, 10]
    assert (c["stage3"]["frames"], c["stage3"]["height"], c["stage3"]["width"]) == (49, 96, 160)
    video = iio.imread(folder / "video.mp4")
    assert video.shape == (49, 96, 160, 3)
    frame = iio.imread(folder / "first_frame.png")
    assert frame.shape == (96, 160, 3) and frame.std() > 1  # not a flat image
    # the mp4 is lossy (and chroma-subsampled): compare brightness, frame 0 against the PNG
    luma = [np.corrcoef(video[i].mean(-1).ravel(), frame.mean(-1).ravel())[0, 1] for i in (0, 1)]
    assert luma[0] > 0.9 and luma[0] > luma[1]
    embeddings = load_file(str(folder / "embeddings.safetensors"))
    assert embeddings["prompt_embeds"].shape == (1, 1000, 64) and embeddings["prompt_embeds_2"].shape == (1, 256, 32)
    assert embeddings["prompt_mask_2"].sum() > 0 and embeddings["negative_prompt_mask_2"].sum() == 0
    assert "vision_states" not in embeddings


def test_stage3_eager_torch_equals_jax(default_run, tmp_path):
    proc = cli("stage3_vae_decoder.py", "--input_dir", default_run[0], "--output_dir", tmp_path, "--backend", "torch")
    assert "(torch)" in proc.stdout
    eager = iio.imread(tmp_path / "first_frame.png").astype(int)
    jitted = iio.imread(default_run[0] / "first_frame.png").astype(int)
    assert np.abs(eager - jitted).max() <= 1  # uint8 rounding of float32 results that agree to ~1e-6
    assert config(tmp_path)["stage3"]["backend"] == "torch"


def test_long_prompt_is_truncated_with_a_warning(tmp_path):
    proc = cli("stage1_text_encoder.py", "--prompt", "word " * 300, "--output_dir", tmp_path)
    assert re.search(r"warning: the prompt is \d+ tokens .* the last \d+ are cut off", proc.stderr)
    assert config(tmp_path)["stage1"]["truncated_tokens"] > 0
    assert load_file(str(tmp_path / "embeddings.safetensors"))["prompt_mask"].all()


def test_generate_help_has_every_stage_flag():
    out = cli("generate.py", "--help").stdout
    for flag in ("--prompt", "--negative_prompt", "--image", "--text_encoder", "--byt5", "--vision_encoder",
                 "--text_encoder_dtype", "--byt5_dtype", "--vision_encoder_dtype", "--model", "--dtype", "--vae",
                 "--vae_dtype", "--video_length", "--resolution",
                 "--aspect_ratio", "--num_inference_steps", "--guidance_scale", "--flow_shift", "--seed",
                 "--warmup_steps", "--backend", "--tile_size", "--tile_overlap", "--no_tiling", "--fps", "--output_dir",
                 "--sr", "--sr_model", "--upsampler", "--sr_num_inference_steps", "--lq_noise_seed"):
        assert flag in out, flag
    for flag in ("--input_dir", "--demo", "--resume"):
        assert flag not in out


# ---- bad input: exit 2, the error on stderr's last line, nothing created or clobbered --------

def _bad(script: str, args: list, message: str, out: Path, single_line: bool = True) -> None:
    proc = cli(script, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    if single_line:
        assert len(lines) == 1, proc.stderr
    assert re.search(message, lines[-1]), lines[-1]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp*"))


STAGE1_BAD = {
    "no prompt": ([], "--prompt is missing"),
    "undecodable prompt": (["--prompt", "caf\udce9"], "--prompt is not valid UTF-8 text \\(at character 3\\)"),
    "bad dtype": (["--prompt", "x", "--text_encoder_dtype", "int8"], "argument --text_encoder_dtype: invalid choice"),
    "bad backend": (["--prompt", "x", "--encoder_backend", "tpu"], "argument --encoder_backend: invalid choice"),
    "missing text encoder": (["--prompt", "x", "--text_encoder", "/nonexistent/llm"], "--text_encoder /nonexistent/llm: no such folder"),
    "missing image": (["--prompt", "x", "--image", "/nonexistent.png"], "--image /nonexistent.png: no such file"),
    "vision without image": (["--prompt", "x", "--vision_encoder", "/x"], "--vision_encoder is for i2v"),
    "video length": (["--prompt", "x", "--video_length", 50], "--video_length 50 must be of the form 4k\\+1"),
}


@pytest.mark.parametrize("case", STAGE1_BAD)
def test_stage1_bad_input(case, tmp_path):
    args, message = STAGE1_BAD[case]
    _bad("stage1_text_encoder.py", [*args, "--output_dir", tmp_path / "out"], message, tmp_path / "out")


def test_stage1_unreadable_image(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    _bad("stage1_text_encoder.py", ["--prompt", "x", "--image", tmp_path / "bad.jpg", "--output_dir", tmp_path / "out"],
         "--image .*bad.jpg: cannot read the image", tmp_path / "out")


@pytest.mark.parametrize("flags,message", [
    (["--num_inference_steps", 0], "--num_inference_steps must be >= 1"),
    (["--cache_type", "magcache"], "--cache_type magcache needs --magcache_calibration"),
    (["--tile_size", 100], "--tile_size 100 must be a positive multiple of 16"),
    (["--vae", "/nonexistent"], "--vae /nonexistent: no such folder"),
])
def test_generate_checks_every_stage_before_running_any(flags, message, tmp_path):
    """A bad flag of stage 2 or 3 is refused before stage 1 runs: one line, nothing written."""
    _bad("generate.py", ["--prompt", "x", "--output_dir", tmp_path / "out", *flags], message, tmp_path / "out")
    _bad("generate.py", ["--output_dir", tmp_path / "out"], "--prompt is missing", tmp_path / "out")


FULL_DISK = {
    "stage1_text_encoder.py": r"out/embeddings.safetensors: File too large",
    "stage2_transformer.py": r"out/latents.safetensors: File too large",
    "stage3_vae_decoder.py": r"video.mp4: the video writer wrote \d+ of 49 frames",
    "generate.py": r"out/embeddings.safetensors: File too large",  # not its work folder, which is gone
}


def test_full_disk_is_one_line_and_leaves_no_output(default_run, tmp_path):
    """A file-size limit (as a full disk does) makes a write fail: exit 1, one line naming the
    file, and no output under its final name (stage 3: ffmpeg's failure is caught by reading the
    video back). The four scripts run side by side."""
    running = {}
    for script in FULL_DISK:
        folder = tmp_path / script.removesuffix(".py")
        args = ["--prompt", PROMPT] if not script.startswith(("stage2", "stage3")) else ["--input_dir", default_run[0]]
        if script.startswith(("stage2", "generate")):  # generate.py writes once every stage has run
            args += ["--num_inference_steps", 2]
        if script.startswith("generate"):
            args += ["--video_length", 5]
        command = cli_runner.command(script, *args, "--output_dir", folder / "out")
        # files of at most 8 KiB (bash's ulimit -f counts KiB), for the process and its ffmpeg
        running[script] = subprocess.Popen(["bash", "-c", 'ulimit -f 8 && exec "$@"', "bash", *command],
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                           env=cli_runner.environment())
    for script, proc in running.items():
        _, stderr = proc.communicate(timeout=300)
        folder = tmp_path / script.removesuffix(".py")
        assert proc.returncode == 1, (script, stderr)
        assert re.search("^error: .*" + FULL_DISK[script], stderr.strip().splitlines()[-1]), (script, stderr)
        assert not (folder / "out").exists() and not list(folder.glob(".out.tmp*")), script


def test_stage3_bad_input(default_run, tmp_path):
    folder = default_run[0]
    _bad("stage3_vae_decoder.py", ["--input_dir", tmp_path / "none", "--output_dir", tmp_path / "out"],
         "no such folder", tmp_path / "out")
    _bad("stage3_vae_decoder.py", ["--input_dir", folder, "--output_dir", tmp_path / "out", "--vae", "/nonexistent"],
         "--vae /nonexistent: no such folder", tmp_path / "out")
    _bad("stage3_vae_decoder.py", ["--input_dir", folder, "--output_dir", tmp_path / "out", "--tile_size", 100],
         "--tile_size 100 must be a positive multiple of 16", tmp_path / "out")
    _bad("stage3_vae_decoder.py", ["--input_dir", folder, "--output_dir", tmp_path / "out", "--tile_overlap", 0.3],
         "--tile_overlap 0.3 of a --tile_size 256 tile is 4.8 latent pixels; it must be a whole number", tmp_path / "out")
    empty = tmp_path / "empty"  # latents with no frames
    shutil.copytree(folder, empty)
    save_file({"latents": torch.zeros(1, 32, 0, 6, 10)}, str(empty / "latents.safetensors"))
    _bad("stage3_vae_decoder.py", ["--input_dir", empty, "--output_dir", tmp_path / "out"],
         r"latents have shape \(1, 32, 0, 6, 10\), expected \(1, channels, T, H, W\), none of them 0", tmp_path / "out")
    from_config = tmp_path / "from_config"  # a bad value in config.json is named as its key there
    shutil.copytree(folder, from_config)
    (from_config / "config.json").write_text(json.dumps({**config(folder), "fps": 0}))
    _bad("stage3_vae_decoder.py", ["--input_dir", from_config, "--output_dir", tmp_path / "out"],
         r"from_config/config.json: fps must be >= 1, got 0", tmp_path / "out")
    fresh = tmp_path / "fresh"  # stage 1 only: latents from an earlier run would be stale
    fresh.mkdir()
    (fresh / "config.json").write_text(json.dumps({k: v for k, v in config(folder).items() if k != "stage2"}))
    (fresh / "latents.safetensors").write_bytes((folder / "latents.safetensors").read_bytes())
    _bad("stage3_vae_decoder.py", ["--input_dir", fresh, "--output_dir", tmp_path / "out"],
         "no \"stage2\" entry", tmp_path / "out")
