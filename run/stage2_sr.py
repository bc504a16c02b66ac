"""The super-resolution stage: stage-2 latents in, latents of the 720p / 1080p canvas out.

    python run/stage2_sr.py --input_dir ./stage_outputs          # tiny models after a tiny run
    python run/stage2_sr.py --input_dir ./stage_outputs --model ckpts/transformer/720p_sr_distilled \\
        --upsampler ckpts/upsampler/720p_sr_distilled

As the official SR pipeline: the high-resolution bucket is the SR family's bucket closest to the
low-resolution canvas's aspect ratio; the LR latents are resized bilinearly, refined by the
upsampler in float32 and noised at strength 0.7 (seeded by --lq_noise_seed, recorded); the SR
DiT (the base DiT with 98 input channels) denoises from the run's seed with the LR latents as a
condition until the timestep falls below 700. The stage-1 embeddings are reused (the official SR
pipeline encodes the same prompt again; with guidance 1 it has no negative prompt). Writes
sr_latents.safetensors and config.json's "sr" record; stage 3 then decodes the SR latents.

Settings come from the command line, else (devices, kernels, dtype, seed) the stage-2 record in
config.json, else the SR model's defaults (official SR_PIPELINE_CONFIGS).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import jax

import stage2_transformer as stage2
from hunyuan_tpu import handoff
from hunyuan_tpu.cache import MagCacheCalibration
from hunyuan_tpu.pipeline import LATENT_CHANNELS
from hunyuan_tpu.settings import DTYPES
from hunyuan_tpu.stage_denoise import DiT
from hunyuan_tpu.stage_sr import KEY, Settings, resolve_settings, upsampler_of
from hunyuan_tpu.super_resolution import prepare_lq, sr_conditions
from hunyuan_tpu.upsampler import upsample
from stage_cli import Parser, finite_float, note, parse_joining, run_main


def add_sr_model_group(p: argparse.ArgumentParser, *, prefix: str = "") -> argparse._ArgumentGroup:
    """The SR model's flags; ``prefix`` "sr_" names them in generate.py, beside the base model's."""
    model = p.add_argument_group("super-resolution")
    model.add_argument(f"--{prefix}model", metavar="PATH|PRESET",
                       help="SR DiT checkpoint (ckpts/transformer/720p_sr_distilled) or preset (default: the folder "
                       "of the SR version beside the base checkpoint, official layout; for a preset base, the SR "
                       "preset: tiny_sr, 720p_sr_distilled, 1080p_sr_distilled)")
    model.add_argument("--upsampler", metavar="DIR",
                       help="upsampler folder, config.json + safetensors (default: upsampler/<version> of the SR "
                       "checkpoint's root; for a preset, seeded random weights)")
    if prefix:
        model.add_argument("--sr_num_inference_steps", type=int, metavar="N",
                           help="SR Euler steps (default: 6 to 720p, 8 to 1080p)")
        model.add_argument("--sr_guidance_scale", type=finite_float, metavar="G",
                           help="SR CFG scale (default: 1.0, off)")
        model.add_argument("--sr_flow_shift", type=finite_float, metavar="S", help="SR schedule shift (default: 2.0)")
    model.add_argument("--lq_noise_seed", type=int, metavar="N",
                       help="seed of the noise added to the upsampled LR latents (the official draws it unseeded; "
                       "default: --seed + 1)")
    return model


def build_parser() -> Parser:
    p = Parser(description="Super-resolution: the stage-2 latents to the 720p / 1080p canvas with the SR DiT "
               "(latents.safetensors -> sr_latents.safetensors).",
               epilog="Sampling defaults are the SR model's: 6 steps to 720p, 8 to 1080p, shift 2, guidance 1.")
    io = p.add_argument_group("input and output")
    io.add_argument("--input_dir", default="./stage_outputs", metavar="DIR",
                    help="the stage-2 folder (default: %(default)s)")
    io.add_argument("--output_dir", metavar="DIR", help="where sr_latents.safetensors and config.json go "
                    "(default: --input_dir)")
    add_sr_model_group(p)
    p.add_argument_group("model").add_argument("--dtype", choices=sorted(DTYPES),
                                               help="weights and activations dtype (default: stage 2's)")
    stage2.add_sampling_group(p)
    stage2.add_devices_group(p)
    stage2.add_cache_group(p)
    stage2.add_kernels_group(p)
    stage2.add_run_group(p)
    return p


def fingerprint(settings: Settings, in_dir: Path) -> str:
    fixed = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("warmup_steps", "checkpoint_every")}
    digest = hashlib.sha256(json.dumps(fixed, sort_keys=True).encode())
    for name in (handoff.EMBEDDINGS_NAME, handoff.LATENTS_NAME):
        digest.update((in_dir / name).read_bytes())
    return digest.hexdigest()


def build_sr(args: argparse.Namespace, devices: Sequence[jax.Device], hold: contextlib.ExitStack) -> stage2.Stage2:
    """Resolve the settings, upsample and noise the LR latents, place the SR DiT, compile its step."""
    in_dir = Path(args.input_dir)
    out_dir = Path(args.output_dir or args.input_dir)
    stage_config = handoff.read_config(in_dir)
    source = str(in_dir / handoff.CONFIG_NAME)
    lr = handoff.read_latents(in_dir)
    s, config = resolve_settings(vars(args), stage_config, lr.shape, source, note)
    calibrate = stage2.calibrating(args, s)
    embeddings = handoff.read_embeddings(in_dir, task=s.task, model=config, latent_hw=s.latent_shape[1:], sr=True)
    upsampler = upsampler_of(s.upsampler, note)
    stage2.check_profiler(args)
    dit = DiT.load(s, config, devices, s.latent_shape, note)
    s = dit.settled(s)
    begin = time.perf_counter()
    lq = prepare_lq(lr, s.latent_shape, lambda x: upsample(upsampler, x), s.lq_noise_seed)
    upsample_s = time.perf_counter() - begin
    conditions = sr_conditions(embeddings, lq, task=s.task, cfg=s.sampling.cfg, model=config)
    stage2.use_compilation_cache(args)
    cache = MagCacheCalibration() if calibrate else s.cache(config)
    stage2.claim_output(out_dir, hold)
    run_id = fingerprint(s, in_dir)
    latents, start_step, state = stage2.start(s, out_dir / stage2.checkpoint_name(KEY), run_id, args.resume)
    denoiser = dit.denoiser(conditions, s, cache)
    compile_s = denoiser.compile((1, LATENT_CHANNELS, *s.latent_shape))
    record = {"upsample_s": round(upsample_s, 3)}
    return stage2.Stage2(s, denoiser, latents, start_step, in_dir, out_dir, stage_config, run_id, compile_s,
                         key=KEY, record=record, state=state, calibrate=calibrate)


def run(args: argparse.Namespace, devices: Sequence[jax.Device] | None = None) -> int:
    """The SR stage on ``devices`` (default: all)."""
    started = time.perf_counter()
    devices = list(jax.devices() if devices is None else devices)
    return stage2.run_built(lambda hold: build_sr(args, devices, hold), args, devices, started)


def main(argv: list[str] | None = None, *, devices: Sequence[jax.Device] | None = None) -> int:
    """The command line, in this process: returns the exit code (2 and one line for bad input)."""
    return run_main(lambda: run(parse_joining(build_parser(), argv), devices))


if __name__ == "__main__":
    sys.exit(main())
