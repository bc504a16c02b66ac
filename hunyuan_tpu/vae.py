"""The video VAE: diffusers' ``AutoencoderKLHunyuanVideo15`` loaded from either checkpoint layout,
decoded tile by tile (eager PyTorch, or one jitted JAX function per tile shape that decodes
a tile per device on all devices at once), and the image encode that i2v conditions on.

The released VAE (1.26B parameters) compresses 16x in space and 4x in time into 32 channels.
Decoding 720p x 121 frames whole does not fit in 80 GB; the official pipeline decodes 256-pixel
spatial tiles that overlap by 1/8 and blends the seams linearly, each tile over all frames.
``decode`` does the same, so its output equals the official (and diffusers') tiled decode.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import jax
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLHunyuanVideo15
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .files import InputError, read_json, read_safetensors
from .pipeline import LATENT_CHANNELS, VAE_SPATIAL
from .random_init import randomize_like_trained_
from .runtime import JaxParams, jax_view, to_host_array

Backend = Literal["torch", "jax"]
BACKENDS: tuple[str, ...] = ("jax", "torch")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Smallest channel widths the architecture allows at 16x / 4x compression and 32 latent
# channels: the encoder's last width is a multiple of 2 x 32, the decoder's first of 32.
TINY_BLOCK_OUT_CHANNELS = (8, 16, 32, 64, 64)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Spatial tiling of the decode; official defaults for GPUs with more than 21 GB
    (``get_vae_inference_config``: sample_size 256, tile_overlap_factor 0.125)."""

    tile_px: int = 256
    overlap: float = 0.125

    def __post_init__(self) -> None:
        if self.tile_px < VAE_SPATIAL or self.tile_px % VAE_SPATIAL:
            raise InputError(f"{{tile_size}} {self.tile_px} must be a positive multiple of {VAE_SPATIAL}")
        if not 0.0 <= self.overlap < 1.0:
            raise InputError(f"{{tile_overlap}} {self.overlap} must be in [0, 1)")
        if self.stride_latent < 1:
            raise InputError(f"{{tile_size}} {self.tile_px} with {{tile_overlap}} {self.overlap} leaves no stride")
        seam = self.tile_latent * self.overlap
        if abs(seam - round(seam)) > 1e-9:  # the official VAE asserts it: else the kept pieces overlap or gap
            raise InputError(f"{{tile_overlap}} {self.overlap} of a {{tile_size}} {self.tile_px} tile is {seam:g} "
                             f"latent pixels; it must be a whole number")

    @property
    def tile_latent(self) -> int:
        return self.tile_px // VAE_SPATIAL

    @property
    def stride_latent(self) -> int:
        return int(self.tile_latent * (1 - self.overlap))

    @property
    def blend_px(self) -> int:
        return int(self.tile_px * self.overlap)

    @property
    def stride_px(self) -> int:
        """Where the encoder's pixel tiles start (``tiled_encode``)."""
        return int(self.tile_px * (1 - self.overlap))

    @property
    def blend_latent(self) -> int:
        return int(self.tile_latent * self.overlap)


@dataclasses.dataclass(frozen=True)
class VAE:
    model: AutoencoderKLHunyuanVideo15
    source: str  # a folder, or "tiny" for seeded random weights

    @property
    def scaling_factor(self) -> float:
        return float(self.model.config.scaling_factor)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


# ---- building and loading --------------------------------------------------------------------

def _cast(model: AutoencoderKLHunyuanVideo15, dtype: torch.dtype) -> AutoencoderKLHunyuanVideo15:
    # nn.Module.to: ModelMixin.to warns about modules to keep in float32, and this model has none.
    return torch.nn.Module.to(model, dtype)


def tiny_vae(latent_channels: int = LATENT_CHANNELS, dtype: torch.dtype = torch.float32, seed: int = 0) -> VAE:
    """A small VAE with the released compression (16x space, 4x time), trained-scale random weights."""
    model = AutoencoderKLHunyuanVideo15(
        latent_channels=latent_channels, block_out_channels=TINY_BLOCK_OUT_CHANNELS, layers_per_block=1
    )
    return VAE(_cast(randomize_like_trained_(model, seed=seed), dtype).eval(), "tiny")


# Official AutoencoderKLConv3D names -> diffusers names; applied in order, each at most once.
_OFFICIAL_RENAMES = (
    (r"\.down\.(\d+)\.block\.(\d+)\.", r".down_blocks.\1.resnets.\2."),
    (r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0."),
    (r"\.up\.(\d+)\.block\.(\d+)\.", r".up_blocks.\1.resnets.\2."),
    (r"\.up\.(\d+)\.upsample\.", r".up_blocks.\1.upsamplers.0."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn_1\.", ".mid_block.attentions.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
)
# Official config keys -> diffusers config keys (the others are tiling defaults, not architecture).
_OFFICIAL_CONFIG_KEYS = {
    "in_channels": "in_channels", "out_channels": "out_channels", "latent_channels": "latent_channels",
    "block_out_channels": "block_out_channels", "layers_per_block": "layers_per_block",
    "ffactor_spatial": "spatial_compression_ratio", "ffactor_temporal": "temporal_compression_ratio",
    "downsample_match_channel": "downsample_match_channel", "upsample_match_channel": "upsample_match_channel",
    "scaling_factor": "scaling_factor",
}
_OFFICIAL_IGNORED_KEYS = frozenset({"sample_size", "sample_tsize", "shift_factor"})


def official_to_diffusers_name(name: str) -> str:
    for pattern, replacement in _OFFICIAL_RENAMES:
        name = re.sub(pattern, replacement, name, count=1)
    return name


def _diffusers_config(raw: dict[str, Any], source: Path) -> tuple[dict[str, Any], bool]:
    """(diffusers constructor kwargs, whether the file is the official layout)."""
    if raw.get("_class_name") == "AutoencoderKLHunyuanVideo15":
        return {k: v for k, v in raw.items() if not k.startswith("_")}, False
    if "ffactor_spatial" not in raw:
        raise InputError(f"{source}: neither an AutoencoderKLHunyuanVideo15 (diffusers) nor an official "
                         "AutoencoderKLConv3D VAE config")
    if raw.get("shift_factor"):  # the reference decodes z / scale + shift; the released VAE has none
        raise InputError(f"{source}: shift_factor={raw['shift_factor']} is not supported (the released VAE has none)")
    unknown = sorted(k for k in raw if k not in _OFFICIAL_CONFIG_KEYS and k not in _OFFICIAL_IGNORED_KEYS
                     and not k.startswith("_"))
    if unknown:
        raise InputError(f"{source}: unknown official VAE config key(s) {', '.join(unknown)}")
    return {_OFFICIAL_CONFIG_KEYS[k]: v for k, v in raw.items() if k in _OFFICIAL_CONFIG_KEYS}, True


def load_vae(folder: str | Path, dtype: torch.dtype = torch.float32) -> VAE:
    """A VAE folder holding ``config.json`` and ``diffusion_pytorch_model.safetensors``, in the
    official layout (``ckpts/vae`` of tencent/HunyuanVideo-1.5) or the diffusers one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{{vae}} {folder}: no such folder")
    config_path, weights_path = folder / "config.json", folder / WEIGHTS_NAME
    kwargs, official = _diffusers_config(read_json(config_path), config_path)
    try:
        with torch.device("meta"):
            model = AutoencoderKLHunyuanVideo15(**kwargs)
    except (TypeError, ValueError, ZeroDivisionError, IndexError) as e:
        raise InputError(f"{config_path}: not a valid VAE configuration ({e})") from None
    tensors, _ = read_safetensors(weights_path, dtype=dtype)
    if official:
        tensors = {official_to_diffusers_name(k): v for k, v in tensors.items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise InputError(f"{weights_path}: does not match {config_path} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    wrong = [k for k, shape in expected.items() if tuple(tensors[k].shape) != shape]
    if wrong:
        raise InputError(f"{weights_path}: {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, "
                         f"expected {expected[wrong[0]]}")
    model.load_state_dict(tensors, assign=True)
    return VAE(_cast(model, dtype).eval(), str(folder))


def vae_config_latent_channels(folder: str | Path) -> int:
    """Latent channels of a VAE folder, read from its config only (to check before loading)."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise InputError(f"{{vae}} {folder}: no such folder")
    kwargs, _ = _diffusers_config(read_json(path), path)
    return int(kwargs.get("latent_channels", LATENT_CHANNELS))


# ---- decoding --------------------------------------------------------------------------------

def _blend_seam(prev: np.ndarray, cur: np.ndarray, extent: int, axis: int) -> None:
    """Cross-fade ``cur``'s first rows (or columns) from ``prev``'s last ones, in place."""
    extent = min(prev.shape[axis], cur.shape[axis], extent)
    if extent == 0:
        return
    shape = [1] * cur.ndim
    shape[axis] = extent
    w = (np.arange(extent, dtype=np.float32) / extent).reshape(shape)
    head = [slice(None)] * cur.ndim
    head[axis] = slice(0, extent)
    tail = [slice(None)] * cur.ndim
    tail[axis] = slice(prev.shape[axis] - extent, None)
    cur[tuple(head)] = prev[tuple(tail)] * (1 - w) + cur[tuple(head)] * w


def _causal_attention(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """diffusers' VAE mid-block attention, with the causal frame mask built by one comparison
    instead of diffusers' Python loop over every token (which tracing would unroll into one
    scatter per token: 7,936 per 720p tile). Same math: a token sees its own and earlier frames."""
    b, c, t, h, w = x.shape
    y = block.norm(x)
    q, k, v = (proj(y).flatten(2).transpose(1, 2)[:, None] for proj in (block.to_q, block.to_k, block.to_v))
    frame = torch.arange(t * h * w, device=x.device) // (h * w)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=frame[None, :] <= frame[:, None])
    out = out[:, 0].transpose(1, 2).reshape(b, c, t, h, w)
    return block.proj_out(out) + x


def _mid_block(mid: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = mid.resnets[0](x)
    for attention, resnet in zip(mid.attentions, mid.resnets[1:]):
        x = resnet(_causal_attention(attention, x) if attention is not None else x)
    return x


class StaticShapeDecoder(torch.nn.Module):
    """diffusers' HunyuanVideo-1.5 VAE decoder with a traceable mid-block attention
    (``_causal_attention``): same parameters, same math."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        x = dec.conv_in(z) + z.repeat_interleave(repeats=dec.repeat, dim=1)
        x = _mid_block(dec.mid_block, x)
        for block in dec.up_blocks:
            x = block(x)
        return dec.conv_out(dec.conv_act(dec.norm_out(x)))


class StaticShapeEncoder(torch.nn.Module):
    """diffusers' HunyuanVideo-1.5 VAE encoder with a traceable mid-block attention: pixels
    (1, 3, F, H, W) -> posterior moments (1, 2C, T, H/16, W/16), mean then log-variance."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        x = enc.conv_in(x)
        for block in enc.down_blocks:
            x = block(x)
        x = _mid_block(enc.mid_block, x)
        b, _, t, h, w = x.shape
        shortcut = x.view(b, -1, enc.group_size, t, h, w).mean(dim=2)
        return enc.conv_out(enc.conv_act(enc.norm_out(x))) + shortcut


# (N, C, T, h, w) tiles of one shape -> the decoder's pixels or the encoder's moments for each, float32
TileFn = Callable[[np.ndarray], np.ndarray]
TILE_AXIS = "tiles"


def tile_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices``, its one axis over tiles. ``Mesh`` rather than ``jax.make_mesh``,
    whose axes are Explicit by default in new JAX. The default is all of this process's devices
    (``jax.devices()`` in a single process): the host reads every tile back to blend the seams,
    which it cannot from another host's devices in a multi-host job."""
    devices = jax.local_devices() if devices is None else list(devices)
    if not devices:
        raise InputError("no devices to run the VAE on")
    return Mesh(np.array(devices), (TILE_AXIS,))


def _replicated_on(x: jax.Array, mesh: Mesh) -> jax.Array:
    """``x`` (replicated on a superset of ``mesh``'s devices) replicated on ``mesh``, from the
    buffers already there: no copy, so the weights live once per device however many meshes use them."""
    buffers = {shard.device: shard.data for shard in x.addressable_shards}
    return jax.make_array_from_single_device_arrays(
        x.shape, NamedSharding(mesh, P()), [buffers[d] for d in mesh.devices.flat])


def tiles_program(apply: Callable, mesh: Mesh, name: str = "decode_tile") -> Callable:
    """``apply(params, x)``, a decoder or encoder on one (1, C, T, h, w) tile, jitted over a stack
    of ``mesh.size`` tiles split on the mesh: each device runs its own tile with its own copy of
    the weights, and nothing crosses devices. ``name`` is the program's in compile logs."""
    def tile(params: JaxParams, x: jax.Array) -> jax.Array:
        return apply(params, x)
    tile.__name__ = tile.__qualname__ = name
    return jax.jit(jax.shard_map(tile, mesh=mesh, in_specs=(P(), P(TILE_AXIS)), out_specs=P(TILE_AXIS)))


def _tile_runner(eager: torch.nn.Module, static: torch.nn.Module, dtype: torch.dtype, backend: Backend,
                 devices: Sequence[jax.Device] | None, name: str) -> TileFn:
    """``run_tiles(x)``: ``eager`` (torch) or ``static`` (jax) on a stack of same-shape tiles."""
    if backend == "torch":
        def run_eagerly(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return np.concatenate([eager(torch.from_numpy(tile[None]).to(dtype)).float().numpy() for tile in x])
        return run_eagerly
    if backend != "jax":
        raise InputError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    mesh = tile_mesh(devices)
    params, apply = jax_view(static, shardings=dict.fromkeys(static.state_dict(), NamedSharding(mesh, P())))
    programs: dict[int, tuple[Mesh, JaxParams, Callable]] = {}

    def program(count: int) -> tuple[Mesh, JaxParams, Callable]:
        """The program on the first ``count`` devices, and the weights there."""
        if count not in programs:
            sub = Mesh(mesh.devices[:count], (TILE_AXIS,))
            programs[count] = (sub, {k: _replicated_on(v, sub) for k, v in params.items()},
                               tiles_program(apply, sub, name))
        return programs[count]

    def run_tiles(x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        sub, sub_params, jitted = program(min(n, mesh.size))
        x = np.concatenate([x, np.repeat(x[-1:], -n % sub.size, axis=0)])
        x = to_host_array(torch.from_numpy(x).to(dtype))
        split = NamedSharding(sub, P(TILE_AXIS))
        # every call dispatched before any result is read, so the host waits once
        out = [jitted(sub_params, jax.device_put(x[k:k + sub.size], split)) for k in range(0, len(x), sub.size)]
        # a writable host copy: the seams are blended in place
        return np.concatenate([np.asarray(o, dtype=np.float32) for o in out])[:n]
    return run_tiles


def tile_decoder(vae: VAE, backend: Backend, devices: Sequence[jax.Device] | None = None) -> TileFn:
    """``decode_tiles(z) -> pixels``: the VAE decoder on a stack of same-shape latent tiles.

    ``torch`` runs diffusers' decoder eagerly, one tile at a time (``devices`` unused). ``jax``
    runs ``StaticShapeDecoder`` through torchax, jitted per device under ``shard_map``: N tiles
    go to min(N, D) of the D ``devices`` (default: ``tile_mesh``'s), one tile per device per
    call, in as many calls as it takes (the last one filled up with copies of the last tile,
    whose pixels are dropped). Each device runs the one-tile program of a one-device decode, so
    the pixels do not depend on the device count. A tile shape is compiled once per device
    count it meets; ``tiled`` gives each shape of a canvas one count, hence one compile per
    shape (a few: interior, edge and corner tiles).
    """
    decoder = vae.model.decoder
    return _tile_runner(decoder, StaticShapeDecoder(decoder), vae.dtype, backend, devices, "decode_tile")


def tile_encoder(vae: VAE, backend: Backend, devices: Sequence[jax.Device] | None = None) -> TileFn:
    """``encode_tiles(pixels) -> moments``: the VAE encoder on a stack of same-shape pixel tiles,
    spread over devices as ``tile_decoder`` spreads latent tiles."""
    encoder = vae.model.encoder
    return _tile_runner(encoder, StaticShapeEncoder(encoder), vae.dtype, backend, devices, "encode_tile")


def decode(
    vae: VAE, latents: np.ndarray, *, backend: Backend = "jax", tiling: Tiling | None = Tiling(),
    devices: Sequence[jax.Device] | None = None, decode_tiles: TileFn | None = None,
) -> np.ndarray:
    """Denoised (1, C, T, H/16, W/16) latents -> (1, 3, 4(T-1)+1, H, W) float32 pixels in about [-1, 1].

    Latents are divided by the VAE's scaling factor first (the DiT works on scaled latents).
    With ``tiling``, a canvas larger than one tile on either side is decoded tile by tile
    (``tiled``), the tiles spread over ``devices`` (jax backend; default: all of this process's);
    otherwise whole. ``decode_tiles``: a ``tile_decoder`` of ``vae`` kept from an earlier call, whose
    weights are on device and whose tile shapes are compiled (default: a new one).
    """
    if latents.ndim != 5 or latents.shape[:2] != (1, vae.model.config.latent_channels):
        raise InputError(f"latents have shape {tuple(latents.shape)}, expected "
                         f"(1, {vae.model.config.latent_channels}, T, H, W)")
    z = np.ascontiguousarray(latents / vae.scaling_factor, dtype=np.float32)
    decode_tiles = decode_tiles or tile_decoder(vae, backend, devices)
    _, _, _, h, w = z.shape
    if tiling is None or (h <= tiling.tile_latent and w <= tiling.tile_latent):
        return decode_tiles(z)
    return tiled(z, decode_tiles, tiling)


def tiled(z: np.ndarray, decode_tiles: TileFn, tiling: Tiling) -> np.ndarray:
    """The official ``spatial_tiled_decode``: on both axes, whatever their size, tiles of
    ``tile_latent`` latent pixels start every ``stride_latent`` (the last ones may be slivers);
    each tile's first ``blend_px`` rows and columns are cross-faded from its upper and left
    neighbours (already blended, in row-major order), and its first ``tile_px - blend_px`` rows
    and columns are kept. The kept pieces add up to the whole canvas.

    The tiles are independent until the blend, so those of one shape are decoded together
    (``decode_tiles`` spreads them over devices); the blend then runs on the host as above.
    """
    return _tile_walk(z, decode_tiles, tiling.tile_latent, tiling.stride_latent, tiling.blend_px,
                      tiling.tile_px - tiling.blend_px)


def tiled_encode(pixels: np.ndarray, encode_tiles: TileFn, tiling: Tiling) -> np.ndarray:
    """The official ``spatial_tiled_encode``, ``tiled``'s mirror image: pixel tiles of ``tile_px``
    every ``tile_px (1 - overlap)`` pixels, their moments blended over ``tile_latent overlap``
    latent pixels, ``tile_latent (1 - overlap)`` of each kept."""
    return _tile_walk(pixels, encode_tiles, tiling.tile_px, tiling.stride_px, tiling.blend_latent,
                      tiling.tile_latent - tiling.blend_latent)


def tile_counts(height: int, width: int, size: int, stride: int) -> dict[tuple[int, int], int]:
    """How many tiles of each (h, w) the walk of ``tiled`` (latent units) or ``tiled_encode``
    (pixels) cuts from a ``height`` x ``width`` canvas: tiles of ``size`` every ``stride``."""
    sides = [[min(size, n - s) for s in range(0, n, stride)] for n in (height, width)]
    counts: dict[tuple[int, int], int] = {}
    for h in sides[0]:
        for w in sides[1]:
            counts[h, w] = counts.get((h, w), 0) + 1
    return counts


def _tile_walk(x: np.ndarray, run_tiles: TileFn, size: int, stride: int, blend: int, keep: int) -> np.ndarray:
    """Tiles of ``size`` from every ``stride`` on both spatial axes of ``x``, run in groups of one
    shape, then blended over ``blend`` and cut to ``keep`` in the output's units (row-major)."""
    _, _, _, h, w = x.shape
    corners = [(i, j) for i in range(0, h, stride) for j in range(0, w, stride)]
    by_shape: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for i, j in corners:
        by_shape.setdefault(x[..., i:i + size, j:j + size].shape, []).append((i, j))
    done: dict[tuple[int, int], np.ndarray] = {}
    for group in by_shape.values():
        out = run_tiles(np.concatenate([x[..., i:i + size, j:j + size] for i, j in group]))
        done.update((corner, out[k:k + 1]) for k, corner in enumerate(group))
    tiles = [[done[i, j] for j in range(0, w, stride)] for i in range(0, h, stride)]
    rows = []
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            if i > 0:
                _blend_seam(tiles[i - 1][j], tile, blend, axis=-2)
            if j > 0:
                _blend_seam(row[j - 1], tile, blend, axis=-1)
        rows.append(np.concatenate([tile[..., :keep, :keep] for tile in row], axis=-1))
    return np.concatenate(rows, axis=-2)


def to_frames(video: np.ndarray) -> np.ndarray:
    """(1, 3, F, H, W) pixels in [-1, 1] -> (F, H, W, 3) uint8, as the official ``save_video``
    (scaled to [0, 1], clamped, times 255, truncated)."""
    x = np.clip(video[0] / 2 + 0.5, 0.0, 1.0) * 255
    return np.clip(x, 0, 255).astype(np.uint8).transpose(1, 2, 3, 0)


# ---- encoding --------------------------------------------------------------------------------

POSTERIORS = ("sample", "mode")
VideoEncoder = Callable[[np.ndarray], np.ndarray]


def video_encoder(vae: VAE, *, backend: Backend = "jax", tiling: Tiling | None = Tiling(),
                  devices: Sequence[jax.Device] | None = None) -> VideoEncoder:
    """``moments(pixels)``: (1, 3, 4k+1, H, W) pixels in [-1, 1] -> the posterior's (1, 2C, k+1,
    H/16, W/16) float32 moments (mean, then log-variance). Built once, called per clip: with
    ``tiling``, a canvas larger than one tile is encoded tile by tile (``tiled_encode``, as the
    official trainer's ``memory_efficient_context``), the tiles spread over ``devices``."""
    encode_tiles = tile_encoder(vae, backend, devices)

    def moments(pixels: np.ndarray) -> np.ndarray:
        if pixels.ndim != 5 or pixels.shape[:2] != (1, 3) or (pixels.shape[2] - 1) % 4:
            raise InputError(f"pixels have shape {tuple(pixels.shape)}, expected (1, 3, 4k+1, H, W)")
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        if tiling is None or (x.shape[3] <= tiling.tile_px and x.shape[4] <= tiling.tile_px):
            return encode_tiles(x)
        return tiled_encode(x, encode_tiles, tiling)
    return moments


def posterior_latents(moments: np.ndarray, scaling_factor: float, posterior: str = "sample",
                      seed: int = 0) -> np.ndarray:
    """The DiT's latents from the posterior's moments: its mode, or a sample with noise from
    ``seed`` (torch's CPU generator, so the same on every platform), times ``scaling_factor``.
    The official trainer samples (``latent_dist.sample()``); i2v's image condition takes the mode."""
    if posterior not in POSTERIORS:
        raise InputError(f"{{posterior}} {posterior!r} is not one of {', '.join(POSTERIORS)}")
    mean, logvar = np.split(moments.astype(np.float32), 2, axis=1)
    if posterior == "mode":
        return mean * scaling_factor
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).numpy()
    return (mean + np.exp(0.5 * np.clip(logvar, -30.0, 20.0)) * noise) * scaling_factor


def encode_image(vae: VAE, pixels: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) pixels in [-1, 1] -> (1, C, 1, H/16, W/16) float32 latents: the posterior's
    mode times the scaling factor, as the official ``get_image_condition_latents``."""
    with torch.no_grad():
        posterior = vae.model.encode(pixels[:, :, None].to(vae.dtype)).latent_dist
        return posterior.mode().float() * vae.scaling_factor

