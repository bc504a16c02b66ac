"""hunyuan_tpu.HunyuanVideoPipeline, the Python API: loaded once, a second call of the same shapes
compiles nothing, a new shape compiles once; the same tensors as run/generate.py for the same
settings; the official checkpoint layout; bad settings as errors, not exits."""

import json
import re
from pathlib import Path

import imageio.v3 as iio
import jax
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cli_runner
import compiles
from adapters import tiny_adapter
from hunyuan_tpu import Generation, HunyuanVideoPipeline
from hunyuan_tpu import image_condition as ic
from hunyuan_tpu.files import InputError
from hunyuan_tpu.generation import STAGES, official_paths
from hunyuan_tpu.vae import encode_image, tiny_vae
from official_layout import official_root

FAST = {"video_length": 5, "num_inference_steps": 2}  # 2 x 6 x 10 latents on the tiny models


def quiet(template: str) -> None:
    pass


@pytest.fixture(scope="module")
def pipe() -> HunyuanVideoPipeline:
    """The tiny models, loaded once for the module, on one device (as cli_runner.call runs a command)."""
    return HunyuanVideoPipeline.from_pretrained("tiny", devices=jax.devices()[:1], note=quiet, progress=False)


def test_a_second_call_compiles_nothing_and_a_new_shape_compiles_once(pipe, tmp_path):
    loaded = dict(pipe.load_seconds)
    assert set(loaded) == {"encoders", "transformer", "vae"}
    first = pipe('A neon sign that says "OPEN"', seed=1, **FAST)
    assert first.frames.shape == (5, 96, 160, 3) and first.frames.dtype == np.uint8 and first.fps == 24
    assert first.latents.shape == (1, 32, 2, 6, 10) and first.config["stage2"]["compile_s"] > 0
    assert set(first.timings) == {"stage1", "stage2", "stage3"} and first.timings["stage3"]["decode_s"] > 0
    with compiles.recorded() as compiled:
        # another prompt (of the same text bucket), seed, guidance and shift: other values, the same shapes
        second = pipe("a cat walks on the grass, realistic", seed=2, guidance_scale=4.0, flow_shift=7.0, **FAST)
    assert compiled == [] and pipe.load_seconds == loaded
    assert second.config["stage1"]["load_s"] < 0.01 and second.config["stage3"]["load_s"] < 0.01
    assert not np.array_equal(first.frames, second.frames)
    with compiles.recorded() as compiled:
        square = pipe("a cat", aspect_ratio="1:1", **FAST)  # 128 x 128: a new shape
    assert square.frames.shape == (5, 128, 128, 3)
    assert sorted(compiled) == ["jit(decode_tile)", "jit(step)"], compiled  # the step once, not once per step
    with compiles.recorded() as compiled:
        pipe("a dog", aspect_ratio="1:1", **FAST)
    assert compiled == []
    video = square.save(tmp_path / "square.mp4")
    assert iio.imread(video).shape == (5, 128, 128, 3)


def test_call_equals_generate_cli_with_an_image_and_super_resolution(pipe, tmp_path):
    """One code path: generate.py's files, and those of the four stage commands chained through
    the hand-off folder, hold the call's tensors byte for byte (i2v and SR: every stage and the
    image conditions); the SR models load on the first call that asks."""
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((300, 400, 3)) * 255).astype(np.uint8)).save(tmp_path / "first.png")
    out, staged = tmp_path / "out", tmp_path / "staged"
    proc = cli_runner.call("generate.py", "--prompt", "the waves roll in", "--image", tmp_path / "first.png",
                           "--output_dir", out, "--video_length", 9, "--num_inference_steps", 4, "--sr",
                           "--sr_num_inference_steps", 3)
    cli_runner.call("stage1_text_encoder.py", "--prompt", "the waves roll in", "--image", tmp_path / "first.png",
                    "--output_dir", staged, "--video_length", 9, "--sr")
    cli_runner.call("stage2_transformer.py", "--input_dir", staged, "--num_inference_steps", 4)
    cli_runner.call("stage2_sr.py", "--input_dir", staged, "--num_inference_steps", 3)
    cli_runner.call("stage3_vae_decoder.py", "--input_dir", staged)
    for name in ("embeddings.safetensors", "latents.safetensors", "sr_latents.safetensors", "video.mp4",
                 "first_frame.png"):
        assert (staged / name).read_bytes() == (out / name).read_bytes(), name
    assert "no --vision_encoder" in proc.stderr and re.search(r"SR [\d.]+ s, stage 3", proc.stdout)
    c = json.loads((out / "config.json").read_text())
    assert (c["task"], c["height"], c["width"]) == ("i2v", 112, 144)  # the 4:3 bucket of the 96p family
    embeddings = load_file(str(out / "embeddings.safetensors"))
    assert embeddings["vision_states"].shape == (1, (ic.TINY_IMAGE_SIZE // 14) ** 2, 48)
    image = ic.read_image(tmp_path / "first.png")
    expected = encode_image(tiny_vae(), ic.to_pixels(ic.resize_center_crop(image, 112, 144)))
    assert expected.shape == (1, 32, 1, 7, 9)
    torch.testing.assert_close(embeddings["image_cond_latents"], expected)
    # the SR canvas: the 144p bucket closest to 144:112, the image encoded again at that size
    assert (c["sr"]["height"], c["sr"]["width"], c["sr"]["num_inference_steps"]) == (160, 208, 3)
    expected = encode_image(tiny_vae(), ic.to_pixels(ic.resize_center_crop(image, 160, 208)))
    torch.testing.assert_close(embeddings["sr_image_cond_latents"], expected)
    assert embeddings["sr_vision_states"].shape == embeddings["vision_states"].shape
    assert load_file(str(out / "sr_latents.safetensors"))["latents"].shape == (1, 32, 3, 10, 13)
    assert iio.imread(out / "video.mp4").shape == (9, 160, 208, 3)  # stage 3 decodes the SR latents

    result = pipe("the waves roll in", image=Image.open(tmp_path / "first.png"), video_length=9,
                  num_inference_steps=4, sr=True, sr_num_inference_steps=3)
    assert {"sr_transformer", "upsampler", "vision_encoder"} <= set(pipe.load_seconds)
    for name, tensors in (("embeddings", result.embeddings), ("latents", {"latents": result.base_latents}),
                          ("sr_latents", {"latents": result.latents})):
        saved = load_file(str(out / f"{name}.safetensors"))
        assert sorted(saved) == sorted(tensors), name
        for key, value in saved.items():
            assert np.array_equal(value.numpy(), np.asarray(tensors[key])), (name, key)
    assert np.array_equal(iio.imread(out / "first_frame.png"), result.frames[0])
    assert result.save(tmp_path / "api.mp4").read_bytes() == (out / "video.mp4").read_bytes()
    settings = lambda config: {k: v for k, v in config.items() if k not in STAGES}  # noqa: E731
    assert settings(result.config) == settings(c)


def test_from_pretrained_reads_the_official_checkpoint_root(tmp_path):
    root = official_root(tmp_path / "ckpts")
    assert official_paths(root, "480p_t2v") == {
        "model": str(root / "transformer/480p_t2v"), "vae": str(root / "vae"),
        "text_encoder": str(root / "text_encoder/llm"), "byt5": str(root / "text_encoder/Glyph-SDXL-v2"),
        "vision_encoder": None}
    assert official_paths(root, None)["model"] == str(root / "transformer/480p_t2v")  # the only version there
    pipe = HunyuanVideoPipeline.from_pretrained(root, "480p_t2v", dtype="float32", devices=jax.devices()[:1],
                                                note=quiet, progress=False)
    settings = {"resolution": "96p", "video_length": 5, "num_inference_steps": 2, "guidance_scale": 3.0}
    result = pipe('A sign that says "HI"', **settings)
    assert result.config["stage1"]["text_encoder"] == str(root / "text_encoder/llm")
    assert result.config["stage3"]["vae"] == str(root / "vae")
    out = tmp_path / "cli"
    paths = official_paths(root, "480p_t2v")
    cli_runner.call("generate.py", "--prompt", 'A sign that says "HI"', "--output_dir", out, "--dtype", "float32",
                    *[str(a) for k, v in {**settings, **paths}.items() if v is not None for a in (f"--{k}", v)])
    assert np.array_equal(load_file(str(out / "latents.safetensors"))["latents"].numpy(), result.latents)
    assert np.array_equal(iio.imread(out / "first_frame.png"), result.frames[0])


@pytest.mark.parametrize("call,message", [
    (lambda p: p("x", steps=3), "unknown setting\\(s\\) steps: a call takes negative_prompt, image"),
    (lambda p: p("x", video_length=50), "video_length 50 must be of the form 4k\\+1"),
    (lambda p: p(None), "prompt is missing"),
    (lambda p: p("x", cache_type="magcache"), "cache_type magcache needs magcache_calibration FILE"),
    (lambda p: p("x", image=np.zeros((4, 4), np.uint8)), "image is an array of shape \\(4, 4\\)"),
    (lambda p: p("x", image="/nonexistent.png"), "image /nonexistent.png: no such file"),
    (lambda p: p("x", guidance_scale=float("nan")), "guidance_scale nan is not a finite number"),
    (lambda p: HunyuanVideoPipeline(sharding_strategy="tp"), "unknown setting\\(s\\) sharding_strategy"),
    (lambda p: HunyuanVideoPipeline.from_pretrained("/nonexistent"), "root /nonexistent: no such folder"),
])
def test_bad_settings_raise_input_errors_naming_them(pipe, call, message):
    with pytest.raises(InputError, match=message):
        call(pipe)


def test_from_pretrained_loads_siglip_for_an_i2v_checkpoint(tmp_path):
    root = official_root(tmp_path / "ckpts", "480p_i2v")
    pipe = HunyuanVideoPipeline.from_pretrained(root, devices=jax.devices()[:1], note=quiet)
    assert set(pipe.load_seconds) == {"encoders", "vision_encoder", "transformer", "vae"}
    with pytest.raises(InputError, match="model .*480p_i2v is trained for i2v, but the run is t2v"):
        pipe("a cat")


def test_a_non_finite_result_is_an_error_not_a_video(tmp_path):
    """A finite but absurd adapter strength blows the latents up: an InputError naming the likely
    settings, and no Generation."""
    pipe = HunyuanVideoPipeline.from_pretrained("tiny", lora=tiny_adapter(tmp_path), lora_scale=1e30,
                                                devices=jax.devices()[:1], note=quiet, progress=False)
    with pytest.raises(InputError, match="denoised latents hold NaN or inf: no video made .*lora_scale and the LoRA"):
        pipe("x", **FAST)


def test_a_video_is_saved_as_mp4_only(pipe, tmp_path):
    video = Generation(np.zeros((1, 16, 16, 3), np.uint8), 24, np.zeros((1, 32, 1, 1, 1), np.float32),
                       np.zeros((1, 32, 1, 1, 1), np.float32), {}, {})
    with pytest.raises(InputError, match="path .*clip.gif: the video is written as .mp4"):
        video.save(tmp_path / "clip.gif")
    assert not (tmp_path / "clip.gif").exists()
    assert iio.imread(video.save(tmp_path / "clip.mp4")).shape == (1, 16, 16, 3)


def test_from_pretrained_names_what_the_root_lacks(tmp_path):
    (tmp_path / "transformer" / "480p_t2v").mkdir(parents=True)
    with pytest.raises(InputError, match="transformer_version is needed: .* holds no transformer"):
        official_paths(tmp_path, None)
    (tmp_path / "transformer" / "480p_t2v" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="transformer_version 720p_t2v: no .* \\(found: 480p_t2v\\)"):
        official_paths(tmp_path, "720p_t2v")
    with pytest.raises(InputError, match="no vae/ \\(the official layout has the vae there\\)"):
        official_paths(tmp_path, "480p_t2v")
    assert Path(official_paths("tiny", None)["model"]) == Path("tiny")
