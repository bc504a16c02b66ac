"""From prompt to video in one command: stage 1 (encoders), stage 2 (DiT), with --sr the
super-resolution stage (SR DiT), stage 3 (VAE).

    python run/generate.py --prompt "A cat walks on the grass, realistic"        # tiny, weight-free
    python run/generate.py --prompt "A cat walks on the grass, realistic" --sr   # and SR, 96p -> 144p
    python run/generate.py --prompt "..." --image first.png --model ckpts/transformer/480p_i2v \\
        --text_encoder ckpts/text_encoder/llm --byt5 ckpts/text_encoder/Glyph-SDXL-v2 \\
        --vision_encoder ckpts/vision_encoder/siglip --vae ckpts/vae

Takes the union of the stages' flags (the SR model's prefixed with sr_) and runs them in one
process, in a temporary folder beside --output_dir; only when all succeed are their files moved
into --output_dir, so a failure (bad input found by any stage) leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import jax

import stage1_text_encoder as stage1
import stage2_sr
import stage2_transformer as stage2
import stage3_vae_decoder as stage3
from hunyuan_tpu import handoff
from hunyuan_tpu.files import InputError, locked_folder, read_json, remove_stale_temporaries
from hunyuan_tpu.vae import vae_config_latent_channels
from stage_cli import Parser, add_vae_group, add_video_group, parse_joining, run_main


def build_parser() -> Parser:
    p = Parser(description="Prompt (and image) to video: stages 1, 2 and 3 in one command.",
               epilog="Without weights paths every model is a tiny one with seeded random weights.")
    io = p.add_argument_group("input and output")
    io.add_argument("--output_dir", default="./stage_outputs", metavar="DIR",
                    help="where the stages' files go: config.json, embeddings, latents, video.mp4, "
                    "first_frame.png (default: %(default)s)")
    stage1.add_prompt_group(p)
    stage2.add_model_group(p)
    stage1.add_encoder_group(p)
    add_vae_group(p)
    add_video_group(p)
    stage2.add_sampling_group(p)
    stage2.add_devices_group(p)
    stage2.add_cache_group(p)
    stage2.add_kernels_group(p)
    stage2.add_run_group(p, checkpoints=False)
    stage1.add_sr_flag(stage2_sr.add_sr_model_group(p, prefix="sr_"))
    stage3.add_decode_group(p)
    return p


# generate.py's flags for the SR stage, under the names the SR stage takes them by
SR_FLAGS = {"sr_model": "model", "sr_num_inference_steps": "num_inference_steps",
            "sr_guidance_scale": "guidance_scale", "sr_flow_shift": "flow_shift"}


def sr_args(args: argparse.Namespace, folder: str) -> argparse.Namespace:
    """The SR stage's flags: the devices, kernels, dtype and seed of the base run (from stage 2's
    record), its own model and sampling; no feature cache (the base run's schedule is for its steps)."""
    own = stage_args(stage2_sr.build_parser(), args, input_dir=folder, output_dir=folder)
    for cache_flag in (*stage2.CACHE_DEFAULTS, "magcache_calibrate"):
        setattr(own, cache_flag, None)
    for flag, name in SR_FLAGS.items():
        setattr(own, name, getattr(args, flag))
    own.sharding = own.mesh = None  # taken from stage 2's record, which adapts a CFG mesh to the SR batch
    return own


def stage_args(stage_parser: argparse.ArgumentParser, args: argparse.Namespace, **io: str) -> argparse.Namespace:
    """The stage's own flags, taken from the union's parse (the rest at the stage's defaults)."""
    own = stage_parser.parse_args([])
    for key in vars(own):
        if hasattr(args, key):
            setattr(own, key, getattr(args, key))
    for key, value in io.items():
        setattr(own, key, value)
    return own


def check_stages(args: argparse.Namespace, folder: str) -> None:
    """Every stage's settings, checked before stage 1 writes anything: a bad stage-2 or stage-3
    flag is refused at once, not after the stages before it ran. (The SR stage's depend on
    stage 2's output; they are checked when it starts.)"""
    s1, _ = stage1.resolve_settings(stage_args(stage1.build_parser(), args, output_dir=folder))
    handed = stage1.handoff_settings(s1, args.vae)
    stage2.resolve_settings(stage_args(stage2.build_parser(), args, input_dir=folder, output_dir=folder), handed,
                            "the command line")
    three = stage_args(stage3.build_parser(), args, input_dir=folder, output_dir=folder)
    stage3.resolve_settings(three, {**handed, "stage2": {}}, "the command line")
    if three.vae:  # its config only: the weights load when stage 3 starts
        vae_config_latent_channels(three.vae)


def run(args: argparse.Namespace, devices: Sequence[jax.Device] | None = None) -> int:
    started = time.perf_counter()
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--output_dir {out_dir}: exists and is not a folder")
    check_stages(args, str(out_dir))
    work = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    work.mkdir(parents=True)
    remove_stale_temporaries(out_dir.parent)  # work folders of killed runs
    try:
        folder = str(work)
        stage1.run(stage_args(stage1.build_parser(), args, output_dir=folder))
        stage2.run(stage_args(stage2.build_parser(), args, input_dir=folder, output_dir=folder), devices)
        if args.sr:
            stage2_sr.run(sr_args(args, folder), devices)
        stage3.run(stage_args(stage3.build_parser(), args, input_dir=folder, output_dir=folder), devices)
        names = [handoff.EMBEDDINGS_NAME, handoff.LATENTS_NAME, handoff.VIDEO_NAME, handoff.FIRST_FRAME_NAME]
        if args.sr:
            names.append(handoff.SR_LATENTS_NAME)
        with locked_folder(out_dir):
            for name in (*names, handoff.CONFIG_NAME):  # config.json last: it is what says the folder is complete
                os.replace(work / name, out_dir / name)
    except InputError as e:  # named as the output folder the user gave, not the work folder that is gone
        raise InputError(e.template.replace(str(work), str(out_dir))) from None
    except OSError as e:
        if e.filename:
            e.filename = str(e.filename).replace(str(work), str(out_dir))
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    config = read_json(out_dir / handoff.CONFIG_NAME)
    stages = [("stage 1", "stage1"), ("stage 2", "stage2"), *([("SR", "sr")] if args.sr else []), ("stage 3", "stage3")]
    times = ", ".join(f"{label} {config[key]['total_s']:.2f} s" for label, key in stages)
    total_s = time.perf_counter() - started
    print(f"generate: {times} | total {total_s:.2f} s -> {out_dir / handoff.VIDEO_NAME}")
    return 0


def main(argv: list[str] | None = None, *, devices: Sequence[jax.Device] | None = None) -> int:
    """The command line, in this process: returns the exit code (2 and one line for bad input)."""
    return run_main(lambda: run(parse_joining(build_parser(), argv), devices))


if __name__ == "__main__":
    sys.exit(main())
