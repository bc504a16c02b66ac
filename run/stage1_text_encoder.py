"""Stage 1: encode the prompt (and, for i2v, the image) into the stage hand-off folder.

    python run/stage1_text_encoder.py --prompt "A cat walks on the grass" --output_dir ./stage_outputs
    python run/stage1_text_encoder.py --prompt "..." --image first_frame.png \\
        --text_encoder ckpts/text_encoder/llm --byt5 ckpts/text_encoder/Glyph-SDXL-v2 \\
        --vision_encoder ckpts/vision_encoder/siglip --vae ckpts/vae --model ckpts/transformer/480p_i2v

Without an encoder path, that encoder is a small one built from a config with seeded random
weights, as wide as --model's DiT expects (the tiny DiT by default); each such choice is said
on stderr. Writes embeddings.safetensors and a fresh config.json (run settings + "stage1").
The work is ``hunyuan_tpu.stage_encode``'s, as in the Python API.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from hunyuan_tpu import handoff
from hunyuan_tpu import stage_encode as se
from hunyuan_tpu.files import InputError, locked_folder
from hunyuan_tpu.settings import DTYPES
from stage_cli import Parser, add_model_flag, add_vae_group, add_video_group, note, run_main


def add_prompt_group(p: argparse.ArgumentParser) -> None:
    prompt = p.add_argument_group("prompt")
    prompt.add_argument("--prompt", metavar="TEXT", help="what the video shows (required); text in \"quotes\" "
                        "is also read by the glyph encoder")
    prompt.add_argument("--negative_prompt", metavar="TEXT", help="what it should not show (default: empty)")
    prompt.add_argument("--image", metavar="FILE", help="first frame for image-to-video (i2v); without it, t2v")


def add_sr_flag(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--sr", action="store_true", default=None,
                       help="super-resolution after the base run (480p -> 720p, 720p -> 1080p): stage 1 also encodes "
                       "the i2v image at the SR canvas, stage 3 decodes the SR latents")


def add_encoder_group(p: argparse.ArgumentParser) -> None:
    enc = p.add_argument_group("encoders (default for each: a tiny one with seeded random weights)")
    enc.add_argument("--text_encoder", metavar="DIR", help="Qwen2.5-VL-7B-Instruct folder (ckpts/text_encoder/llm)")
    enc.add_argument("--byt5", metavar="DIR", help="Glyph-SDXL-v2 folder, with google/byt5-small beside it as "
                     "byt5-small/ (ckpts/text_encoder/Glyph-SDXL-v2)")
    enc.add_argument("--vision_encoder", metavar="DIR", help="SigLIP folder from FLUX.1-Redux-dev, i2v only "
                     "(ckpts/vision_encoder/siglip)")
    enc.add_argument("--encoder_backend", choices=se.BACKENDS,
                     help="jax: each encoder jitted through torchax on the accelerator (compiled once: every "
                     "input has a fixed shape); torch: eager PyTorch on the host (default: auto, jax on TPU and "
                     "GPU, torch on a CPU-only machine)")
    for flag, what, default in se.ENCODER_DTYPES:
        enc.add_argument(f"--{flag}", choices=sorted(DTYPES),
                         help=f"{what} dtype (default: {default}, as the official pipeline; bfloat16 is TPU's "
                         "native type, its drift is in BENCHMARKS.md)")


def build_parser() -> Parser:
    p = Parser(description="Stage 1: encode the prompt (and the i2v image) for the DiT "
               "(-> embeddings.safetensors, config.json).")
    io = p.add_argument_group("input and output")
    io.add_argument("--output_dir", default="./stage_outputs", metavar="DIR", help="hand-off folder (default: %(default)s)")
    add_prompt_group(p)
    model = p.add_argument_group("model")
    add_model_flag(model)
    add_sr_flag(model)
    add_encoder_group(p)
    add_vae_group(p)
    add_video_group(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Stage 1: check the settings, load the encoders, encode, write embeddings and config.json."""
    started = time.perf_counter()
    out_dir = Path(args.output_dir)
    s, image = se.resolve_settings(vars(args), note)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--output_dir {out_dir}: exists and is not a folder")
    load_begin = time.perf_counter()
    encoders = se.load_encoders(vars(args), s.config, s.encoder_dtypes, s.backend, note, vision=s.task == "i2v")
    if s.task == "i2v":
        encoders = dataclasses.replace(encoders, vae=se.load_vae_setting(s.vae, s.config, s.vae_dtype, note))
    load_s = time.perf_counter() - load_begin
    encode_begin = time.perf_counter()
    tensors, counts = se.encode(s, encoders, image, note)
    encode_s = time.perf_counter() - encode_begin
    with locked_folder(out_dir):  # another run writing here is refused; a killed run's temporaries go
        handoff.write_embeddings(out_dir, tensors)
        record = se.record(s, encoders, counts, load_s, encode_s, time.perf_counter() - started)
        handoff.write_config(out_dir, {**s.handoff(), "stage1": record})
    print(se.summary({"task": s.task, "stage1": record}, out_dir / handoff.EMBEDDINGS_NAME))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line, in this process: returns the exit code (2 and one line for bad input)."""
    return run_main(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
