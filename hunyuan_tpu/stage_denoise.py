"""Stage 2 (and the SR stage's denoising): the settings, the DiT loaded once, and a run.

``DiT`` holds a model on its mesh (weights placed and stacked by layer, the attention kernels)
and every step it compiled, by signature: a later run of the same shapes compiles nothing.
``warm_up``, ``record`` and the loop in ``pipeline.denoise`` make a run. The command
``run/stage2_transformer.py`` adds the hand-off folder, checkpoints, resume and the demo;
``generation`` keeps everything in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from . import attention, handoff, parallel
from .cache import (
    Calibration, DeepCache, FeatureCache, MagCache, NoCache, Schedule, TaylorCache, TeaCache, read_calibration,
)
from .config import DiTConfig
from .files import InputError, Note
from .lora import check_adapter, load_adapter, merge_adapter
from .params import model_params
from .pipeline import (
    Denoiser, LoopResult, SamplingSettings, bucket_size, default_sampling, latent_shape, released_variant,
)
from .runtime import jax_dtype
from .scan import stack_blocks
from .settings import DTYPES, check_seed, dtype_of, model_config, named_by_source, resolve

# the feature cache's settings, as stage 2 and the SR stage take them
CACHE_TYPES = ("none", "deepcache", "teacache", "taylorcache", "magcache")
CACHE_DEFAULTS = {
    "cache_type": (str, None),
    "enable_cache": (bool, False),
    "cache_start_step": (int, Schedule.start),
    "cache_end_step": (int, Schedule.end),
    "cache_step_interval": (int, Schedule.interval),
    "cache_keep_blocks": (int, DeepCache.keep_blocks),
    "taylor_max_order": (int, TaylorCache.max_order),
    "taylor_low_freqs_order": (int, TaylorCache.low_freqs_order),
    "taylor_high_freqs_order": (int, TaylorCache.high_freqs_order),
    "magcache_calibration": (str, None),
    "magcache_threshold": (float, MagCache.threshold),
    "magcache_max_skips": (int, MagCache.max_skips),
    "magcache_retention_ratio": (float, MagCache.retention_ratio),
}
GENERAL_DEFAULTS = {
    "model": (str, "tiny"),
    "dtype": (str, "bfloat16"),
    "task": (str, "t2v"),
    "resolution": (str, None),
    "aspect_ratio": (str, "16:9"),
    "height": (int, None),
    "width": (int, None),
    "video_length": (int, 49),
    "seed": (int, 42),
    "warmup_steps": (int, 2),
    "checkpoint_every": (int, 0),
    "lora": (str, None),
    "lora_scale": (float, 1.0),
    "sharding": (str, None),
    "mesh": (str, None),
    "attention": (str, "auto"),
    "sparse_attention": (str, "auto"),
    "dense_attention": (bool, False),
    "splash_block_q": (int, attention.SPLASH_BLOCK_Q),
    "splash_block_kv": (int, attention.SPLASH_BLOCK_KV),
    "splash_block_kv_compute": (int, attention.SPLASH_BLOCK_KV_COMPUTE),
    **CACHE_DEFAULTS,
}


@dataclasses.dataclass(frozen=True)
class DenoiseSettings:
    """What a denoising stage (stage 2, the SR stage) runs with, resolved: given, else the input
    config.json, else the default. The names are config.json's, which the record repeats."""

    model: str
    dtype: str
    task: str
    seed: int
    warmup_steps: int
    checkpoint_every: int
    sharding: str | None
    mesh: str | None
    attention: str
    sparse_attention: str
    dense_attention: bool
    splash_block_q: int
    splash_block_kv: int
    splash_block_kv_compute: int
    cache_type: str
    cache_start_step: int
    cache_end_step: int
    cache_step_interval: int
    cache_keep_blocks: int
    taylor_max_order: int
    taylor_low_freqs_order: int
    taylor_high_freqs_order: int
    magcache_calibration: str | None
    magcache_threshold: float
    magcache_max_skips: int
    magcache_retention_ratio: float
    num_inference_steps: int
    guidance_scale: float
    flow_shift: float

    @property
    def sampling(self) -> SamplingSettings:
        return SamplingSettings(self.num_inference_steps, self.guidance_scale, self.flow_shift)

    @property
    def batch(self) -> int:
        """Samples per DiT call: 2 with classifier-free guidance."""
        return 2 if self.sampling.cfg else 1

    def cache(self, config: DiTConfig) -> FeatureCache:
        """The run's feature cache, checked against ``config`` and the step count (a MagCache
        calibration also against the model, LoRA and sampling it was measured with)."""
        schedule = Schedule(self.cache_start_step, self.cache_end_step, self.cache_step_interval)
        if self.cache_type == "magcache":
            if not self.magcache_calibration:
                raise InputError("{cache_type} magcache needs {magcache_calibration} FILE (write one with "
                                 "{magcache_calibrate} FILE)")
            path = Path(self.magcache_calibration)
            calibration = read_calibration(path)
            calibration.check_run(self.calibration(config, ()), path)
            cache = MagCache(calibration, self.magcache_threshold, self.magcache_max_skips,
                             self.magcache_retention_ratio)
        else:
            cache = {
                "none": NoCache(),
                "deepcache": DeepCache(schedule, self.cache_keep_blocks),
                "teacache": TeaCache(schedule),
                "taylorcache": TaylorCache(schedule, self.taylor_max_order, self.taylor_low_freqs_order,
                                           self.taylor_high_freqs_order),
            }[self.cache_type]
        cache.check(self.num_inference_steps, config.mm_double_blocks_depth)
        return cache

    def calibration(self, config: DiTConfig, ratios: Sequence[float]) -> Calibration:
        """A MagCache calibration of this run: what it was measured with, and ``ratios``."""
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode()).hexdigest()
        lora = getattr(self, "lora", None)
        return Calibration(tuple(ratios), Path(self.model).name, lora and Path(lora).name, digest,
                           self.flow_shift, self.guidance_scale)


@dataclasses.dataclass(frozen=True)
class Settings(DenoiseSettings):
    """Every setting of a stage-2 run: the canvas and the adapter besides the denoising ones."""

    resolution: str
    aspect_ratio: str
    height: int
    width: int
    video_length: int
    lora: str | None
    lora_scale: float

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return latent_shape(self.video_length, self.height, self.width)


def resolve_settings(given: Mapping[str, Any], stage_config: Mapping[str, Any], source: str
                     ) -> tuple[Settings, DiTConfig]:
    """The run's settings and model configuration, each value checked; a bad value is named as
    its setting, or as its config.json key when it came from there."""
    from_config: set[str] = set()
    with named_by_source(from_config, source):
        return _resolve_settings(given, stage_config, source, from_config)


def _resolve_settings(given: Mapping[str, Any], stage_config: Mapping[str, Any], source: str, from_config: set[str]
                      ) -> tuple[Settings, DiTConfig]:
    s = resolve(given, stage_config, GENERAL_DEFAULTS, source, from_config)
    dtype_of("dtype", s["dtype"])
    if s["task"] not in handoff.TASKS:
        raise InputError(f"{source}: task {s['task']!r} is not one of {', '.join(handoff.TASKS)}")
    config = model_config(s["model"])
    if config.ideal_task not in (None, s["task"]):
        raise InputError(f"{{model}} {s['model']} is trained for {config.ideal_task}, but the run is {s['task']}")
    defaults = default_sampling(config, released_variant(s["model"]))
    if s["dense_attention"]:
        config = config.dense()
    s.update(resolve(given, stage_config, {
        "num_inference_steps": (int, defaults.num_inference_steps),
        "guidance_scale": (float, defaults.guidance_scale),
        "flow_shift": (float, defaults.flow_shift),
    }, source, from_config))
    check_run_settings(s)
    s["resolution"] = s["resolution"] or config.ideal_resolution or "480p"
    bucket_h, bucket_w = bucket_size(s["resolution"], s["aspect_ratio"])
    s["height"] = bucket_h if s["height"] is None else s["height"]  # 0 is not "unset": latent_shape refuses it
    s["width"] = bucket_w if s["width"] is None else s["width"]
    latent_shape(s["video_length"], s["height"], s["width"])  # checks the three
    settle_cache_type(s, source)
    settings = Settings(**s)
    settings.cache(config)  # checks the cache's settings
    return settings, config


def check_run_settings(s: Mapping[str, Any]) -> None:
    """The checks a denoising stage's resolved settings share: kernels, steps, shift, seed."""
    attention.check_splash_blocks(s["splash_block_q"], s["splash_block_kv"], s["splash_block_kv_compute"])
    if s["num_inference_steps"] < 1:
        raise InputError(f"{{num_inference_steps}} must be >= 1, got {s['num_inference_steps']}")
    for key in ("warmup_steps", "checkpoint_every"):
        if s[key] < 0:
            raise InputError(f"{{{key}}} must be >= 0, got {s[key]}")
    if s["flow_shift"] <= 0:
        raise InputError(f"{{flow_shift}} {s['flow_shift']} must be > 0 (the official shifts are 2 to 9)")
    check_seed("seed", s["seed"])


def settle_cache_type(s: dict, source: str) -> None:
    """``cache_type`` from ``cache_type`` and ``enable_cache`` (the official flag: deepcache
    unless ``cache_type`` names another cache)."""
    enable = s.pop("enable_cache")
    if s["cache_type"] is None:
        s["cache_type"] = "deepcache" if enable else "none"
    elif enable and s["cache_type"] == "none":
        raise InputError("{enable_cache} turns a cache on and {cache_type} none turns it off: give one of them")
    if s["cache_type"] not in CACHE_TYPES:
        raise InputError(f"{source}: cache_type {s['cache_type']!r} is not one of {', '.join(CACHE_TYPES)}")


def calibration_target(path: str | Path | None, s: DenoiseSettings) -> Path | None:
    """Where ``magcache_calibrate`` writes the run's MagCache calibration, if given (the run then
    caches nothing)."""
    if not path:
        return None
    if s.cache_type != "none":
        raise InputError(f"{{magcache_calibrate}} runs every step in full: drop {{cache_type}} {s.cache_type}")
    return Path(path)


def kernels(s: DenoiseSettings) -> tuple[attention.Kernel, attention.SparseKernel]:
    """The dense and the block-sparse kernel of the run."""
    dense = attention.kernel(s.attention, dtype=jax_dtype(DTYPES[s.dtype]), block_q=s.splash_block_q,
                             block_kv=s.splash_block_kv, block_kv_compute=s.splash_block_kv_compute)
    return dense, attention.sparse_kernel(s.sparse_attention)


def weights(model: str, dtype: str, config: DiTConfig, placement: parallel.Placement, note: Note,
            lora: str | None = None, lora_scale: float = 1.0) -> dict:
    """The DiT's weights on device, the adapter merged."""
    adapter = None
    if lora:
        adapter = load_adapter(lora)
        check_adapter(adapter, config, lora)
    if not Path(model).exists():
        note(f"model {model}: seeded random weights (no checkpoint)")
    params = model_params(model, config, DTYPES[dtype], placement.params)
    return params if adapter is None else merge_adapter(params, adapter, lora_scale)


class DiT:
    """A DiT loaded once: its configuration, placement, weights on device (stacked by layer) and
    attention kernels, and the step executables of every run it served, by signature."""

    def __init__(self, config: DiTConfig, placement: parallel.Placement, params: dict,
                 kernels: tuple[attention.Kernel, attention.SparseKernel], settings: DenoiseSettings):
        self.config, self.placement, self.params = config, placement, params
        self.attention, self.sparse_attention = kernels
        self.settings = settings  # what it was loaded with, the strategy and mesh as placed
        self.compiled_steps: dict = {}

    @classmethod
    def load(cls, s: DenoiseSettings, config: DiTConfig, devices: Sequence[jax.Device], latent_shape: tuple[int, ...],
             note: Note) -> DiT:
        """Place ``s.model`` on ``devices`` as ``s`` says, refusing first a run of ``latent_shape``
        that cannot fit, so that nothing is read in vain."""
        placement = parallel.placement(config, s.sharding, s.mesh, batch=s.batch, devices=devices)
        s = dataclasses.replace(s, sharding=placement.strategy.name if placement.strategy else None,
                                mesh=placement.mesh_spec)
        pair = kernels(s)
        dit = cls(config, placement, {}, pair, s)
        dit.check_run(s, latent_shape, devices[0])
        params = weights(s.model, s.dtype, config, placement, note, getattr(s, "lora", None),
                         getattr(s, "lora_scale", 1.0))
        # the blocks' weights stacked by layer for the scanned step, each group freed once stacked (peak: one copy)
        dit.params = stack_blocks(params, donate=True)
        return dit

    def settled(self, s: DenoiseSettings) -> DenoiseSettings:
        """``s`` with the strategy and mesh the model was placed with."""
        return dataclasses.replace(s, sharding=self.settings.sharding, mesh=self.settings.mesh)

    def check_run(self, s: DenoiseSettings, latent_shape: tuple[int, ...], device: jax.Device) -> None:
        """Refuse a run this placement cannot take: a batch its dp axis cannot split, or a canvas
        that cannot fit in the device's memory."""
        mesh = self.placement.mesh
        if mesh is not None and s.batch % mesh.shape["dp"]:
            raise InputError(f"{{guidance_scale}} {s.guidance_scale} gives {s.batch} sample(s) per step, which the "
                             f"model's mesh dp={mesh.shape['dp']} cannot split: load it with another {{mesh}}")
        parallel.check_memory(self.config, self.placement, latent_shape, s.batch, DTYPES[s.dtype].itemsize, device)

    def denoiser(self, conditions: dict[str, np.ndarray], s: DenoiseSettings, cache: FeatureCache) -> Denoiser:
        """A run's denoiser on this model, sharing its compiled steps."""
        return Denoiser(self.config, self.params, conditions, s.sampling, placement=self.placement,
                        attention=self.attention, sparse_attention=self.sparse_attention, cache=cache,
                        compiled_steps=self.compiled_steps)


def warm_up(denoiser: Denoiser, latents: np.ndarray, warmup_steps: int, note: Note,
            profile: tuple[str, int] | None = None) -> float:
    """Untimed steps on a copy of ``latents`` (and with ``profile`` (folder, steps) that many
    more, traced by the JAX profiler); returns seconds."""
    begin = time.perf_counter()
    steps = denoiser.num_steps
    warm = denoiser.place(latents)
    state = denoiser.initial_state(warm.shape)
    warm_steps = list(range(min(warmup_steps, steps)))
    cached_steps = [i for i in range(steps) if not denoiser.is_full(i)]
    if warm_steps and cached_steps:  # the first run of the cached step's executable is not timed either
        warm_steps.append(cached_steps[0])
    for i in warm_steps:
        if denoiser.is_full(i):
            state = denoiser.carried(state)  # frees what the full step replaces, as the timed loop does
        warm, state = denoiser.step(warm, i, state)
    jax.block_until_ready(warm)
    seconds = time.perf_counter() - begin
    if profile:  # extra steps on the warm-up copy, so the timed loop stays untraced
        folder, count = profile
        first = cached_steps[0] - 1 if cached_steps else 0  # a full step, then the cached ones after it
        with jax.profiler.trace(folder):
            for n in range(count):
                with jax.profiler.StepTraceAnnotation("denoise", step_num=n):
                    warm, state = denoiser.step(warm, (first + n) % steps, state)
                    warm.block_until_ready()
        note(f"profiler: {count} steps traced to {folder}")
    return seconds


def check_finite(latents: np.ndarray, key: str, consequence: str) -> None:
    """Refuse denoised latents that hold NaN or inf, saying ``consequence`` (what was not made) and
    naming the settings that likely caused them."""
    if not np.isfinite(latents).all():
        causes = "{guidance_scale}, {flow_shift}, or {lora_scale} and the LoRA" if key == "stage2" else \
            "{guidance_scale} or {flow_shift}"
        raise InputError(f"the denoised latents hold NaN or inf: {consequence} (likely cause: " + causes + ")")


def record(s: DenoiseSettings, latent_shape: tuple[int, ...], result: LoopResult, start_step: int, compile_s: float,
           warmup_s: float, total_s: float, devices: Sequence[jax.Device], extra: Mapping[str, Any] = {}) -> dict:
    """A denoising stage's entry in config.json: its settings, steps and timings."""
    seconds, full = np.array(result.step_seconds), np.array(result.full, bool)
    mean = lambda a: float(a.mean()) if a.size else 0.0  # noqa: E731
    return {
        **dataclasses.asdict(s),
        **extra,
        "latent_shape": list(latent_shape),
        "steps": len(seconds),
        "full_steps": int(full.sum()),
        "cached_steps": int((~full).sum()),
        "mean_full_step_s": round(mean(seconds[full]), 4),
        "mean_cached_step_s": round(mean(seconds[~full]), 4),
        "resumed_from_step": start_step,
        "compile_s": round(compile_s, 3),
        "warmup_s": round(warmup_s, 3),
        "mean_step_s": round(mean(seconds), 4),
        "total_s": round(total_s, 3),
        "devices": {"count": len(devices), "platform": devices[0].platform, "kind": devices[0].device_kind},
    }


def summary(label: str, rec: Mapping[str, Any], destination: Any) -> str:
    """The one line a denoising stage ends with."""
    cached = f", {rec['cached_steps']} cached (mean {rec['mean_cached_step_s']:.4f} s)" if rec["cached_steps"] else ""
    return (f"{label}: compile {rec['compile_s']:.2f} s | {rec['steps']} steps, mean {rec['mean_step_s']:.4f} s/step: "
            f"{rec['full_steps']} full (mean {rec['mean_full_step_s']:.4f} s){cached} | "
            f"total {rec['total_s']:.2f} s -> {destination}")
