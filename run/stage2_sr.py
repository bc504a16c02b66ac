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
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import jax

import stage2_transformer as stage2
from hunyuan_tpu import attention, handoff, parallel
from hunyuan_tpu.cache import MagCacheCalibration
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.files import InputError
from hunyuan_tpu.pipeline import LATENT_CHANNELS, Denoiser, latent_shape
from hunyuan_tpu.scan import stack_blocks
from hunyuan_tpu.super_resolution import SR_VERSIONS, hr_canvas, prepare_lq, sr_conditions, sr_version
from hunyuan_tpu.random_init import randomize_like_trained_
from hunyuan_tpu.upsampler import RELEASED_CONFIGS, Upsampler, build, load_upsampler, tiny_upsampler, upsample
from stage_cli import (
    DTYPES, Parser, check_seed, dtype_of, finite_float, model_config, parse_joining, resolve, run_main,
)

KEY = "sr"


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
    **stage2.CACHE_DEFAULTS,  # not stage 2's own: its schedule is for its steps
}


@dataclasses.dataclass(frozen=True)
class Settings(stage2.DenoiseSettings):
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
    raise InputError(f"--model: the base model {base_model} is a checkpoint without {beside} beside it; give the SR "
                     f"checkpoint (transformer/{version})")


def _default_upsampler(model: str) -> str:
    """``upsampler/<version>`` of an official checkpoint root, or the preset's name (random weights)."""
    path = Path(model)
    if not path.exists():
        return model
    beside = path.parent.parent / "upsampler" / path.name
    if beside.is_dir():
        return str(beside)
    raise InputError(f"--upsampler: none given and no {beside} (the official layout); give the upsampler folder")


def resolve_settings(args: argparse.Namespace, stage_config: dict, lr_shape: tuple[int, ...],
                     source: str) -> tuple[Settings, DiTConfig]:
    """The run's settings and SR model configuration, each value checked."""
    base = stage_config.get("stage2")
    if not isinstance(base, dict):
        raise InputError(f"{source}: no stage-2 record (run stage 2 first)")
    s = resolve(args, base, INHERITED, f"{source} (stage2)")
    s.update(resolve(args, {}, OWN, source))
    dtype_of("--dtype", s["dtype"])
    s["task"] = base.get("task", stage_config.get("task", "t2v"))
    s["model"] = s["model"] or _default_model(base.get("model", "tiny"), base.get("resolution", "96p"))
    config = model_config(s["model"])
    if not config.super_resolution:
        raise InputError(f"--model {s['model']}: not a super-resolution model (its input is {config.img_in_channels} "
                         f"channels; an SR DiT takes {3 * config.latent_channels + 2})")
    if config.ideal_task not in (None, s["task"]):
        raise InputError(f"--model {s['model']} is trained for {config.ideal_task}, but the run is {s['task']}")
    s["upsampler"] = s["upsampler"] or _default_upsampler(s["model"])
    version = next((v for v in SR_VERSIONS if v in Path(s["model"]).parts or v == s["model"]), None)
    # a checkpoint outside the official layout gets the 720p version's sampling
    defaults = SR_VERSIONS[version or "720p_sr_distilled"].sampling
    s.update(resolve(args, {}, {
        "num_inference_steps": (int, defaults.num_inference_steps),
        "guidance_scale": (float, defaults.guidance_scale),
        "flow_shift": (float, defaults.flow_shift),
    }, source))
    if s["num_inference_steps"] < 1:
        raise InputError(f"--num_inference_steps must be >= 1, got {s['num_inference_steps']}")
    if s["flow_shift"] <= 0:
        raise InputError(f"--flow_shift {s['flow_shift']} must be > 0 (the SR models' is 2)")
    for key in ("warmup_steps", "checkpoint_every"):
        if s[key] < 0:
            raise InputError(f"--{key} must be >= 0, got {s[key]}")
    attention.check_splash_blocks(s["splash_block_q"], s["splash_block_kv"], s["splash_block_kv_compute"])
    if args.mesh is None and s["mesh"] and not s["guidance_scale"] > 1 and re.search(r"dp=([2-9]|\d\d)", s["mesh"]):
        # stage 2's dp axis split its CFG batch; without CFG there is one sample: every device on the strategy's axis
        print(f"SR: stage 2's mesh {s['mesh']} splits the CFG batch, the SR run has none: using the default mesh of "
              f"{s['sharding'] or 'the default strategy'}", file=sys.stderr)
        s["mesh"] = None
    if s["lq_noise_seed"] is None:
        # not the seed itself: the LR noise must not equal the initial noise
        s["lq_noise_seed"] = (s["seed"] + 1) % 2**64
    check_seed("seed", s["seed"])
    check_seed("lq_noise_seed", s["lq_noise_seed"])
    if s["dense_attention"]:
        config = config.dense()
    s["lr_latent_shape"] = tuple(int(n) for n in lr_shape[2:])
    s["resolution"] = config.ideal_resolution or "720p"
    _, h, w = hr_canvas(s["lr_latent_shape"], s["resolution"])
    s["height"], s["width"] = h * 16, w * 16
    stage2.settle_cache_type(s, source)
    settings = Settings(**s)
    settings.cache(config)  # checks the cache's settings
    return settings, config


def upsampler_of(name: str) -> Upsampler:
    """The upsampler in a folder, or for an SR preset's name seeded random weights: the tiny twin
    for tiny_sr, the released shape otherwise."""
    if name not in SR_VERSIONS:
        return load_upsampler(name)
    print(f"upsampler for {name}: seeded random weights (no folder)", file=sys.stderr)
    if name in RELEASED_CONFIGS:
        class_name, config = RELEASED_CONFIGS[name]
        return randomize_like_trained_(build(class_name, config), seed=0).eval()
    return tiny_upsampler(SR_VERSIONS[name].upsampler)


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
    s, config = resolve_settings(args, stage_config, lr.shape, source)
    calibrate = stage2.calibrating(args, s)
    embeddings = handoff.read_embeddings(in_dir, task=s.task, model=config, latent_hw=s.latent_shape[1:], sr=True)
    upsampler = upsampler_of(s.upsampler)
    placement = parallel.placement(config, s.sharding, s.mesh, batch=2 if s.sampling.cfg else 1, devices=devices)
    s = dataclasses.replace(s, sharding=placement.strategy.name if placement.strategy else None,
                            mesh=placement.mesh_spec)
    kernel, sparse_kernel = stage2.kernels(s)
    if args.profiler_steps < 1:
        raise InputError(f"--profiler_steps must be >= 1, got {args.profiler_steps}")
    parallel.check_memory(config, placement, s.latent_shape, 2 if s.sampling.cfg else 1,
                          DTYPES[s.dtype].itemsize, (devices or jax.devices())[0])
    params = stage2.weights(s.model, s.dtype, config, placement)
    begin = time.perf_counter()
    lq = prepare_lq(lr, s.latent_shape, lambda x: upsample(upsampler, x), s.lq_noise_seed)
    upsample_s = time.perf_counter() - begin
    conditions = sr_conditions(embeddings, lq, task=s.task, cfg=s.sampling.cfg, model=config)
    if args.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cache = MagCacheCalibration() if calibrate else s.cache(config)
    stage2.claim_output(out_dir, hold)
    run_id = fingerprint(s, in_dir)
    latents, start_step, state = stage2.start(s, out_dir / stage2.checkpoint_name(KEY), run_id, args.resume)
    params = stack_blocks(params, donate=True)
    denoiser = Denoiser(config, params, conditions, s.sampling, placement=placement, attention=kernel,
                        sparse_attention=sparse_kernel, cache=cache)
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
