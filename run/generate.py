"""From prompt to video in one command: stage 1 (encoders), stage 2 (DiT), with --sr the
super-resolution stage (SR DiT), stage 3 (VAE).

    python run/generate.py --prompt "A cat walks on the grass, realistic"        # tiny, weight-free
    python run/generate.py --prompt "A cat walks on the grass, realistic" --sr   # and SR, 96p -> 144p
    python run/generate.py --prompt "..." --image first.png --model ckpts/transformer/480p_i2v \\
        --text_encoder ckpts/text_encoder/llm --byt5 ckpts/text_encoder/Glyph-SDXL-v2 \\
        --vision_encoder ckpts/vision_encoder/siglip --vae ckpts/vae

Takes the union of the stages' flags (the SR model's prefixed with sr_) and runs them in one
process through the Python API (``hunyuan_tpu.HunyuanVideoPipeline``), every setting checked
before any model runs. The files are written in a temporary folder beside --output_dir and moved
in when all are whole, so a failure leaves nothing behind.
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
from hunyuan_tpu import stage_decode as sd
from hunyuan_tpu import stage_encode as se
from hunyuan_tpu.files import InputError, locked_folder, read_json, remove_stale_temporaries
from hunyuan_tpu.generation import CALL_SETTINGS, LOAD_SETTINGS, Generation, HunyuanVideoPipeline, has_record
from hunyuan_tpu.stage_denoise import summary
from stage_cli import Parser, add_vae_group, add_video_group, note, parse_joining, run_main


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


def write_outputs(result: Generation, out_dir: Path) -> None:
    """The hand-off files into ``out_dir``: written in a temporary folder beside it, then moved in
    (config.json last: it is what says the folder is complete). A failure leaves nothing behind."""
    work = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    work.mkdir(parents=True)
    remove_stale_temporaries(out_dir.parent)  # work folders of killed runs
    try:
        result.save_outputs(work)
        with locked_folder(out_dir):
            for name in sorted(p.name for p in work.iterdir() if p.name != handoff.CONFIG_NAME):
                os.replace(work / name, out_dir / name)
            os.replace(work / handoff.CONFIG_NAME, out_dir / handoff.CONFIG_NAME)
    except InputError as e:  # named as the output folder the user gave, not the work folder that is gone
        raise InputError(e.template.replace(str(work), str(out_dir))) from None
    except OSError as e:
        if e.filename:
            e.filename = str(e.filename).replace(str(work), str(out_dir))
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summaries(config: dict, out_dir: Path) -> list[str]:
    """Each stage's line, as the stage commands end."""
    lines = [se.summary(config, out_dir / handoff.EMBEDDINGS_NAME),
             summary("stage 2", config["stage2"], out_dir / handoff.LATENTS_NAME)]
    if has_record(config, "sr"):
        lines.append(summary("SR", config["sr"], out_dir / handoff.SR_LATENTS_NAME))
    return [*lines, sd.summary(config["stage3"], out_dir / handoff.VIDEO_NAME)]


def run(args: argparse.Namespace, devices: Sequence[jax.Device] | None = None) -> int:
    started = time.perf_counter()
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--output_dir {out_dir}: exists and is not a folder")
    stage2.check_profiler(args)
    stage2.use_compilation_cache(args)
    writer = jax.process_index() == 0  # on several hosts, one writes the outputs
    pipe = HunyuanVideoPipeline(devices=devices, note=note, source="the command line", progress=writer,
                                **{key: getattr(args, key) for key in LOAD_SETTINGS})
    profile = (args.profiler_output_dir, args.profiler_steps) if args.enable_profiler else None
    result = pipe(args.prompt, profile=profile, **{key: getattr(args, key) for key in CALL_SETTINGS})
    if writer:
        write_outputs(result, out_dir)
    config = read_json(out_dir / handoff.CONFIG_NAME) if writer else dict(result.config)
    for line in summaries(config, out_dir):
        print(line)
    stages = [("stage 1", "stage1"), ("stage 2", "stage2"), *([("SR", "sr")] if has_record(config, "sr") else []),
              ("stage 3", "stage3")]
    times = ", ".join(f"{label} {config[key]['total_s']:.2f} s" for label, key in stages)
    print(f"generate: {times} | total {time.perf_counter() - started:.2f} s -> {out_dir / handoff.VIDEO_NAME}")
    return 0


def main(argv: list[str] | None = None, *, devices: Sequence[jax.Device] | None = None) -> int:
    """The command line, in this process: returns the exit code (2 and one line for bad input)."""
    return run_main(lambda: run(parse_joining(build_parser(), argv), devices))


if __name__ == "__main__":
    sys.exit(main())
