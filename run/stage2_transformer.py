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
from hunyuan_tpu import attention, handoff
from hunyuan_tpu.cache import MagCacheCalibration, write_calibration
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.files import InputError, locked_folder, read_safetensors, save_safetensors
from hunyuan_tpu.pipeline import (
    LATENT_CHANNELS, Denoiser, LoopResult, build_conditions, denoise, initial_noise, latent_shape,
)
from hunyuan_tpu.runtime import gather_to_host, to_host_array, to_torch
from hunyuan_tpu.settings import DTYPES
from hunyuan_tpu.stage_denoise import CACHE_TYPES, DiT, DenoiseSettings, Settings, calibration_target, check_finite, \
    record, resolve_settings, summary, warm_up
from hunyuan_tpu.synthetic import stage1_embeddings
from stage_cli import Parser, add_model_flag, add_video_group, finite_float, note, parse_joining, run_main


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
    return calibration_target(args.magcache_calibrate, s)


def claim_output(folder: Path, hold: contextlib.ExitStack) -> None:
    """Make the output folder and hold it for the rest of the run (``hold``): another run into it
    is refused, and what a killed run left there is removed. Only the writing process does so."""
    if jax.process_index() == 0:
        hold.enter_context(locked_folder(folder))


def check_profiler(args: argparse.Namespace) -> None:
    if args.profiler_steps < 1:
        raise InputError(f"--profiler_steps must be >= 1, got {args.profiler_steps}")


def use_compilation_cache(args: argparse.Namespace) -> None:
    """JAX's persistent compilation cache in ``--compilation_cache_dir``, if given."""
    if args.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def build(args: argparse.Namespace, devices: Sequence[jax.Device], hold: contextlib.ExitStack) -> Stage2:
    """Resolve the settings, place the weights and compile the step(s); the output folder is
    held until ``hold`` closes."""
    out_dir = Path(args.output_dir or args.input_dir)
    in_dir = out_dir if args.demo else Path(args.input_dir)
    stage_config = demo_config(out_dir) if args.demo else handoff.read_config(in_dir)
    s, config = resolve_settings(vars(args), stage_config, str(in_dir / handoff.CONFIG_NAME))
    calibrate = calibrating(args, s)
    read_embeddings = functools.partial(handoff.read_embeddings, in_dir, task=s.task, model=config,
                                        latent_hw=s.latent_shape[1:])
    embeddings = None if args.demo else read_embeddings()
    check_profiler(args)
    dit = DiT.load(s, config, devices, s.latent_shape, note)
    s = dit.settled(s)
    use_compilation_cache(args)
    cache = MagCacheCalibration() if calibrate else s.cache(config)
    claim_output(out_dir, hold)
    if args.demo:  # every setting is checked by now: a refused run leaves no demo inputs behind
        write_demo_inputs(out_dir)
        embeddings = read_embeddings()
    conditions = build_conditions(embeddings, task=s.task, shape=s.latent_shape, cfg=s.sampling.cfg, model=config)
    run_id = fingerprint(s, in_dir / handoff.EMBEDDINGS_NAME)
    latents, start_step, state = start(s, out_dir / CHECKPOINT_NAME, run_id, args.resume)
    denoiser = dit.denoiser(conditions, s, cache)
    compile_s = denoiser.compile((1, LATENT_CHANNELS, *s.latent_shape))
    return Stage2(s, denoiser, latents, start_step, in_dir, out_dir, stage_config, run_id, compile_s,
                  state=state, calibrate=calibrate)


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
    check_finite(result.latents, run.key, f"nothing written to {run.out_dir}")
    handoff.write_latents(run.out_dir, result.latents, run.latents_path.name)
    if run.calibrate:
        write_calibration(run.settings.calibration(run.denoiser.config, ratios), run.calibrate)
        run.record["magcache_calibrate"] = str(run.calibrate)
    rec = record(run.settings, run.settings.latent_shape, result, run.start_step, run.compile_s, warmup_s,
                 time.perf_counter() - started, devices, run.record)
    # new base latents make an earlier SR stage's stale: its record goes, so stage 3 ignores its latents
    kept = {k: v for k, v in run.stage_config.items() if not (run.key == "stage2" and k == "sr")}
    handoff.write_config(run.out_dir, {**kept, run.key: rec})
    run.checkpoint_path.unlink(missing_ok=True)
    print(summary("stage 2" if run.key == "stage2" else run.key.upper(), rec, run.latents_path))
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
        profile = (args.profiler_output_dir, args.profiler_steps) if args.enable_profiler else None
        warmup_s = warm_up(built.denoiser, built.latents, built.settings.warmup_steps, note, profile)
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
