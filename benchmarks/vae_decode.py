"""Stage 3 across devices: the tiled VAE decode on one device against all, and one tile's memory.

    python benchmarks/vae_decode.py time --repeats 3               # tiny VAE, 720p and 1080p canvases, 8 vs 1
    python benchmarks/vae_decode.py time --canvas 720p --latent_frames 2 --repeats 1
    python benchmarks/vae_decode.py memory                         # the released decoder, one 1080p x 121 tile

``time`` decodes seeded random latents on the real latent canvases (720p: 45 x 80 latent pixels,
1080p: 68 x 120) at the default tiling (256-pixel tiles, 1/8 overlap: 24 and 45 tiles of 4 shapes
each) with the tiny VAE (``vae.tiny_vae``: the released compression and tiling, channels 8-64),
since the released decoder takes hours per canvas on a CPU, and over --latent_frames of the real
31 (default 1: even the tiny VAE takes seconds per tile-frame here). It times the same tiled decode
(``vae.tiled``) on the first device and on all --devices (virtual CPU devices unless JAX finds an
accelerator), one decoder built per path, compiled by an untimed first call, the paths taking turns
(``timing.round_robin``) on one thread budget (--threads); a busy machine stops the run
(--allow_busy). Per canvas: the fastest and the median decode per path and their ratio, and whether
the pixels are bit for bit the same. Virtual CPU devices share this process's CPUs: their ratio
measures the cost of spreading the tiles, not a speedup that accelerators would give.

``memory`` compiles, without weights (``jax.ShapeDtypeStruct`` in place of parameters and latents;
the model built on the meta device), the program stage 3 runs for one tile of a 1080p x 121-frame
canvas with the released decoder (diffusers' default ``AutoencoderKLHunyuanVideo15``: widths
128-1024, 32 latent channels): a 16 x 16 latent tile of 31 frames, one per device, and prints
XLA's ``memory_analysis()`` of it per device, in bfloat16 and float32. It is this machine's
compiler's figure (XLA:CPU); a TPU's compiler fuses and lays out differently: run it on a TPU host
for that chip's figure.
"""

from __future__ import annotations

import sys

import timing

THREADS = timing.pin_threads(timing.threads_flag())
DEVICES = timing.virtual_devices()

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKLHunyuanVideo15  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from hunyuan_tpu.pipeline import LATENT_CHANNELS, VAE_SPATIAL  # noqa: E402
from hunyuan_tpu.runtime import functional, jax_dtype  # noqa: E402
from hunyuan_tpu.vae import (  # noqa: E402
    TILE_AXIS, StaticShapeDecoder, Tiling, tile_counts, tile_decoder, tile_mesh, tiled, tiles_program, tiny_vae,
)

# Latent canvases (height, width) of the 16:9 buckets: 720p is 1280x720, 1080p 1920x1088
CANVASES = {"720p": (45, 80), "1080p": (68, 120)}
FULL_LATENT_FRAMES = 31  # 121 frames
MIB = 2 ** 20


def time_decode(args: argparse.Namespace) -> None:
    devices = jax.devices()
    vae = tiny_vae(seed=0)
    tiling = Tiling()
    print(f"tiny VAE (float32, widths {tuple(vae.model.config.block_out_channels)}), {args.latent_frames} of "
          f"{FULL_LATENT_FRAMES} latent frames ({4 * (args.latent_frames - 1) + 1} of 121 video frames), "
          f"tiles of {tiling.tile_px} px overlapping {tiling.overlap}; 1 device against {len(devices)} "
          f"({devices[0].platform}, {devices[0].device_kind})")
    print(timing.budget_line(THREADS))
    print(timing.check_quiet(args.allow_busy) + "\n")
    paths = {1: tile_decoder(vae, "jax", devices[:1]), len(devices): tile_decoder(vae, "jax", devices)}
    rows = []
    for canvas in args.canvas:
        h, w = CANVASES[canvas]
        shapes = tile_counts(h, w, tiling.tile_latent, tiling.stride_latent)
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(1, LATENT_CHANNELS, args.latent_frames, h, w, generator=gen).numpy() / vae.scaling_factor
        pixels: dict[int, np.ndarray] = {}
        first_s: dict[int, float] = {}
        for count, decode_tiles in paths.items():  # the untimed first call compiles each tile shape
            begin = time.perf_counter()
            pixels[count] = tiled(z, decode_tiles, tiling)
            first_s[count] = time.perf_counter() - begin
        times = timing.round_robin({count: (lambda d=d: tiled(z, d, tiling)) for count, d in paths.items()},
                                   args.repeats, warmup=0)
        (one_min, one_med), (all_min, all_med) = (timing.min_median(times[c]) for c in paths)
        identical = all(np.array_equal(pixels[1], p) for p in pixels.values())
        rows.append(f"| {canvas} ({w * VAE_SPATIAL}x{h * VAE_SPATIAL}), {h}x{w} latents | "
                    f"{sum(shapes.values())} ({len(shapes)} shapes) | {one_min:.2f} / {one_med:.2f} "
                    f"(first {first_s[1]:.1f}) | {all_min:.2f} / {all_med:.2f} (first {first_s[len(devices)]:.1f}) | "
                    f"{one_med / all_med:.2f}x | {'yes' if identical else 'NO'} |")
    print(f"| canvas | tiles | 1 device s: min / median (first call, compiling) | {len(devices)} devices s: "
          "min / median (first call) | speedup (medians) | same pixels |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"\nload average {timing.load():.2f} at the end")


def memory(args: argparse.Namespace) -> None:
    with torch.device("meta"):  # the released architecture, no weights
        model = AutoencoderKLHunyuanVideo15()
    decoder = StaticShapeDecoder(model.decoder)
    apply = functional(decoder)
    mesh = tile_mesh()
    device = mesh.devices.flat[0]
    tiling = Tiling()
    tile = (mesh.size, LATENT_CHANNELS, FULL_LATENT_FRAMES, tiling.tile_latent, tiling.tile_latent)
    count = sum(math.prod(t.shape) for t in decoder.state_dict().values())
    print(f"released VAE decoder ({count / 1e9:.3f} B parameters, widths {tuple(model.config.block_out_channels)}), "
          f"one {tiling.tile_px}x{tiling.tile_px} tile of {FULL_LATENT_FRAMES} latent frames (121 video frames) per "
          f"device, compiled abstractly for {mesh.size} {device.platform} devices ({device.device_kind}); "
          f"per device, MiB:\n")
    print("| dtype | weights | latent tile | pixel tile (output) | temporaries | total | compile s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dtype in (torch.bfloat16, torch.float32):
        jdtype = jax_dtype(dtype)
        replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(TILE_AXIS))
        params = {k: jax.ShapeDtypeStruct(tuple(v.shape), jdtype, sharding=replicated)
                  for k, v in decoder.state_dict().items()}
        z = jax.ShapeDtypeStruct(tile, jdtype, sharding=split)
        begin = time.perf_counter()
        compiled = tiles_program(apply, mesh).lower(params, z).compile()
        compile_s = time.perf_counter() - begin
        m = compiled.memory_analysis()
        latent = math.prod(tile[1:]) * jdtype.itemsize
        weights = m.argument_size_in_bytes - latent
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        print(f"| {jdtype.name} | {weights / MIB:.0f} | {latent / MIB:.2f} | {m.output_size_in_bytes / MIB:.0f} | "
              f"{m.temp_size_in_bytes / MIB:.0f} | {total / MIB:.0f} | {compile_s:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("time", help="the tiny VAE's tiled decode at 720p / 1080p, 1 device against all")
    t.add_argument("--canvas", nargs="+", choices=sorted(CANVASES), default=list(CANVASES))
    t.add_argument("--latent_frames", type=int, default=1, help=f"of the real {FULL_LATENT_FRAMES} "
                   "(default: %(default)s)")
    t.add_argument("--repeats", type=int, default=3, help="timed rounds (default: %(default)s)")
    timing.add_flags(t)
    m = sub.add_parser("memory", help="one 1080p x 121-frame tile of the released decoder, compiled abstractly")
    for parser in (t, m):
        parser.add_argument("--devices", type=int, default=8, help="virtual CPU devices, read before JAX starts "
                            "(default: %(default)s; no effect on an accelerator)")
    m.add_argument("--threads", type=int, help="CPUs for the compiler (default: all this process may use)")
    args = p.parse_args()
    if args.command == "time" and args.latent_frames < 1:
        sys.exit("--latent_frames must be >= 1")
    (time_decode if args.command == "time" else memory)(args)


if __name__ == "__main__":
    main()
