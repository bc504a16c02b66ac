"""Stage 3: decode the latents with the VAE into video.mp4 (24 fps) and first_frame.png.

    python run/stage3_vae_decoder.py --input_dir ./stage_outputs
    python run/stage3_vae_decoder.py --vae ckpts/vae --vae_dtype bfloat16 --backend jax
    python run/stage3_vae_decoder.py --input_dir ./stage_outputs --latents base   # skip the SR latents

The latents are the super-resolution stage's (sr_latents.safetensors) when this run has them,
else stage 2's (latents.safetensors); --latents picks one. The VAE comes from --vae, else the one
stage 1 recorded in config.json, else a tiny VAE with seeded random weights (the default run's).
Large canvases are decoded in overlapping 256-pixel spatial tiles, as the official pipeline does,
so that 720p and 1080p x 121 frames fit in memory; with the jax backend the tiles of one shape
are decoded on all devices at once, a tile per device, with the same pixels as on one device.
The record in config.json names the latents file decoded and the device count.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax

from hunyuan_tpu import handoff
from hunyuan_tpu import stage_decode as sd
from hunyuan_tpu.files import InputError, locked_folder
from hunyuan_tpu.vae import BACKENDS
from hunyuan_tpu.video import FPS, write_mp4, write_png
from stage_cli import Parser, add_vae_group, finite_float, note, run_main


def add_decode_group(p: argparse.ArgumentParser) -> None:
    dec = p.add_argument_group("decode")
    dec.add_argument("--backend", choices=BACKENDS, help="jax: the PyTorch VAE through torchax, jitted per tile shape; "
                     "torch: eager PyTorch (default: jax)")
    dec.add_argument("--tile_size", type=int, metavar="PX",
                     help="spatial tile in pixels, multiple of 16 (default: 256)")
    dec.add_argument("--tile_overlap", type=finite_float, metavar="F", help="tile overlap fraction (default: 0.125)")
    dec.add_argument("--no_tiling", action="store_true", help="decode the whole canvas at once")
    dec.add_argument("--fps", type=int, metavar="N", help=f"frames per second of the mp4 (default: {FPS})")


LATENTS_CHOICES = ("auto", "base", "sr")
SR_RECORD = "sr"  # the SR stage's (run/stage2_sr.py) entry in config.json


def build_parser() -> Parser:
    p = Parser(description="Stage 3: decode the latents with the VAE ((sr_)latents.safetensors -> video.mp4, "
               "first_frame.png).",
               epilog="Each setting comes from the command line if given, else from the input config.json, "
               "else the default.")
    io = p.add_argument_group("input and output")
    io.add_argument("--input_dir", default="./stage_outputs", metavar="DIR",
                    help="stage-2 (or SR stage) folder (default: %(default)s)")
    io.add_argument("--output_dir", metavar="DIR", help="where video.mp4, first_frame.png and config.json go "
                    "(default: --input_dir)")
    io.add_argument("--latents", choices=LATENTS_CHOICES, default="auto",
                    help=f"which latents to decode: sr ({handoff.SR_LATENTS_NAME}), base ({handoff.LATENTS_NAME}), "
                    "or auto: sr when this run's SR stage wrote them, else base (default: %(default)s)")
    add_vae_group(p)
    add_decode_group(p)
    return p


def latents_name(choice: str, in_dir: Path, stage_config: dict[str, Any], source: str) -> str:
    """The latents file that ``--latents`` picks. SR latents count only with the SR stage's record
    in config.json: stage 1 starts that file afresh, so a leftover from an earlier run has none."""
    sr_path = in_dir / handoff.SR_LATENTS_NAME
    if choice not in LATENTS_CHOICES:
        raise InputError(f"--latents {choice!r} is not one of {', '.join(LATENTS_CHOICES)}")
    if choice == "base":
        return handoff.LATENTS_NAME
    if choice == "sr" and not sr_path.is_file():
        raise InputError(f"--latents sr: {sr_path}: no such file (run run/stage2_sr.py first)")
    if choice == "sr" and SR_RECORD not in stage_config:
        raise InputError(f"{source}: no \"{SR_RECORD}\" entry: {sr_path.name} is not from this run's SR stage "
                         "(run run/stage2_sr.py first)")
    if choice == "auto" and sr_path.is_file() and SR_RECORD not in stage_config:
        print(f"stage 3: {sr_path.name} is not from this run's SR stage (no \"{SR_RECORD}\" entry in {source}): "
              f"decoding {handoff.LATENTS_NAME}", file=sys.stderr)
    return handoff.SR_LATENTS_NAME if sr_path.is_file() and SR_RECORD in stage_config else handoff.LATENTS_NAME


def run(args: argparse.Namespace, devices: Sequence[jax.Device] | None = None) -> int:
    """Stage 3 on ``devices`` (default: all of this process's; the jax backend's tiles go across
    them): decode the latents, write video.mp4, first_frame.png and the record."""
    started = time.perf_counter()
    in_dir = Path(args.input_dir)
    out_dir = Path(args.output_dir or args.input_dir)
    stage_config = handoff.read_config(in_dir)
    source = str(in_dir / handoff.CONFIG_NAME)
    s, tiling = sd.resolve_settings(vars(args), stage_config, source)
    latents_file = latents_name(args.latents, in_dir, stage_config, source)
    latents = handoff.read_latents(in_dir, name=latents_file)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--output_dir {out_dir}: exists and is not a folder")

    load_begin = time.perf_counter()
    decoder = sd.Decoder(sd.load(s, latents.shape[1], note), jax.local_devices() if devices is None else devices)
    load_s = time.perf_counter() - load_begin
    decode_begin = time.perf_counter()
    frames = decoder.frames(latents, s.backend, tiling)
    decode_s = time.perf_counter() - decode_begin

    with locked_folder(out_dir):  # another run writing here is refused; a killed run's temporaries go
        write_begin = time.perf_counter()
        write_mp4(out_dir / handoff.VIDEO_NAME, frames, fps=s.fps)
        write_png(out_dir / handoff.FIRST_FRAME_NAME, frames[0])
        write_s = time.perf_counter() - write_begin
        seconds = {"load_s": load_s, "decode_s": decode_s, "write_s": write_s,
                   "total_s": time.perf_counter() - started}
        record = sd.record(s, decoder, tiling, frames, latents_file, seconds)
        handoff.update_config(out_dir, {**stage_config, "stage3": record})
    print(sd.summary(record, out_dir / handoff.VIDEO_NAME))
    return 0


def main(argv: list[str] | None = None, *, devices: Sequence[jax.Device] | None = None) -> int:
    """The command line, in this process: returns the exit code (2 and one line for bad input)."""
    return run_main(lambda: run(build_parser().parse_args(argv), devices))


if __name__ == "__main__":
    sys.exit(main())
