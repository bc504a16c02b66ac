"""Preparing training data: the VAE encode of 480p x 121-frame clips, on one device against all,
and what the released encoder costs per clip.

    python benchmarks/vae_encode.py time --repeats 2          # tiny VAE, 848x480 x 121 frames, 8 devices vs 1
    python benchmarks/vae_encode.py time --frames 33 --repeats 3
    python benchmarks/vae_encode.py flops                     # the released encoder, per 480p x 121 clip

``time`` encodes seeded random pixels of one 16:9 480p clip (848 x 480, the bucket
``run/prepare_dataset.py`` gives a 16:9 clip) at the default tiling (256-pixel tiles, 1/8
overlap: 12 tiles of 4 shapes) with the tiny VAE (``vae.tiny_vae``: the released compression,
channels 8-64) through ``vae.video_encoder``'s jax path, as prepare_dataset does: on the first
device and on all --devices (virtual CPU devices unless JAX finds an accelerator), one encoder
built per path, compiled by an untimed first call, the paths taking turns on one thread budget
(--threads); a busy machine stops the run (--allow_busy). It prints clips/s (1 / the median) per
path and whether the latents are bit for bit the same. Virtual CPU devices share this process's
CPUs: their ratio is the cost of spreading the tiles, not a speedup accelerators would give.

``flops`` lowers, without weights (``jax.ShapeDtypeStruct`` in place of parameters and pixels;
the model built on the meta device), the released encoder (diffusers' default
``AutoencoderKLHunyuanVideo15``: widths 128-1024) on each tile shape of that clip, and adds up
XLA's FLOP count (``Lowered.cost_analysis``) over the clip's tiles: the arithmetic a 480p x 121
clip costs, and the time it would take at a chip's peak (a lower bound: convolutions at 3 or 8
channels run far below peak on any matrix unit).
"""

from __future__ import annotations

import sys

import timing

THREADS = timing.pin_threads(timing.threads_flag())
DEVICES = timing.virtual_devices()

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKLHunyuanVideo15  # noqa: E402

from hunyuan_tpu.pipeline import bucket_size  # noqa: E402
from hunyuan_tpu.runtime import functional, jax_dtype  # noqa: E402
from hunyuan_tpu.vae import StaticShapeEncoder, Tiling, tile_counts, tiny_vae, video_encoder  # noqa: E402

HEIGHT, WIDTH = bucket_size("480p", "16:9")
FULL_FRAMES = 121
# bf16 dense peaks, TFLOP/s per chip: Google's v6e (Trillium) and v5e pages, NVIDIA's H100 SXM sheet
PEAKS = {"TPU v6e": 918, "TPU v5e": 197, "H100 SXM": 989}


def time_encode(args: argparse.Namespace) -> None:
    devices = jax.devices()
    vae = tiny_vae(seed=0)
    tiling = Tiling()
    shapes = tile_counts(HEIGHT, WIDTH, tiling.tile_px, tiling.stride_px)
    print(f"tiny VAE encoder (float32, widths {tuple(vae.model.config.block_out_channels)}), one {WIDTH}x{HEIGHT} "
          f"clip of {args.frames} frames, {sum(shapes.values())} tiles of {tiling.tile_px} px ({len(shapes)} shapes) "
          f"overlapping {tiling.overlap}; 1 device against {len(devices)} ({devices[0].platform}, "
          f"{devices[0].device_kind})")
    print(timing.budget_line(THREADS))
    print(timing.check_quiet(args.allow_busy) + "\n")
    gen = torch.Generator().manual_seed(0)
    pixels = (torch.rand(1, 3, args.frames, HEIGHT, WIDTH, generator=gen) * 2 - 1).numpy()
    paths = {1: video_encoder(vae, devices=devices[:1]), len(devices): video_encoder(vae, devices=devices)}
    moments, first_s = {}, {}
    for count, encode in paths.items():  # the untimed first call compiles each tile shape
        begin = time.perf_counter()
        moments[count] = encode(pixels)
        first_s[count] = time.perf_counter() - begin
    times = timing.round_robin({count: (lambda e=e: e(pixels)) for count, e in paths.items()}, args.repeats,
                               warmup=0)
    same = all(np.array_equal(moments[1], m) for m in moments.values())
    print("| devices | s per clip: min / median | first call (compiling) s | clips/s (median) |")
    print("| --- | --- | --- | --- |")
    for count in paths:
        low, median = timing.min_median(times[count])
        print(f"| {count} | {low:.2f} / {median:.2f} | {first_s[count]:.1f} | {1 / median:.3f} |")
    print(f"\nlatents {moments[1].shape[2:]} per clip, the same bits on every path: {'yes' if same else 'NO'}; "
          f"load average {timing.load():.2f} at the end")


def flops(args: argparse.Namespace) -> None:
    with torch.device("meta"):  # the released architecture, no weights
        model = AutoencoderKLHunyuanVideo15()
    encoder = StaticShapeEncoder(model.encoder)
    apply = functional(encoder)
    tiling = Tiling()
    shapes = tile_counts(HEIGHT, WIDTH, tiling.tile_px, tiling.stride_px)
    dtype = jax_dtype(torch.bfloat16)
    params = {k: jax.ShapeDtypeStruct(tuple(v.shape), dtype) for k, v in encoder.state_dict().items()}
    count = sum(int(np.prod(t.shape)) for t in encoder.state_dict().values())
    print(f"released VAE encoder ({count / 1e6:.0f} M parameters, widths {tuple(model.config.block_out_channels)}), "
          f"bfloat16, one {WIDTH}x{HEIGHT} clip of {args.frames} frames in {sum(shapes.values())} tiles:\n")
    print("| tile (h x w px) | tiles | TFLOP per tile | lowering s |")
    print("| --- | --- | --- | --- |")
    total = 0.0
    for (h, w), n in shapes.items():
        x = jax.ShapeDtypeStruct((1, 3, args.frames, h, w), dtype)
        begin = time.perf_counter()
        cost = jax.jit(apply).lower(params, x).cost_analysis()
        tile_flops = float(cost["flops"])
        total += n * tile_flops
        print(f"| {h} x {w} | {n} | {tile_flops / 1e12:.2f} | {time.perf_counter() - begin:.0f} |")
    print(f"\n{total / 1e12:.1f} TFLOP per clip. At bf16 peak (a lower bound on the time):")
    for chip, peak in PEAKS.items():
        print(f"- {chip} ({peak} TFLOP/s): {total / (peak * 1e12):.3f} s per clip on one chip, "
              f"{peak * 1e12 / total:.1f} clips/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("time", help="the tiny VAE's tiled encode of a 480p clip, 1 device against all")
    t.add_argument("--repeats", type=int, default=2, help="timed rounds (default: %(default)s)")
    timing.add_flags(t)
    f = sub.add_parser("flops", help="the released encoder's FLOPs per 480p clip, lowered abstractly")
    f.add_argument("--threads", type=int, help="CPUs for the compiler (default: all this process may use)")
    for parser in (t, f):
        parser.add_argument("--frames", type=int, default=FULL_FRAMES, help="of the clip, 4k+1 (default: %(default)s)")
        parser.add_argument("--devices", type=int, default=8, help="virtual CPU devices, read before JAX starts "
                            "(default: %(default)s; no effect on an accelerator)")
    args = p.parse_args()
    if args.frames < 1 or (args.frames - 1) % 4:
        sys.exit(f"--frames {args.frames} must be of the form 4k+1")
    (time_encode if args.command == "time" else flops)(args)


if __name__ == "__main__":
    main()
