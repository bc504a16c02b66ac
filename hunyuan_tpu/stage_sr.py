"""The super-resolution stage's settings and its upsampler: the SR run is stage 2's denoising
(``stage_denoise``) on the SR DiT, from the base run's latents upsampled and noised.

Settings come from what is given, else (devices, kernels, dtype, seed) the stage-2 record,
else the SR model's defaults (official SR_PIPELINE_CONFIGS).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping

from . import attention
from .config import DiTConfig
from .files import InputError, Note
from .pipeline import latent_shape
from .random_init import randomize_like_trained_
from .settings import check_seed, dtype_of, model_config, resolve
from .stage_denoise import CACHE_DEFAULTS, DenoiseSettings, check_run_settings, settle_cache_type
from .super_resolution import SR_VERSIONS, hr_canvas, sr_version
from .upsampler import RELEASED_CONFIGS, Upsampler, build, load_upsampler, tiny_upsampler

KEY = "sr"  # its record's key in config.json, and its files' prefix


# taken from the stage-2 record when not given: the same machine, kernels and seed as the base run
INHERITED = {
    "dtype": (str, "bfloat16"),
    "seed": (int, 42),
    "sharding": (str, None),
    "mesh": (str, None),
    "attention": (str, "auto"),
    "sparse_attention": (str, "auto"),
    "splash_block_q": (int, attention.SPLASH_BLOCK_Q),
    "splash_block_kv": (int, attention.SPLASH_BLOCK_KV),
    "splash_block_kv_compute": (int, attention.SPLASH_BLOCK_KV_COMPUTE),
    "warmup_steps": (int, 2),
}
OWN = {
    "model": (str, None),
    "upsampler": (str, None),
    "lq_noise_seed": (int, None),
    "checkpoint_every": (int, 0),
    "dense_attention": (bool, False),
    **CACHE_DEFAULTS,  # not stage 2's own: its schedule is for its steps
}


@dataclasses.dataclass(frozen=True)
class Settings(DenoiseSettings):
    """Every setting of an SR run: the upsampler, the LR noise and the canvases besides the
    denoising ones (stage 2's names where they mean the same)."""

    upsampler: str
    lq_noise_seed: int
    lr_latent_shape: tuple[int, int, int]
    resolution: str
    height: int
    width: int

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return latent_shape(4 * (self.lr_latent_shape[0] - 1) + 1, self.height, self.width)


def _default_model(base_model: str, resolution: str) -> str:
    """The SR version's folder beside a base checkpoint (the official ``transformer/<version>``), or the
    SR preset of a preset base run."""
    version = sr_version(model_config(base_model), resolution)
    base = Path(base_model)
    if not base.exists():
        return version
    beside = base.parent / version
    if beside.is_dir():
        return str(beside)
    raise InputError(f"{{model}}: the base model {base_model} is a checkpoint without {beside} beside it; give the SR "
                     f"checkpoint (transformer/{version})")


def _default_upsampler(model: str) -> str:
    """``upsampler/<version>`` of an official checkpoint root, or the preset's name (random weights)."""
    path = Path(model)
    if not path.exists():
        return model
    beside = path.parent.parent / "upsampler" / path.name
    if beside.is_dir():
        return str(beside)
    raise InputError(f"{{upsampler}}: none given and no {beside} (the official layout); give the upsampler folder")


def resolve_settings(given: Mapping[str, Any], stage_config: Mapping[str, Any], lr_shape: tuple[int, ...],
                     source: str, note: Note) -> tuple[Settings, DiTConfig]:
    """The run's settings and SR model configuration, each value checked."""
    base = stage_config.get("stage2")
    if not isinstance(base, dict):
        raise InputError(f"{source}: no stage-2 record (run stage 2 first)")
    s = resolve(given, base, INHERITED, f"{source} (stage2)")
    s.update(resolve(given, {}, OWN, source))
    dtype_of("dtype", s["dtype"])
    s["task"] = base.get("task", stage_config.get("task", "t2v"))
    s["model"] = s["model"] or _default_model(base.get("model", "tiny"), base.get("resolution", "96p"))
    config = model_config(s["model"])
    if not config.super_resolution:
        raise InputError(f"{{model}} {s['model']}: not a super-resolution model (its input is {config.img_in_channels} "
                         f"channels; an SR DiT takes {3 * config.latent_channels + 2})")
    if config.ideal_task not in (None, s["task"]):
        raise InputError(f"{{model}} {s['model']} is trained for {config.ideal_task}, but the run is {s['task']}")
    s["upsampler"] = s["upsampler"] or _default_upsampler(s["model"])
    version = next((v for v in SR_VERSIONS if v in Path(s["model"]).parts or v == s["model"]), None)
    # a checkpoint outside the official layout gets the 720p version's sampling
    defaults = SR_VERSIONS[version or "720p_sr_distilled"].sampling
    s.update(resolve(given, {}, {
        "num_inference_steps": (int, defaults.num_inference_steps),
        "guidance_scale": (float, defaults.guidance_scale),
        "flow_shift": (float, defaults.flow_shift),
    }, source))
    check_run_settings(s)
    cfg_split = s["mesh"] and re.search(r"dp=([2-9]|\d\d)", s["mesh"])
    if given.get("mesh") is None and cfg_split and not s["guidance_scale"] > 1:
        # stage 2's dp axis split its CFG batch; without CFG there is one sample: every device on the strategy's axis
        note(f"SR: stage 2's mesh {s['mesh']} splits the CFG batch, the SR run has none: using the default mesh of "
             f"{s['sharding'] or 'the default strategy'}")
        s["mesh"] = None
    if s["lq_noise_seed"] is None:
        # not the seed itself: the LR noise must not equal the initial noise
        s["lq_noise_seed"] = (s["seed"] + 1) % 2**64
    check_seed("lq_noise_seed", s["lq_noise_seed"])
    if s["dense_attention"]:
        config = config.dense()
    s["lr_latent_shape"] = tuple(int(n) for n in lr_shape[2:])
    s["resolution"] = config.ideal_resolution or "720p"
    _, h, w = hr_canvas(s["lr_latent_shape"], s["resolution"])
    s["height"], s["width"] = h * 16, w * 16
    settle_cache_type(s, source)
    settings = Settings(**s)
    settings.cache(config)  # checks the cache's settings
    return settings, config


def upsampler_of(name: str, note: Note) -> Upsampler:
    """The upsampler in a folder, or for an SR preset's name seeded random weights: the tiny twin
    for tiny_sr, the released shape otherwise."""
    if name not in SR_VERSIONS:
        return load_upsampler(name)
    note(f"upsampler for {name}: seeded random weights (no folder)")
    if name in RELEASED_CONFIGS:
        class_name, config = RELEASED_CONFIGS[name]
        return randomize_like_trained_(build(class_name, config), seed=0).eval()
    return tiny_upsampler(SR_VERSIONS[name].upsampler)
