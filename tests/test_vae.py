"""hunyuan_tpu.vae: both checkpoint layouts, the tiled decode against diffusers', JAX against eager,
every device against one; stage 3's choice of latents."""

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo15
from safetensors.torch import save_file

import cli_runner
import compiles
from hunyuan_tpu import handoff
from hunyuan_tpu.files import InputError
from hunyuan_tpu.metrics import rel_l2
from hunyuan_tpu.pipeline import RESOLUTION_BASE, buckets
from hunyuan_tpu.runtime import torchax_env
from hunyuan_tpu.vae import (
    Tiling, decode, encode_image, load_vae, official_to_diffusers_name, posterior_latents, tiled, tiny_vae,
    to_frames, video_encoder,
)

DATA = Path(__file__).parent / "data" / "hunyuanvideo15_official_vae_params.json"


@pytest.fixture(scope="module")
def vae():
    return tiny_vae(seed=0)


@pytest.fixture(scope="module")
def latents():
    # 2 latent frames (5 video frames) of 6 x 10 latent pixels: several tiles of 4 latent pixels
    return torch.randn(1, 32, 2, 6, 10, generator=torch.Generator().manual_seed(1)).numpy()


def test_official_names_map_onto_diffusers_one_to_one():
    official = json.loads(DATA.read_text())["params"]
    with torch.device("meta"):
        reference = {k: list(v.shape) for k, v in AutoencoderKLHunyuanVideo15().state_dict().items()}
    mapped = {official_to_diffusers_name(k): shape for k, shape in official.items()}
    assert len(mapped) == len(official) == 218
    assert mapped == reference


def test_tiny_vae_compresses_like_the_released_one(vae):
    assert vae.model.config.latent_channels == 32
    assert (vae.model.spatial_compression_ratio, vae.model.temporal_compression_ratio) == (16, 4)


SMALL_TILES = Tiling(tile_px=64, overlap=0.25)  # 4 latent pixels, stride 3, 16-pixel seams


def test_tiled_decode_equals_diffusers_tiled_decode(vae, latents):
    ours = decode(vae, latents, backend="torch", tiling=SMALL_TILES)
    reference_model = tiny_vae(seed=0).model
    reference_model.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_latent_min_height=4,
                                  tile_latent_min_width=4, tile_overlap_factor=0.25)
    with torch.no_grad():
        reference = reference_model.decode(torch.from_numpy(latents) / vae.scaling_factor).sample.numpy()
    assert ours.shape == reference.shape == (1, 3, 5, 96, 160)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)
    # tiling is not a no-op here: the untiled decode differs at the seams
    assert np.abs(decode(vae, latents, backend="torch", tiling=None) - ours).max() > 1e-3


def _diffusers_tiled(latents: np.ndarray, tiling: Tiling) -> np.ndarray:
    """diffusers' decode with its tiling on (the official spatial_tiled_decode's algorithm)."""
    model = tiny_vae(seed=0).model
    size = tiling.tile_latent
    model.enable_tiling(tile_sample_min_height=tiling.tile_px, tile_sample_min_width=tiling.tile_px,
                        tile_latent_min_height=size, tile_latent_min_width=size, tile_overlap_factor=tiling.overlap)
    with torch.no_grad():
        return model.decode(torch.from_numpy(latents) / model.config.scaling_factor).sample.numpy()


# 8-pixel tiles every 6, 96 of 128 pixels kept: a side of 7 or 8 fits in a tile but not in
# what a tile keeps, as 15 or 16 latent pixels do at the default tiling (224 of 256 kept)
SEAM_TILES = Tiling(tile_px=128, overlap=0.25)
# latent (h, w) against SEAM_TILES: every shape class the buckets produce
SHAPE_CLASSES = {
    "both_tiled": (10, 14),
    "one_side_within_a_tile": (7, 14),
    "one_side_exactly_a_tile": (14, 8),
    "one_side_a_pixel_over": (9, 6),
    "both_within_a_tile": (7, 8),
}


def test_every_shape_class_equals_the_official_tiling(vae):
    # the walk and the seams are the backends' own code; the jax tiles equal torch's (tested below)
    for shape_class, (h, w) in SHAPE_CLASSES.items():
        latents = torch.randn(1, 32, 2, h, w, generator=torch.Generator().manual_seed(2)).numpy()
        ours = decode(vae, latents, backend="torch", tiling=SEAM_TILES)
        reference = _diffusers_tiled(latents, SEAM_TILES)
        assert ours.shape == reference.shape == (1, 3, 5, 16 * h, 16 * w), shape_class
        assert np.isfinite(ours).all()
        assert rel_l2(ours, reference) <= 1e-5, shape_class


def test_every_bucket_decodes_to_its_full_size():
    """The tile walk at the default tiling on every bucket of every family, with a stand-in
    tile decoder (16x nearest upsampling): the kept pieces cover the canvas exactly."""
    def upsample(tile: np.ndarray) -> np.ndarray:
        return tile.repeat(16, axis=-2).repeat(16, axis=-1)

    tiling = Tiling()
    for resolution in RESOLUTION_BASE:
        for height, width in buckets(resolution):
            z = np.arange(height * width // 256, dtype=np.float32).reshape(1, 1, 1, height // 16, width // 16)
            if height // 16 <= tiling.tile_latent and width // 16 <= tiling.tile_latent:
                continue  # decoded whole
            out = tiled(z, upsample, tiling)
            assert out.shape[-2:] == (height, width), (resolution, height, width)
            # seams blend equal pixels: nothing moves (np.array_equal: assert_array_equal's extra
            # passes over these 684 canvases, 0.8 G pixels, take seconds)
            assert np.array_equal(out, upsample(z)), (resolution, height, width)


def test_tiles_of_one_shape_are_decoded_together():
    """``tiled`` hands the decoder one stack per tile shape, in row-major order within it."""
    calls = []

    def upsample(tiles: np.ndarray) -> np.ndarray:
        calls.append(tiles.shape)
        return tiles.repeat(16, axis=-2).repeat(16, axis=-1)

    z = np.arange(10 * 10, dtype=np.float32).reshape(1, 1, 1, 10, 10)
    out = tiled(z, upsample, SMALL_TILES)  # tiles start at 0, 3, 6, 9 on both axes: 4, 4, 4 and 1 wide
    assert calls == [(9, 1, 1, 4, 4), (3, 1, 1, 4, 1), (3, 1, 1, 1, 4), (1, 1, 1, 1, 1)]
    np.testing.assert_array_equal(out, upsample(z))


def test_jax_on_every_device_equals_one_device_and_eager_torch(vae):
    """16 tiles of 4 shapes (9 interior, 3 right, 3 bottom, a corner) on 8 devices: the 9 in two
    calls (the second filled up with copies), each shape compiled once. Every device runs the
    one-device program on its own tile, so the pixels are the same bits; eager torch agrees to
    float32 rounding."""
    devices = jax.devices()
    assert len(devices) == 8  # tests/conftest.py
    latents = torch.randn(1, 32, 1, 10, 10, generator=torch.Generator().manual_seed(3)).numpy()
    torchax_env()  # the process's one-time torchax set-up is not part of a decode
    one = decode(vae, latents, backend="jax", tiling=SMALL_TILES, devices=devices[:1])
    with compiles.recorded() as compiled:
        every = decode(vae, latents, backend="jax", tiling=SMALL_TILES)
    assert compiled == ["jit(decode_tile)"] * 4
    assert every.shape == (1, 3, 1, 160, 160) and np.isfinite(every).all()
    np.testing.assert_array_equal(every, one)
    assert rel_l2(every, decode(vae, latents, backend="torch", tiling=SMALL_TILES)) < 1e-5


def test_untiled_decode_is_the_decoder_on_scaled_latents(vae, latents):
    with torch.no_grad():
        reference = vae.model.decode(torch.from_numpy(latents) / vae.scaling_factor).sample.numpy()
    np.testing.assert_allclose(decode(vae, latents, backend="torch", tiling=None), reference, rtol=0, atol=1e-6)
    # a canvas within one tile is decoded whole, whatever the tiling
    np.testing.assert_array_equal(decode(vae, latents, backend="torch", tiling=Tiling()),
                                  decode(vae, latents, backend="torch", tiling=None))


def test_frames_follow_the_official_save_video():
    video = np.array([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0], np.float32).reshape(1, 1, 1, 1, 6).repeat(3, axis=1)
    frames = to_frames(video)
    assert frames.shape == (1, 1, 6, 3) and frames.dtype == np.uint8
    assert frames[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


def test_encode_image_is_the_scaled_posterior_mode(vae):
    pixels = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    latents = encode_image(vae, pixels)
    assert latents.shape == (1, 32, 1, 4, 6)
    with torch.no_grad():
        mode = vae.model.encode(pixels[:, :, None]).latent_dist.mode()
    torch.testing.assert_close(latents, mode * vae.scaling_factor)


def test_tiled_encode_equals_diffusers_tiled_encode_on_every_backend(vae):
    """5 frames of 96 x 160 pixels in 64-pixel tiles every 48 (2 x 4 tiles of 4 shapes, a
    16-pixel sliver on the right): diffusers' tiled encode (the official spatial_tiled_encode's
    algorithm) against the eager walk, and the jax tiles on 8 devices against eager (the tiles'
    independence of the device count is the decode's test: the same runner)."""
    pixels = (torch.rand(1, 3, 5, 96, 160, generator=torch.Generator().manual_seed(5)) * 2 - 1).numpy()
    reference_model = tiny_vae(seed=0).model
    reference_model.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_latent_min_height=4,
                                  tile_latent_min_width=4, tile_overlap_factor=0.25)
    with torch.no_grad():
        reference = reference_model.encode(torch.from_numpy(pixels)).latent_dist.parameters.numpy()
    eager = video_encoder(vae, backend="torch", tiling=SMALL_TILES)(pixels)
    assert eager.shape == reference.shape == (1, 64, 2, 6, 10)
    np.testing.assert_allclose(eager, reference, rtol=0, atol=1e-5)
    assert np.abs(video_encoder(vae, backend="torch", tiling=None)(pixels) - eager).max() > 1e-3  # seams moved
    with compiles.recorded() as compiled:
        every = video_encoder(vae, backend="jax", tiling=SMALL_TILES)(pixels)
    assert compiled == ["jit(encode_tile)"] * 4
    assert rel_l2(every, eager) < 1e-5


def test_posterior_latents_are_the_scaled_mode_or_a_seeded_sample(vae):
    moments = np.concatenate([np.full((1, 32, 1, 2, 2), 0.5, np.float32), np.full((1, 32, 1, 2, 2), -60.0)], 1)
    np.testing.assert_array_equal(posterior_latents(moments, 2.0, "mode"), np.full((1, 32, 1, 2, 2), 1.0))
    a, b = posterior_latents(moments, 2.0, "sample", seed=1), posterior_latents(moments, 2.0, "sample", seed=2)
    assert np.abs(a - 1.0).max() < 1e-5  # log-variance clamped at -30: a sample hugs the mean
    moments[:, 32:] = 0.0  # unit variance
    a, b = posterior_latents(moments, 2.0, "sample", seed=1), posterior_latents(moments, 2.0, "sample", seed=2)
    assert not np.array_equal(a, b) and np.array_equal(a, posterior_latents(moments, 2.0, "sample", seed=1))
    with pytest.raises(InputError, match="posterior 'mean'"):
        posterior_latents(moments, 2.0, "mean")


def _official_config(model: AutoencoderKLHunyuanVideo15) -> dict:
    c = model.config
    return {"_class_name": "AutoencoderKLConv3D", "in_channels": c.in_channels, "out_channels": c.out_channels,
            "latent_channels": c.latent_channels, "block_out_channels": list(c.block_out_channels),
            "layers_per_block": c.layers_per_block, "ffactor_spatial": 16, "ffactor_temporal": 4,
            "sample_size": 256, "sample_tsize": 64, "scaling_factor": c.scaling_factor, "shift_factor": None,
            "downsample_match_channel": True, "upsample_match_channel": True}


# diffusers -> official names, written independently of the module's rules
TO_OFFICIAL = (
    (r"\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r".down.\1.block.\2."),
    (r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample."),
    (r"\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r".up.\1.block.\2."),
    (r"\.up_blocks\.(\d+)\.upsamplers\.0\.", r".up.\1.upsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.to_", ".mid.attn_1."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
)


def to_official(name: str) -> str:
    for pattern, replacement in TO_OFFICIAL:
        name = re.sub(pattern, replacement, name)
    return name


def test_load_both_layouts(vae, tmp_path):
    with torch.device("meta"):
        released = AutoencoderKLHunyuanVideo15().state_dict()
    assert {to_official(k) for k in released} == set(json.loads(DATA.read_text())["params"])
    vae.model.save_pretrained(tmp_path / "diffusers")
    state = vae.model.state_dict()
    renamed = {to_official(k): v.contiguous() for k, v in state.items()}
    (tmp_path / "official").mkdir()
    save_file(renamed, str(tmp_path / "official" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "official" / "config.json").write_text(json.dumps(_official_config(vae.model)))
    for layout in ("diffusers", "official"):
        loaded = load_vae(tmp_path / layout)
        assert loaded.model.state_dict().keys() == state.keys()
        for name, tensor in loaded.model.state_dict().items():
            assert torch.equal(tensor, state[name]), (layout, name)
    assert load_vae(tmp_path / "official", torch.bfloat16).dtype == torch.bfloat16


def test_load_errors_name_the_problem(vae, tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        load_vae(tmp_path / "missing")
    folder = tmp_path / "vae"
    vae.model.save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    with pytest.raises(InputError, match="diffusion_pytorch_model.safetensors: no such file"):
        load_vae(folder)
    state = {k: v.contiguous() for k, v in vae.model.state_dict().items()}
    state["decoder.conv_in.conv.bias"] = torch.zeros(3)
    save_file(state, str(weights))
    with pytest.raises(InputError, match="decoder.conv_in.conv.bias has shape"):
        load_vae(folder)
    (folder / "config.json").write_text(json.dumps({**_official_config(vae.model), "shift_factor": 0.1}))
    with pytest.raises(InputError, match="shift_factor"):
        load_vae(folder)
    with pytest.raises(InputError, match="tile_size 100"):
        Tiling(tile_px=100)
    with pytest.raises(InputError, match="tile_overlap 0.25 of a tile_size 96 tile is 1.5 latent pixels"):
        Tiling(tile_px=96, overlap=0.25)


# ---- stage 3: which latents it decodes -------------------------------------------------------

def test_stage3_decodes_the_sr_latents_of_this_run(tmp_path):
    """auto: the SR latents once the SR stage has recorded them, else the base ones; sr without
    them is one line of error; base whatever there is. The SR canvas is larger, so the video's
    size tells which latents were decoded."""
    folder = tmp_path / "run"
    folder.mkdir()
    handoff.write_config(folder, {"stage1": {}, "stage2": {}})
    gen = torch.Generator().manual_seed(4)
    handoff.write_latents(folder, torch.randn(1, 32, 1, 2, 3, generator=gen).numpy())

    def stage3(name: str, *flags, devices: int = 1) -> dict:
        out = tmp_path / name
        cli_runner.call("stage3_vae_decoder.py", "--input_dir", folder, "--output_dir", out, *flags, devices=devices)
        record = json.loads((out / "config.json").read_text())["stage3"]
        return {k: record[k] for k in ("latents", "height", "width", "device_count")}

    base = {"latents": "latents.safetensors", "height": 32, "width": 48, "device_count": 1}
    sr = {"latents": "sr_latents.safetensors", "height": 48, "width": 64, "device_count": 1}
    assert stage3("auto_without_sr", "--backend", "torch") == base
    proc = cli_runner.call("stage3_vae_decoder.py", "--input_dir", folder, "--output_dir", tmp_path / "bad",
                           "--latents", "sr", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert re.search(r"--latents sr: .*sr_latents.safetensors: no such file", proc.stderr)
    handoff.write_latents(folder, torch.randn(1, 32, 1, 3, 4, generator=gen).numpy(), name=handoff.SR_LATENTS_NAME)
    # a leftover of an earlier run: this run's config.json has no SR record
    proc = cli_runner.call("stage3_vae_decoder.py", "--input_dir", folder, "--output_dir", tmp_path / "bad",
                           "--latents", "sr", check=False)
    assert proc.returncode == 2 and 'no "sr" entry' in proc.stderr
    assert stage3("auto_leftover_sr", "--backend", "torch") == base
    handoff.update_config(folder, {"sr": {}})
    assert stage3("auto", devices=8) == {**sr, "device_count": 8}
    assert stage3("sr", "--latents", "sr", "--backend", "torch") == sr
    assert stage3("base", "--latents", "base", "--backend", "torch") == base
