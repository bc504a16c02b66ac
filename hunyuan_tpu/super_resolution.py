"""The super-resolution stage as the official SR pipeline runs it (``HunyuanVideo_1_5_SR_Pipeline``).

The base run's latents are the low-resolution (LR) input. The high-resolution (HR) bucket is the
bucket of the SR model's family with the aspect ratio closest to the LR bucket's (``BucketMap``);
the LR latents are resized bilinearly per frame to the HR latent size, refined by the upsampler
in float32 and noised at strength 0.7. The SR DiT (in_channels 98) sees
``[noisy latents (32), condition (33: image latents + mask), LR condition (33: LR latents + ones)]``;
from the first step whose timestep is below 700 the LR condition, mask included, is zeros
(``pipeline.make_step``). The initial noise is drawn from the run's seed like the base stage's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from .config import DiTConfig
from .files import InputError
from .pipeline import (
    LATENT_CHANNELS, LQ_NOISE_STRENGTH, RESOLUTION_BASE, VAE_SPATIAL, SamplingSettings, build_conditions, buckets,
    initial_noise,
)


@dataclasses.dataclass(frozen=True)
class SRVersion:
    """A released SR transformer's pipeline settings (official ``SR_PIPELINE_CONFIGS``)."""

    base_resolution: str  # the family of the LR latents it takes
    sampling: SamplingSettings
    upsampler: str  # the class of its upsampler (``upsampler/<version>``)


SR_VERSIONS: dict[str, SRVersion] = {
    "720p_sr_distilled": SRVersion("480p", SamplingSettings(6, 1.0, 2.0), "SRTo720pUpsampler"),
    "1080p_sr_distilled": SRVersion("720p", SamplingSettings(8, 1.0, 2.0), "SRTo1080pUpsampler"),
    # the weight-free twin: the tiny base model's 96p latents to 144p
    "tiny_sr": SRVersion("96p", SamplingSettings(6, 1.0, 2.0), "SRTo720pUpsampler"),
}
# The official TRANSFORMER_VERSION_TO_SR_VERSION goes by the base checkpoint's resolution alone.
SR_FOR_RESOLUTION = {version.base_resolution: name for name, version in SR_VERSIONS.items()}


def sr_version(base: DiTConfig, resolution: str) -> str:
    """The SR version after a ``base`` model run at ``resolution``: by the base model's own
    resolution where it has one (the official map goes by the transformer version)."""
    family = base.ideal_resolution or resolution
    if family not in SR_FOR_RESOLUTION:
        raise InputError(f"{{resolution}} {family}: no super-resolution model takes it "
                         f"(the SR stage takes {', '.join(SR_FOR_RESOLUTION)})")
    return SR_FOR_RESOLUTION[family]


def hr_bucket(lr_height: int, lr_width: int, target_resolution: str) -> tuple[int, int]:
    """(height, width) of the bucket of ``target_resolution`` whose aspect ratio W/H is closest to
    the LR canvas's: the official ``BucketMap``, which reads the bucket list as (W, H) pairs (the
    first of equally close buckets wins). The official map takes only LR buckets; any canvas is
    taken here, by the same rule."""
    if target_resolution not in RESOLUTION_BASE:
        raise InputError(f"SR resolution {target_resolution!r} is not one of {', '.join(RESOLUTION_BASE)}")
    family = buckets(target_resolution)
    ratios = np.array([w / h for w, h in family])
    w, h = family[int(np.abs(ratios - lr_width / lr_height).argmin())]
    return h, w


def resize_latents(latents: np.ndarray, height: int, width: int) -> np.ndarray:
    """(1, C, T, h, w) -> (1, C, T, height, width): each frame resized bilinearly (half-pixel
    centres, no antialiasing: ``F.interpolate(mode="bilinear", align_corners=False)``), float32."""
    b, c, t, h, w = latents.shape
    frames = torch.from_numpy(np.ascontiguousarray(latents, np.float32)).permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    resized = F.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False)
    return resized.reshape(b, t, c, height, width).permute(0, 2, 1, 3, 4).contiguous().numpy()


def noised(latents: np.ndarray, seed: int, strength: float = LQ_NOISE_STRENGTH) -> np.ndarray:
    """``(1 - strength) * latents + strength * noise``, the noise drawn from ``seed`` (the official
    ``add_noise_to_lq`` draws it from torch's global generator: unseeded)."""
    noise = initial_noise(seed, latents.shape[2:])
    return ((1 - strength) * latents + strength * noise).astype(np.float32)


def lr_condition(lq: np.ndarray) -> np.ndarray:
    """The LR condition, (1, C + 1, T, H, W): the noised LR latents and a channel of ones."""
    return np.concatenate([lq, np.ones_like(lq[:, :1])], axis=1).astype(np.float32)


def sr_conditions(
    embeddings: dict[str, np.ndarray],
    lq: np.ndarray,
    *,
    task: str,
    cfg: bool,
    model: DiTConfig,
) -> dict[str, np.ndarray]:
    """The SR step's host conditions: the base step's (text, and for i2v the image latents and
    SigLIP states of the HR canvas, which stage 1 writes as ``sr_image_cond_latents`` and
    ``sr_vision_states``) plus ``lr_latents``, the LR condition of the noised ``lq``."""
    if task == "i2v":
        embeddings = {**embeddings, "image_cond_latents": embeddings["sr_image_cond_latents"],
                      "vision_states": embeddings["sr_vision_states"]}
    out = build_conditions(embeddings, task=task, shape=lq.shape[2:], cfg=cfg, model=model)
    out["lr_latents"] = lr_condition(lq)
    return out


def prepare_lq(lr_latents: np.ndarray, hr_shape: tuple[int, int, int], upsample, seed: int) -> np.ndarray:
    """The noised LR latents at the HR latent size: resized, through ``upsample`` (the upsampler
    in float32), then noised with ``seed``."""
    if lr_latents.shape[1] != LATENT_CHANNELS or lr_latents.shape[2] != hr_shape[0]:
        raise InputError(f"LR latents of shape {tuple(lr_latents.shape)} do not fit the SR canvas {hr_shape}")
    resized = resize_latents(lr_latents, *hr_shape[1:])
    return noised(np.asarray(upsample(resized), np.float32), seed)


def hr_canvas(lr_shape: tuple[int, int, int], target_resolution: str) -> tuple[int, int, int]:
    """The HR latent (T, H, W) for LR latents of (T, h, w)."""
    t, h, w = lr_shape
    height, width = hr_bucket(h * VAE_SPATIAL, w * VAE_SPATIAL, target_resolution)
    return t, height // VAE_SPATIAL, width // VAE_SPATIAL
