"""Stage 3: the latents to video frames with the VAE, tiled as the official pipeline decodes.

The settings, the VAE loaded once with its tile decoder (weights on the devices, each tile shape
compiled once), and the record. The command ``run/stage3_vae_decoder.py`` reads the latents
from the hand-off folder and writes video.mp4 and first_frame.png; ``generation`` keeps them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from .files import InputError, Note
from .settings import dtype_of, named_by_source, resolve
from .vae import BACKENDS, VAE, TileFn, Tiling, decode, load_vae, tile_decoder, tiny_vae, to_frames
from .video import FPS

DEFAULTS = {
    "vae": (str, None),
    "vae_dtype": (str, "float32"),
    "backend": (str, "jax"),
    "tile_size": (int, 256),
    "tile_overlap": (float, 0.125),
    "fps": (int, FPS),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """A stage-3 run's settings, resolved: given, else the input config.json, else the default."""

    vae: str | None
    vae_dtype: str
    backend: str
    tile_size: int
    tile_overlap: float
    fps: int


def resolve_settings(given: Mapping[str, Any], stage_config: Mapping[str, Any], source: str
                     ) -> tuple[Settings, Tiling | None]:
    """The settings and the tiling (None with ``no_tiling``), each value checked."""
    if "stage2" not in stage_config:
        raise InputError(f"{source}: no \"stage2\" entry: latents.safetensors is not from this run's stage 2 "
                         "(run it first)")
    from_config: set[str] = set()
    s = Settings(**resolve(given, stage_config, DEFAULTS, source, from_config))
    with named_by_source(from_config, source):  # a bad value is named as its setting or config.json key
        dtype_of("vae_dtype", s.vae_dtype)
        if s.backend not in BACKENDS:
            raise InputError(f"{{backend}} {s.backend!r} is not one of {', '.join(BACKENDS)}")
        if s.fps < 1:
            raise InputError(f"{{fps}} must be >= 1, got {s.fps}")
        return s, None if given.get("no_tiling") else Tiling(s.tile_size, s.tile_overlap)


def load(s: Settings, latent_channels: int, note: Note) -> VAE:
    """The VAE ``s`` names, else a tiny one with seeded random weights."""
    dtype = dtype_of("vae_dtype", s.vae_dtype)
    if s.vae:
        return load_vae(s.vae, dtype)
    note(f"stage 3: no {{vae}}: a tiny VAE with seeded random weights ({latent_channels} latent channels)")
    return tiny_vae(latent_channels, dtype)


class Decoder:
    """A VAE and, per backend, its tile decoder, kept between runs: weights placed once, each
    tile shape compiled once."""

    def __init__(self, vae: VAE, devices: Sequence[jax.Device]):
        self.vae, self.devices = vae, list(devices)
        self._tiles: dict[str, TileFn] = {}

    def device_count(self, backend: str) -> int:
        return len(self.devices) if backend == "jax" else 1  # eager torch: this CPU

    def frames(self, latents: np.ndarray, backend: str, tiling: Tiling | None) -> np.ndarray:
        """(F, H, W, 3) uint8 frames of ``latents``."""
        if backend not in self._tiles:
            self._tiles[backend] = tile_decoder(self.vae, backend, self.devices)
        return to_frames(decode(self.vae, latents, backend=backend, tiling=tiling, devices=self.devices,
                                decode_tiles=self._tiles[backend]))


def record(s: Settings, decoder: Decoder, tiling: Tiling | None, frames: np.ndarray, latents_file: str,
           seconds: Mapping[str, float]) -> dict:
    """Stage 3's entry in config.json (``seconds``: load_s, decode_s, write_s, total_s)."""
    return {
        **dataclasses.asdict(s), "vae": decoder.vae.source, "latents": latents_file,
        "tiling": None if tiling is None else {"tile_px": tiling.tile_px, "overlap": tiling.overlap},
        "frames": int(frames.shape[0]), "height": int(frames.shape[1]), "width": int(frames.shape[2]),
        **{k: round(v, 3) for k, v in seconds.items()},
        "device": decoder.devices[0].device_kind if s.backend == "jax" else "cpu",
        "device_count": decoder.device_count(s.backend),
    }


def summary(rec: Mapping[str, Any], destination: Any) -> str:
    """The one line stage 3 ends with."""
    count = rec["device_count"]
    return (f"stage 3: {rec['latents']} -> {rec['frames']} frames of {rec['width']}x{rec['height']} "
            f"({rec['backend']}) on {count} device{'s' if count > 1 else ''} | load {rec['load_s']:.2f} s, "
            f"decode {rec['decode_s']:.2f} s, write {rec['write_s']:.2f} s | total {rec['total_s']:.2f} s "
            f"-> {destination}")
