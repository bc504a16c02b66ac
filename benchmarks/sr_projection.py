"""Super-resolution projected onto v6e-8: one SR step per sharding strategy, and the whole job.

    python benchmarks/sr_projection.py                               # 720p x 121 base -> 1080p SR (~4 min)
    python benchmarks/sr_projection.py --sr 720p_sr_distilled        # 480p base -> 720p SR (~4 min)
    python benchmarks/sr_projection.py --hr_latents 31 68 120        # the SR step on 1088x1920 instead
    python benchmarks/sr_projection.py --layout tp_fc2_replicated:tp=8   # one strategy (~1 min)

No weights, no TPU. For each strategy of ``sharding.EIGHT_DEVICE_LAYOUTS`` one step of the SR
model and one of the base model are compiled abstractly on 8 virtual CPU devices and put on the
chip by ``projection.project_step`` (the roofline of ``sharding_strategies.py --project``: XLA's
FLOPs, HBM bytes and per-chip memory of the float32 compile counted in bf16, the HLO's
collectives, attention as a flash-traffic stand-in whose FLOPs are added analytically). The SR
step is ``projection.preset_step``'s: guidance 1 (no CFG, batch 1), the 98-channel input with the
LR condition (``lr_latents``), on the HR canvas the official ``BucketMap`` picks for the base
bucket (from 720p 16:9: 1072x1904, 31x67x119 latents; 1088x1920 is no 1080p bucket). The SR
checkpoints' attention is dense (``attn_mode`` flash), so there is no SSTA row. At batch 1 the
dp=2 meshes have nothing to split: there the SR stage (a separate stage with its own placement)
runs on the strategy's 8-way mesh.

The whole job: base steps x base step (the base preset, 50 steps with CFG, projected here; and
with the seed port's measured 5.81 s/step instead) + SR steps x SR step + the upsampler + the VAE
decode of the HR canvas, against the seed port's 720p-only 50 x 5.81 s. The decode is not
compiled: its FLOPs per 256-pixel tile are counted on torch's meta device (``FlopCounterMode``
over diffusers' decoder at its default config, the released 1.26B-parameter VAE), the tiles go
one per chip per call as ``vae.tile_decoder`` sends them, and each call is timed at the bf16 peak
(a floor) and at the share of peak an H100 reached decoding 720p (GPU_BASELINE.md, whose run
used diffusers' default tiles where the count here uses the official ones: an estimate; the
decoder's convolutions are not measured on a TPU). The upsampler (float32, one chip) is
counted the same way.
"""

from __future__ import annotations

import timing

THREADS = timing.pin_threads(timing.threads_flag())

import argparse  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKLHunyuanVideo15  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import sharding  # noqa: E402
from hunyuan_tpu import parallel, pipeline, projection, super_resolution, upsampler  # noqa: E402
from hunyuan_tpu.config import DiTConfig  # noqa: E402
from hunyuan_tpu.vae import Tiling  # noqa: E402

LAYOUTS = sharding.EIGHT_DEVICE_LAYOUTS
# The seed TPU port's measured step (v6e-8, 720p x 121 frames, dense, CFG; ARCHITECTURE.md).
SEED_S_PER_STEP, SEED_STEPS, SEED_BASE = 5.81, 50, "720p_t2v"
# One H100's tiled 720p x 121 decode (18.3 s, one cold call) and its measured bf16 matmul peak
# (793 TFLOP/s), from GPU_BASELINE.md: the decoder's share of peak, applied to the TPU below.
H100_DECODE_720P_S, H100_PEAK_FLOPS, H100_DECODE_LATENTS = 18.3, 793e12, (31, 45, 80)

Layout = tuple[str, str]


def canvases(sr: str, frames: int, aspect_ratio: str) -> tuple[str, tuple[int, int, int], tuple[int, int, int]]:
    """(base preset, LR latent shape, HR latent shape) of an SR version's job at ``frames``."""
    base_resolution = super_resolution.SR_VERSIONS[sr].base_resolution
    lr = pipeline.latent_shape(frames, *pipeline.bucket_size(base_resolution, aspect_ratio))
    hr = super_resolution.hr_canvas(lr, DiTConfig.preset(sr).ideal_resolution)
    return f"{base_resolution}_t2v", lr, hr


def project_preset(preset: str, shape: tuple[int, int, int], layouts: list[Layout], chip: projection.Chip,
                   args) -> dict[Layout, projection.StepProjection | None]:
    """One step of ``preset`` per layout, each row printed as it comes (None: the layout cannot
    split this step's batch)."""
    cfg, conditions, settings = projection.preset_step(preset, shape, args.text_tokens, args.byt5_tokens)
    batch = 2 if settings.cfg else 1
    print(f"\n{preset}: latents {'x'.join(map(str, shape))} = {math.prod(shape):,} tokens + "
          f"{args.text_tokens + args.byt5_tokens} text slots, {cfg.img_in_channels} input channels, batch {batch} "
          f"({'CFG' if settings.cfg else 'guidance 1, no CFG'}), {settings.num_inference_steps} steps\n")
    print("| strategy | mesh | HBM need GB/chip (weights + other args + temp + out) | fits 32 GB? | TFLOP/chip "
          "(attention) | HBM GB moved/chip | ICI GB sent/chip | compute s | memory s | ICI s | s/step upper "
          "(lower) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    results: dict[Layout, projection.StepProjection | None] = {}
    for name, mesh_spec in layouts:
        try:
            placement = parallel.placement(cfg, name, mesh_spec, batch=batch)
        except ValueError:  # InputError: dp=2 with one sample
            print(f"| {name} | {mesh_spec} | n/a: dp=2 needs 2 samples, this step has {batch} |" + " |" * 8)
            results[(name, mesh_spec)] = None
            continue
        attention = projection.dense_attention_flops(cfg, batch, projection.padded_tokens(shape, placement),
                                                     args.text_tokens, args.byt5_tokens)
        r = projection.project_step(cfg, placement, shape, conditions, settings, chip, attention_flops=attention)
        results[(name, mesh_spec)] = r
        print(f"| {name} | {mesh_spec} | {r.need_bytes / 1e9:.1f} ({r.weights_bytes / 1e9:.1f} + "
              f"{(r.args_bytes - r.weights_bytes) / 1e9:.1f} + {r.temp_bytes / 1e9:.1f} + "
              f"{r.output_bytes / 1e9:.2f}) | "
              f"{'yes' if r.fits(chip) else 'no'} | {r.flops / 1e12:.0f} ({r.attention_flops / 1e12:.0f}) | "
              f"{r.hbm_bytes / 1e9:.0f} | {r.wire_bytes / 1e9:.1f} | {r.roofline.cells()} |", flush=True)
        print(f"<!-- {preset} {name} {mesh_spec}: compiled in {r.compile_s:.0f} s; "
              f"{projection.describe_collectives(r.collectives)} -->", flush=True)
    return results


# ---- the stages around the DiT: counted, not compiled -------------------------------------------

def meta_flops(module: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """FLOPs of ``module`` (built on the meta device) on one input of ``shape``: shapes only, no memory."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(torch.empty(shape, device="meta"))
    return float(counter.get_total_flops())


def tile_counts(shape: tuple[int, int, int], tiling: Tiling = Tiling()) -> collections.Counter:
    """(tile h, w) -> how many tiles of that shape the official tile walk (``vae.tiled``) cuts
    from a (T, H, W) latent canvas."""
    _, h, w = shape
    size, stride = tiling.tile_latent, tiling.stride_latent
    return collections.Counter((min(size, h - i), min(size, w - j))
                               for i in range(0, h, stride) for j in range(0, w, stride))


def decode_flops(decoder: torch.nn.Module, shape: tuple[int, int, int]) -> dict[tuple[int, int], tuple[int, float]]:
    """(tile h, w) -> (tiles, FLOPs of one) of the tiled decode of a (T, H, W) canvas."""
    return {hw: (n, meta_flops(decoder, (1, pipeline.LATENT_CHANNELS, shape[0], *hw)))
            for hw, n in tile_counts(shape).items()}


def decode_seconds(tiles: dict[tuple[int, int], tuple[int, float]], devices: int, peak: float) -> float:
    """Seconds of a tiled decode on ``devices`` at ``peak`` FLOP/s each: each tile shape's tiles
    go one per device per call (``vae.tile_decoder``), so a call lasts one tile."""
    return sum(-(-n // devices) * flops / peak for n, flops in tiles.values())


@dataclasses.dataclass(frozen=True)
class Surroundings:
    """The SR job's work outside the DiT steps, in seconds on the chip."""

    upsampler_tflop: float
    upsampler_s: float  # one chip at the bf16 peak (it runs in float32: a floor)
    decode_tiles: int
    decode_tflop: float
    decode_floor_s: float  # every chip at the bf16 peak
    decode_share: float  # of peak, the H100's 720p decode
    decode_s: float  # at that share

    @classmethod
    def of(cls, sr: str, hr: tuple[int, int, int], chip: projection.Chip, devices: int) -> Surroundings:
        with torch.device("meta"):
            decoder = AutoencoderKLHunyuanVideo15().decoder  # diffusers' default config: the released VAE
            up = upsampler.build(*upsampler.RELEASED_CONFIGS[sr])
        h100 = decode_flops(decoder, H100_DECODE_LATENTS)  # 720p x 121 frames, tiled like the port
        share = decode_seconds(h100, 1, 1.0) / H100_DECODE_720P_S / H100_PEAK_FLOPS
        tiles = decode_flops(decoder, hr)
        floor = decode_seconds(tiles, devices, chip.peak_flops)
        up_flops = meta_flops(up, (1, pipeline.LATENT_CHANNELS, *hr))
        return cls(up_flops / 1e12, up_flops / chip.peak_flops, sum(n for n, _ in tiles.values()),
                   decode_seconds(tiles, 1, 1.0) / 1e12, floor, share, floor / share)


# ---- the whole job -------------------------------------------------------------------------------

def sr_partner(layout: Layout, sr: dict[Layout, projection.StepProjection | None]) -> Layout | None:
    """The SR stage's layout beside a base layout: the same, or where batch 1 cannot use it
    (dp=2) the same strategy's 8-way mesh."""
    if sr.get(layout) is not None:
        return layout
    return next((other for other, r in sr.items() if other[0] == layout[0] and r is not None), None)


def whole_job(args, base_preset: str, base: dict, sr: dict, extra: Surroundings) -> None:
    base_steps = pipeline.SAMPLING_DEFAULTS[base_preset].num_inference_steps
    sr_steps = super_resolution.SR_VERSIONS[args.sr].sampling.num_inference_steps
    seed_job = SEED_STEPS * SEED_S_PER_STEP
    print(f"\nOutside the DiT: upsampler {extra.upsampler_tflop:.1f} TFLOP on one chip, {extra.upsampler_s:.2f} s at "
          f"the bf16 peak (float32 in the port: a floor); VAE decode {extra.decode_tflop:.0f} TFLOP in "
          f"{extra.decode_tiles} tiles, {extra.decode_floor_s:.1f} s on {args.devices} chips at the peak, "
          f"{extra.decode_s:.1f} s at the H100's measured share of peak ({extra.decode_share:.2f}).")
    print(f"\nWhole job: {base_steps} base steps ({base_preset}, CFG) + {sr_steps} SR steps + upsampler + decode. "
          f"Upper: steps at max(compute, memory) + ICI, decode at the H100's share; lower: steps overlapped, decode "
          f"at the peak. The seed port's 720p-only job: {SEED_STEPS} x {SEED_S_PER_STEP} s = {seed_job:.1f} s "
          f"(720p x 121, CFG, measured; no SR, its decode not counted).\n")
    # the seed's figure is a 720p base step: it stands in for the base stage only there
    seeded = base_preset == SEED_BASE
    print(f"| base layout | SR layout | base: {base_steps} steps, s | SR: {sr_steps} steps, s | upsampler + decode s | "
          f"whole job s | / seed 720p-only {seed_job:.1f} s |"
          + (f" whole job with the seed's {SEED_S_PER_STEP} s/step base, s (/ seed) |" if seeded else "")
          + " every stage fits? |")
    print("| --- " * (9 if seeded else 8) + "|")
    chip = projection.CHIPS[args.chip]
    for layout, b in base.items():
        partner = sr_partner(layout, sr)
        if b is None or partner is None:
            continue
        s = sr[partner]
        upper = (base_steps * b.roofline.step_s, sr_steps * s.roofline.step_s, extra.upsampler_s + extra.decode_s)
        lower = (base_steps * b.roofline.overlapped_s, sr_steps * s.roofline.overlapped_s,
                 extra.upsampler_s + extra.decode_floor_s)
        with_seed = (seed_job + upper[1] + upper[2], seed_job + lower[1] + lower[2])
        seed_cell = (f" {with_seed[0]:.0f} / {with_seed[1]:.0f} ({with_seed[0] / seed_job:.2f} / "
                     f"{with_seed[1] / seed_job:.2f}) |") if seeded else ""
        print(f"| {' '.join(layout)} | {' '.join(partner)} | {upper[0]:.0f} / {lower[0]:.0f} | {upper[1]:.1f} / "
              f"{lower[1]:.1f} | {upper[2]:.1f} / {lower[2]:.1f} | {sum(upper):.0f} / {sum(lower):.0f} | "
              f"{sum(upper) / seed_job:.2f} / {sum(lower) / seed_job:.2f} |{seed_cell} "
              f"{'yes' if b.fits(chip) and s.fits(chip) else 'no'} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sr", default="1080p_sr_distilled", choices=[k for k in super_resolution.SR_VERSIONS
                                                                   if not k.startswith("tiny")])
    p.add_argument("--frames", type=int, default=121)
    p.add_argument("--aspect_ratio", default="16:9", help="the base bucket (default: %(default)s)")
    p.add_argument("--hr_latents", type=int, nargs=3, metavar=("T", "H", "W"), help="the SR canvas instead of the "
                   "official bucket's (1080p from 720p 16:9: 31 67 119), e.g. 31 68 120 for 1088x1920")
    p.add_argument("--project", default="v6e-8", metavar="CHIP-N", help="(default: %(default)s)")
    p.add_argument("--text_tokens", type=int, default=256, help="LLM text slots after trimming (default: %(default)s)")
    p.add_argument("--byt5_tokens", type=int, default=64, help="ByT5 slots after trimming (default: %(default)s)")
    p.add_argument("--layout", nargs="+", metavar="STRATEGY:MESH", help="only these, e.g. tp_fc2_replicated:tp=8 "
                   "(default: all of sharding.EIGHT_DEVICE_LAYOUTS)")
    timing.add_flags(p)
    args = p.parse_args()
    args.chip, devices = args.project.split("-")
    args.devices, chip = int(devices), projection.CHIPS[args.chip]
    if args.devices != jax.device_count():
        raise SystemExit(f"--project {args.project} needs {args.devices} devices; set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={args.devices}")
    layouts = [lay for lay in LAYOUTS if args.layout is None or f"{lay[0]}:{lay[1]}" in args.layout]
    base_preset, lr, hr = canvases(args.sr, args.frames, args.aspect_ratio)
    hr = tuple(args.hr_latents) if args.hr_latents else hr
    print(f"{args.sr} after {base_preset}, {args.frames} frames {args.aspect_ratio}: LR latents "
          f"{'x'.join(map(str, lr))}, HR latents {'x'.join(map(str, hr))}; projected on {args.project} "
          f"({chip.name}: {chip.peak_flops / 1e12:.0f} TFLOP/s, {chip.hbm_bytes / 1e9:.0f} GB HBM at "
          f"{chip.hbm_bandwidth / 1e12:.2f} TB/s, {chip.ici_bandwidth / 1e9:.0f} GB/s ICI out per chip); compiled on "
          f"{os.cpu_count()} CPU cores, load average {timing.load():.2f} at the start")
    sr = project_preset(args.sr, hr, layouts, chip, args)
    base = project_preset(base_preset, lr, layouts, chip, args)
    whole_job(args, base_preset, base, sr, Surroundings.of(args.sr, hr, chip, args.devices))
    print(f"\nload average {timing.load():.2f} at the end")


if __name__ == "__main__":
    main()
