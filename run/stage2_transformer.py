"""Stage 2: denoise the latent video with the DiT, from stage-1 embeddings to latents.safetensors.

    python run/stage2_transformer.py --input_dir ./stage_outputs --video_length 121
    python run/stage2_transformer.py --demo          # no stage-1 outputs, no weights needed

Every setting comes from the command line if given, else from the input config.json (written
by stage 1 or --demo), else the built-in default.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

import sharding
from hunyuan_tpu import attention, handoff, parallel
from hunyuan_tpu.cache import (
    Calibration, DeepCache, FeatureCache, MagCache, MagCacheCalibration, NoCache, Schedule, TaylorCache, TeaCache,
    read_calibration, write_calibration,
)
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.files import InputError, locked_folder, read_safetensors, save_safetensors
from hunyuan_tpu.lora import check_adapter, load_adapter, merge_adapter
from hunyuan_tpu.params import model_params
from hunyuan_tpu.pipeline import (
    LATENT_CHANNELS, Denoiser, LoopResult, SamplingSettings, bucket_size, build_conditions, default_sampling,
    denoise, initial_noise, latent_shape, released_variant,
)
from hunyuan_tpu.runtime import gather_to_host, jax_dtype, to_host_array, to_torch
from hunyuan_tpu.scan import stack_blocks
from hunyuan_tpu.synthetic import stage1_embeddings
from stage_cli import (
    DTYPES, Parser, add_model_flag, add_video_group, check_seed, dtype_of, finite_float, model_config, named_by_source,
    parse_joining, resolve, run_main,
)


def checkpoint_name(key: str) -> str:
    """The resumable checkpoint of the stage recorded under ``key`` in config.json."""
    return f"{key}_checkpoint.safetensors"


CHECKPOINT_NAME = checkpoint_name("stage2")
CACHE_PREFIX = "cache."  # a checkpoint's tensors of the feature cache's carried state
# The weight-free demo: the tiny preset at 9 frames of 112x64 pixels (3 x 4 x 7 latents).
DEMO_CONFIG = {
    "prompt": "(demo) seeded random embeddings in place of a text encoder",
    "negative_prompt": "",
    "task": "t2v",
    "resolution": "480p",
    "aspect_ratio": "16:9",
    "model": "tiny",
    "dtype": "float32",
    "video_length": 9,
    "height": 64,
    "width": 112,
}


def add_model_group(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model")
    add_model_flag(model)
    model.add_argument("--dtype", choices=sorted(DTYPES), help="weights and activations dtype (default: bfloat16)")
    model.add_argument("--lora", metavar="FILE", help="LoRA adapter (safetensors, official/PEFT or diffusers names) "
                       "merged into the weights")
    model.add_argument("--lora_scale", type=finite_float, metavar="S",
                       help="strength of --lora, times its alpha/r (default: 1.0)")


def add_sampling_group(p: argparse.ArgumentParser) -> None:
    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--num_inference_steps", type=int, metavar="N", help="Euler steps (default: 50; 12 step-distilled)")
    sampling.add_argument("--guidance_scale", type=finite_float, metavar="G",
                          help="CFG scale, <= 1 disables CFG (default: 6.0; 1.0 distilled)")
    sampling.add_argument("--flow_shift", type=finite_float, metavar="S",
                          help="schedule shift, > 0 (default: 5 at 480p, 9 720p t2v, 7 720p i2v)")
    sampling.add_argument("--seed", type=int, metavar="N", help="initial noise seed (default: 42)")


def add_devices_group(p: argparse.ArgumentParser) -> None:
    devices = p.add_argument_group("devices")
    devices.add_argument("--sharding", choices=sorted(sharding.STRATEGIES),
                         help="strategy (sharding/*.py); default: none on one device, tp_fc2_replicated on several")
    devices.add_argument("--mesh", metavar="SPEC", help="axis sizes over all devices, e.g. tp=8, dp=2,sp=4 "
                         "(axes dp, fsdp, sp, tp; default: every device on the strategy's own axis)")


def add_cache_group(p: argparse.ArgumentParser) -> None:
    cache = p.add_argument_group(
        "feature cache",
        "Full steps run every block; the steps between reuse what the last full step left on device. deepcache "
        "runs the last block(s) from the features entering them; teacache (AngelSlim's) and taylorcache run only "
        "the final layer, on the last full step's output or a Taylor extrapolation of it; magcache adds the last "
        "full step's residual to the step's input, on a schedule from a calibration file. deepcache, teacache and "
        "taylorcache follow --cache_start_step/--cache_end_step/--cache_step_interval.")
    cache.add_argument("--cache_type", choices=CACHE_TYPES, help="the cache (default: none; deepcache with "
                       "--enable_cache)")
    cache.add_argument("--enable_cache", action="store_true", default=None,
                       help="the official flag: --cache_type deepcache unless --cache_type names another")
    cache.add_argument("--cache_start_step", type=int, metavar="N", help="steps before N all run in full (default: 11)")
    cache.add_argument("--cache_end_step", type=int, metavar="N", help="steps from N on all run in full (default: 45)")
    cache.add_argument("--cache_step_interval", type=int, metavar="K",
                       help="from the start step to the end step, every K-th step runs in full (default: 4)")
    cache.add_argument("--cache_keep_blocks", type=int, metavar="N",
                       help="deepcache: blocks that run on cached steps, the last N (default: 1)")
    cache.add_argument("--taylor_max_order", type=int, metavar="N",
                       help="taylorcache: highest derivative kept (default: 2)")
    cache.add_argument("--taylor_low_freqs_order", type=int, metavar="N",
                       help="taylorcache: derivatives of the low frequencies (default: 2)")
    cache.add_argument("--taylor_high_freqs_order", type=int, metavar="N",
                       help="taylorcache: derivatives of the high frequencies (default: 2)")
    cache.add_argument("--magcache_calibration", metavar="FILE",
                       help="magcache: the ratios --magcache_calibrate wrote for this model and these settings")
    cache.add_argument("--magcache_threshold", type=finite_float, metavar="E",
                       help="magcache: skip while the accumulated error stays under E; 0 caches nothing "
                       "(default: 0.24)")
    cache.add_argument("--magcache_max_skips", type=int, metavar="K",
                       help="magcache: at most K cached steps in a row (default: 4)")
    cache.add_argument("--magcache_retention_ratio", type=finite_float, metavar="R",
                       help="magcache: the first R of the steps all run in full (default: 0.2)")
    cache.add_argument("--magcache_calibrate", metavar="FILE",
                       help="run every step in full and write the model's per-step residual magnitude ratios to "
                       "FILE, for --magcache_calibration (the run's latents are written as usual)")


def add_kernels_group(p: argparse.ArgumentParser) -> None:
    kernels = p.add_argument_group(
        "attention, profiling and compilation",
        "Dense attention runs splash (Pallas) on TPU, cuDNN flash on GPU, blocked XLA on CPU. A sparse model "
        "(attn_mode flex-block-attn: the *_sparse checkpoints and presets) runs SSTA: its block lists are "
        "computed on device each step and its image queries go to a block-sparse kernel, Pallas on TPU and "
        "a portable XLA loop on GPU and CPU; its text queries use the dense kernel.")
    kernels.add_argument("--attention", choices=attention.BACKENDS,
                         help="dense kernel: splash on TPU, cudnn on GPU, blocked (jnp, key blocks with an online "
                         "softmax) elsewhere; xla is the plain jnp reference (default: auto, by platform)")
    kernels.add_argument("--sparse_attention", choices=attention.SPARSE_BACKENDS,
                         help="block-sparse kernel of a sparse model: pallas on TPU (interpreted elsewhere: tests "
                         "only), xla elsewhere (default: auto, by platform)")
    kernels.add_argument("--dense_attention", action="store_true", default=None,
                         help="run a sparse model with dense attention everywhere (for comparison)")
    kernels.add_argument("--splash_block_q", type=int, metavar="N",
                         help=f"splash query block (default: {attention.SPLASH_BLOCK_Q})")
    kernels.add_argument("--splash_block_kv", type=int, metavar="N",
                         help=f"splash key/value block (default: {attention.SPLASH_BLOCK_KV})")
    kernels.add_argument("--splash_block_kv_compute", type=int, metavar="N",
                         help=f"splash key/value slice computed at a time, divides the block "
                         f"(default: {attention.SPLASH_BLOCK_KV_COMPUTE})")
    kernels.add_argument("--enable_profiler", action="store_true",
                         help="trace --profiler_steps extra steady-state steps after warm-up with jax.profiler")
    kernels.add_argument("--profiler_output_dir", default="/dev/shm/jax-trace", metavar="DIR",
                         help="where the trace goes, for TensorBoard / XProf (default: %(default)s)")
    kernels.add_argument("--profiler_steps", type=int, default=3, metavar="N", help="steps traced (default: %(default)s)")
    kernels.add_argument("--compilation_cache_dir", metavar="DIR",
                         help="JAX persistent compilation cache: a second run with the same shapes skips compiling")


def add_run_group(p: argparse.ArgumentParser, *, checkpoints: bool = True) -> None:
    run = p.add_argument_group("run")
    run.add_argument("--warmup_steps", type=int, metavar="N", help="untimed steps after compiling, results discarded (default: 2)")
    if checkpoints:
        run.add_argument("--checkpoint_every", type=int, metavar="N", help="save step and latents every N steps (default: 0, off)")
        run.add_argument("--resume", action="store_true",
                         help=f"continue from {CHECKPOINT_NAME} (SR: {checkpoint_name('sr')}) in the output folder")


def build_parser() -> Parser:
    p = Parser(
        description="Stage 2: denoise the latent video with the DiT (stage-1 embeddings -> latents.safetensors).",
        epilog="Each setting comes from the command line if given, else from the input config.json "
        "(written by stage 1 or --demo), else the default shown.",
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--input_dir", default="./stage_outputs", metavar="DIR", help="stage-1 folder (default: %(default)s)")
    io.add_argument("--output_dir", metavar="DIR", help="where latents.safetensors and config.json go (default: --input_dir)")
    io.add_argument("--demo", action="store_true",
                    help="write seeded tiny stage-1 outputs to --output_dir first, then run on them (no weights)")
    add_model_group(p)
    add_video_group(p)
    add_sampling_group(p)
    add_devices_group(p)
    add_cache_group(p)
    add_kernels_group(p)
    add_run_group(p)
    return p


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
    """What a denoising stage (stage 2, the SR stage) runs with, resolved: the command line, else
    the input config.json, else the default. The names are config.json's, which the record repeats."""

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

    def cache(self, config: DiTConfig) -> FeatureCache:
        """The run's feature cache, checked against ``config`` and the step count (a MagCache
        calibration also against the model, LoRA and sampling it was measured with)."""
        schedule = Schedule(self.cache_start_step, self.cache_end_step, self.cache_step_interval)
        if self.cache_type == "magcache":
            if not self.magcache_calibration:
                raise InputError("--cache_type magcache needs --magcache_calibration FILE (write one with "
                                 "--magcache_calibrate FILE)")
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


def resolve_settings(args: argparse.Namespace, stage_config: dict, source: str) -> tuple[Settings, DiTConfig]:
    """The run's settings and model configuration, each value checked; a bad value is named as
    its flag, or as its config.json key when it came from there."""
    from_config: set[str] = set()
    with named_by_source(from_config, source):
        return _resolve_settings(args, stage_config, source, from_config)


def _resolve_settings(args: argparse.Namespace, stage_config: dict, source: str, from_config: set[str]
                      ) -> tuple[Settings, DiTConfig]:
    s = resolve(args, stage_config, GENERAL_DEFAULTS, source, from_config)
    dtype_of("dtype", s["dtype"])
    if s["task"] not in handoff.TASKS:
        raise InputError(f"{source}: task {s['task']!r} is not one of {', '.join(handoff.TASKS)}")
    config = model_config(s["model"])
    if config.ideal_task not in (None, s["task"]):
        raise InputError(f"--model {s['model']} is trained for {config.ideal_task}, but the run is {s['task']}")
    defaults = default_sampling(config, released_variant(s["model"]))
    if s["dense_attention"]:
        config = config.dense()
    s.update(resolve(args, stage_config, {
        "num_inference_steps": (int, defaults.num_inference_steps),
        "guidance_scale": (float, defaults.guidance_scale),
        "flow_shift": (float, defaults.flow_shift),
    }, source, from_config))
    attention.check_splash_blocks(s["splash_block_q"], s["splash_block_kv"], s["splash_block_kv_compute"])
    if s["num_inference_steps"] < 1:
        raise InputError(f"{{num_inference_steps}} must be >= 1, got {s['num_inference_steps']}")
    for key in ("warmup_steps", "checkpoint_every"):
        if s[key] < 0:
            raise InputError(f"{{{key}}} must be >= 0, got {s[key]}")
    if s["flow_shift"] <= 0:
        raise InputError(f"{{flow_shift}} {s['flow_shift']} must be > 0 (the official shifts are 2 to 9)")
    check_seed("seed", s["seed"])
    s["resolution"] = s["resolution"] or config.ideal_resolution or "480p"
    bucket_h, bucket_w = bucket_size(s["resolution"], s["aspect_ratio"])
    s["height"] = bucket_h if s["height"] is None else s["height"]  # 0 is not "unset": latent_shape refuses it
    s["width"] = bucket_w if s["width"] is None else s["width"]
    latent_shape(s["video_length"], s["height"], s["width"])  # checks the three
    settle_cache_type(s, source)
    settings = Settings(**s)
    settings.cache(config)  # checks the cache's settings
    return settings, config


def settle_cache_type(s: dict, source: str) -> None:
    """``cache_type`` from ``--cache_type`` and ``--enable_cache`` (the official flag: deepcache
    unless ``--cache_type`` names another cache)."""
    enable = s.pop("enable_cache")
    if s["cache_type"] is None:
        s["cache_type"] = "deepcache" if enable else "none"
    elif enable and s["cache_type"] == "none":
        raise InputError("--enable_cache turns a cache on and --cache_type none turns it off: give one of them")
    if s["cache_type"] not in CACHE_TYPES:
        raise InputError(f"{source}: cache_type {s['cache_type']!r} is not one of {', '.join(CACHE_TYPES)}")


def demo_config(folder: Path) -> dict:
    """The config.json ``--demo`` writes into ``folder`` (over an earlier demo's, never over real
    stage-1 outputs)."""
    config_path = folder / handoff.CONFIG_NAME
    earlier = handoff.read_config(folder) if config_path.exists() else {}
    if earlier and not earlier.get("stage1", {}).get("demo"):
        raise InputError(f"{config_path}: holds real stage-1 outputs; give --demo another --output_dir")
    return {**earlier, **DEMO_CONFIG, "stage1": {"demo": True, "seed": 0}}


def write_demo_inputs(folder: Path) -> None:
    """The demo's stage-1 outputs: written only once every setting of the run is checked."""
    shape = latent_shape(DEMO_CONFIG["video_length"], DEMO_CONFIG["height"], DEMO_CONFIG["width"])
    handoff.write_embeddings(folder, stage1_embeddings(DiTConfig.preset("tiny"), latent_hw=shape[1:], seed=0))
    handoff.write_config(folder, demo_config(folder))


def fingerprint(settings: Settings, embeddings_file: Path) -> str:
    """What fixes the run's result: a checkpoint of any other run is refused."""
    fixed = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("warmup_steps", "checkpoint_every")}
    digest = hashlib.sha256(json.dumps(fixed, sort_keys=True).encode())
    digest.update(embeddings_file.read_bytes())
    return digest.hexdigest()


@dataclasses.dataclass
class Stage2:
    """A built run: the denoiser compiled, the latents to start from, where files go. The SR
    stage is one too (``key`` "sr": its record's key in config.json, and its files' prefix)."""

    settings: DenoiseSettings
    denoiser: Denoiser
    latents: np.ndarray
    start_step: int
    in_dir: Path
    out_dir: Path
    stage_config: dict
    run_id: str
    compile_s: float
    key: str = "stage2"
    record: dict = dataclasses.field(default_factory=dict)  # what the stage adds to its config.json record
    state: dict[str, np.ndarray] | None = None  # the cache's carried state at start_step (a checkpoint's)
    calibrate: Path | None = None  # where --magcache_calibrate writes the ratios

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / checkpoint_name(self.key)

    @property
    def latents_path(self) -> Path:
        return self.out_dir / (handoff.LATENTS_NAME if self.key == "stage2" else f"{self.key}_{handoff.LATENTS_NAME}")


def kernels(s: DenoiseSettings) -> tuple[attention.Kernel, attention.SparseKernel]:
    """The dense and the block-sparse kernel of the run."""
    dense = attention.kernel(s.attention, dtype=jax_dtype(DTYPES[s.dtype]), block_q=s.splash_block_q,
                             block_kv=s.splash_block_kv, block_kv_compute=s.splash_block_kv_compute)
    return dense, attention.sparse_kernel(s.sparse_attention)


def weights(model: str, dtype: str, config: DiTConfig, placement: parallel.Placement, lora: str | None = None,
            lora_scale: float = 1.0) -> dict:
    """The DiT's weights on device, the adapter merged; read before the output folder exists,
    so that a bad checkpoint or adapter leaves nothing behind."""
    adapter = None
    if lora:
        adapter = load_adapter(lora)
        check_adapter(adapter, config, lora)
    if not Path(model).exists():
        print(f"model {model}: seeded random weights (no checkpoint)", file=sys.stderr)
    params = model_params(model, config, DTYPES[dtype], placement.params)
    return params if adapter is None else merge_adapter(params, adapter, lora_scale)


def start(s: DenoiseSettings, checkpoint_path: Path, run_id: str, resume: bool
          ) -> tuple[np.ndarray, int, dict[str, np.ndarray] | None]:
    """The latents and step to start from, and the cache's carried state there (None: as before
    step 0): the seed's noise, or a matching checkpoint's."""
    if resume and checkpoint_path.exists():
        saved, meta = read_safetensors(checkpoint_path)
        if meta.get("run") != run_id:
            raise InputError(f"{checkpoint_path}: saved by a run with other settings or inputs; drop --resume or the file")
        print(f"resuming at step {meta['step']} of {s.num_inference_steps}", file=sys.stderr)
        state = {k.removeprefix(CACHE_PREFIX): to_host_array(v) for k, v in saved.items()
                 if k.startswith(CACHE_PREFIX)}
        return saved["latents"].float().numpy(), int(meta["step"]), state
    if resume:
        print(f"no {checkpoint_path.name} in {checkpoint_path.parent}: starting from step 0", file=sys.stderr)
    return initial_noise(s.seed, s.latent_shape), 0, None


def calibrating(args: argparse.Namespace, s: DenoiseSettings) -> Path | None:
    """Where ``--magcache_calibrate`` writes the calibration, if given (the run then caches nothing)."""
    if not args.magcache_calibrate:
        return None
    if getattr(args, "resume", False):
        raise InputError("--magcache_calibrate measures every step from the first: drop --resume")
    if s.cache_type != "none":
        raise InputError(f"--magcache_calibrate runs every step in full: drop --cache_type {s.cache_type}")
    return Path(args.magcache_calibrate)


def claim_output(folder: Path, hold: contextlib.ExitStack) -> None:
    """Make the output folder and hold it for the rest of the run (``hold``): another run into it
    is refused, and what a killed run left there is removed. Only the writing process does so."""
    if jax.process_index() == 0:
        hold.enter_context(locked_folder(folder))


def build(args: argparse.Namespace, devices: Sequence[jax.Device] | None, hold: contextlib.ExitStack) -> Stage2:
    """Resolve the settings, place the weights and compile the step(s); the output folder is
    held until ``hold`` closes."""
    out_dir = Path(args.output_dir or args.input_dir)
    in_dir = out_dir if args.demo else Path(args.input_dir)
    stage_config = demo_config(out_dir) if args.demo else handoff.read_config(in_dir)
    s, config = resolve_settings(args, stage_config, str(in_dir / handoff.CONFIG_NAME))
    calibrate = calibrating(args, s)
    read_embeddings = functools.partial(handoff.read_embeddings, in_dir, task=s.task, model=config,
                                        latent_hw=s.latent_shape[1:])
    embeddings = None if args.demo else read_embeddings()
    placement = parallel.placement(config, s.sharding, s.mesh, batch=2 if s.sampling.cfg else 1,
                                   devices=devices)
    s = dataclasses.replace(s, sharding=placement.strategy.name if placement.strategy else None,
                            mesh=placement.mesh_spec)
    kernel, sparse_kernel = kernels(s)
    if args.profiler_steps < 1:
        raise InputError(f"--profiler_steps must be >= 1, got {args.profiler_steps}")
    parallel.check_memory(config, placement, s.latent_shape, 2 if s.sampling.cfg else 1,
                          DTYPES[s.dtype].itemsize, (devices or jax.devices())[0])
    params = weights(s.model, s.dtype, config, placement, s.lora, s.lora_scale)
    if args.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cache = MagCacheCalibration() if calibrate else s.cache(config)
    claim_output(out_dir, hold)
    if args.demo:  # every setting is checked by now: a refused run leaves no demo inputs behind
        write_demo_inputs(out_dir)
        embeddings = read_embeddings()
    conditions = build_conditions(embeddings, task=s.task, shape=s.latent_shape, cfg=s.sampling.cfg, model=config)
    run_id = fingerprint(s, in_dir / handoff.EMBEDDINGS_NAME)
    latents, start_step, state = start(s, out_dir / CHECKPOINT_NAME, run_id, args.resume)
    # the blocks' weights stacked by layer for the scanned step, each group freed once stacked (peak: one copy)
    params = stack_blocks(params, donate=True)
    denoiser = Denoiser(config, params, conditions, s.sampling, placement=placement, attention=kernel,
                        sparse_attention=sparse_kernel, cache=cache)
    compile_s = denoiser.compile((1, LATENT_CHANNELS, *s.latent_shape))
    return Stage2(s, denoiser, latents, start_step, in_dir, out_dir, stage_config, run_id, compile_s,
                  state=state, calibrate=calibrate)


def warm_up(run: Stage2, args: argparse.Namespace) -> float:
    """Untimed steps on a copy of the latents (and the profiler's, if asked); returns seconds."""
    begin = time.perf_counter()
    denoiser, steps = run.denoiser, run.settings.num_inference_steps
    warm = denoiser.place(run.latents)
    state = denoiser.initial_state(warm.shape)
    warm_steps = list(range(min(run.settings.warmup_steps, steps)))
    cached_steps = [i for i in range(steps) if not denoiser.is_full(i)]
    if warm_steps and cached_steps:  # the first run of the cached step's executable is not timed either
        warm_steps.append(cached_steps[0])
    for i in warm_steps:
        if denoiser.is_full(i):
            state = denoiser.carried(state)  # frees what the full step replaces, as the timed loop does
        warm, state = denoiser.step(warm, i, state)
    jax.block_until_ready(warm)
    seconds = time.perf_counter() - begin
    if args.enable_profiler:  # extra steps on the warm-up copy, so the timed loop stays untraced
        first = cached_steps[0] - 1 if cached_steps else 0  # a full step, then the cached ones after it
        with jax.profiler.trace(args.profiler_output_dir):
            for n in range(args.profiler_steps):
                with jax.profiler.StepTraceAnnotation("denoise", step_num=n):
                    warm, state = denoiser.step(warm, (first + n) % steps, state)
                    warm.block_until_ready()
        print(f"profiler: {args.profiler_steps} steps traced to {args.profiler_output_dir}", file=sys.stderr)
    return seconds


def execute(run: Stage2, writer: bool) -> tuple[LoopResult, list[float]]:
    """The timed denoising loop, saving a checkpoint every ``checkpoint_every`` steps; with
    ``--magcache_calibrate`` also each step's residual magnitude ratio (one scalar read per step)."""
    s, denoiser = run.settings, run.denoiser
    ratios: list[float] = []

    def on_step(step: int, x: jax.Array, state: dict[str, jax.Array]) -> None:
        if run.calibrate:
            ratios.append(float(state["ratio"]))
        # only before a full step, with the state that outlives it (TaylorCache's derivatives)
        if (s.checkpoint_every and step % s.checkpoint_every == 0 and step < s.num_inference_steps
                and denoiser.is_full(step)):
            # every process takes part in gathering the token-split state; one writes it
            carried = {CACHE_PREFIX + k: to_torch(gather_to_host(v)) for k, v in state.items()
                       if k in denoiser.cache.carried}
            if writer:
                save_safetensors({"latents": to_torch(gather_to_host(x)), **carried}, run.checkpoint_path,
                                 metadata={"step": str(step), "run": run.run_id})

    result = denoise(denoiser, run.latents, run.start_step, state=run.state, on_step=on_step, progress=writer)
    return result, ratios


def report(run: Stage2, result: LoopResult, warmup_s: float, started: float, devices: Sequence[jax.Device],
           ratios: Sequence[float] = ()) -> None:
    """Write the latents and the run's record into config.json, and print one summary line; latents
    that are not finite replace nothing."""
    if not np.isfinite(result.latents).all():
        causes = "{guidance_scale}, {flow_shift}, or {lora_scale} and the LoRA" if run.key == "stage2" else \
            "{guidance_scale} or {flow_shift}"
        raise InputError(f"the denoised latents hold NaN or inf: nothing written to {run.out_dir} (likely cause: "
                         + causes + ")")
    handoff.write_latents(run.out_dir, result.latents, run.latents_path.name)
    if run.calibrate:
        write_calibration(run.settings.calibration(run.denoiser.config, ratios), run.calibrate)
        run.record["magcache_calibrate"] = str(run.calibrate)
    seconds, full = np.array(result.step_seconds), np.array(result.full, bool)
    mean = lambda a: float(a.mean()) if a.size else 0.0  # noqa: E731
    total_s = time.perf_counter() - started
    record = {
        **dataclasses.asdict(run.settings),
        **run.record,
        "latent_shape": list(run.settings.latent_shape),
        "steps": len(seconds),
        "full_steps": int(full.sum()),
        "cached_steps": int((~full).sum()),
        "mean_full_step_s": round(mean(seconds[full]), 4),
        "mean_cached_step_s": round(mean(seconds[~full]), 4),
        "resumed_from_step": run.start_step,
        "compile_s": round(run.compile_s, 3),
        "warmup_s": round(warmup_s, 3),
        "mean_step_s": round(mean(seconds), 4),
        "total_s": round(total_s, 3),
        "devices": {"count": len(devices), "platform": devices[0].platform, "kind": devices[0].device_kind},
    }
    # new base latents make an earlier SR stage's stale: its record goes, so stage 3 ignores its latents
    kept = {k: v for k, v in run.stage_config.items() if not (run.key == "stage2" and k == "sr")}
    handoff.write_config(run.out_dir, {**kept, run.key: record})
    run.checkpoint_path.unlink(missing_ok=True)
    cached_part = f", {int((~full).sum())} cached (mean {mean(seconds[~full]):.4f} s)" if (~full).any() else ""
    label = "stage 2" if run.key == "stage2" else run.key.upper()
    print(f"{label}: compile {run.compile_s:.2f} s | {len(seconds)} steps, mean {mean(seconds):.4f} s/step: "
          f"{int(full.sum())} full (mean {mean(seconds[full]):.4f} s){cached_part} | "
          f"total {total_s:.2f} s -> {run.latents_path}")
    if run.calibrate:
        print(f"MagCache calibration -> {run.calibrate}: magnitude ratios {min(ratios):.3f} to {max(ratios):.3f}. "
              "On real weights, run --cache_type magcache --magcache_calibration with the same settings and compare "
              "its decoded video with this run's (PSNR, SSIM, LPIPS; VBench on several prompts) at each threshold")


def run_built(build_run: Callable[[contextlib.ExitStack], Stage2], args: argparse.Namespace,
              devices: Sequence[jax.Device], started: float) -> int:
    """Build, warm up, denoise, report: stage 2 and the SR stage alike."""
    writer = jax.process_index() == 0  # on several hosts, one writes the outputs
    with contextlib.ExitStack() as hold:
        built = build_run(hold)
        warmup_s = warm_up(built, args)
        result, ratios = execute(built, writer)
        if writer:
            report(built, result, warmup_s, started, devices, ratios)
    return 0


def run(args: argparse.Namespace, devices: Sequence[jax.Device] | None = None) -> int:
    """Stage 2 on ``devices`` (default: all)."""
    started = time.perf_counter()
    devices = list(jax.devices() if devices is None else devices)
    return run_built(lambda hold: build(args, devices, hold), args, devices, started)


def main(argv: list[str] | None = None, *, devices: Sequence[jax.Device] | None = None) -> int:
    """The command line, in this process: returns the exit code (2 and one line for bad input)."""
    return run_main(lambda: run(parse_joining(build_parser(), argv), devices))


if __name__ == "__main__":
    sys.exit(main())
