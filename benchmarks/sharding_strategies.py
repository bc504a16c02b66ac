"""Sharding strategies side by side: time, collectives and per-device memory of one denoising step.

    python benchmarks/sharding_strategies.py                 # measured on 8 virtual CPU devices
    python benchmarks/sharding_strategies.py --project v6e-8 --preset 720p_t2v --frames 121
    python benchmarks/sharding_strategies.py --project v6e-8 --preset 1080p_sr_distilled --frames 121
    python benchmarks/sharding_strategies.py --coverage      # each table's rules over the parameters

The first mode runs a small model on this machine's CPU split into 8 devices (so absolute
times mean little; the collectives and memory are what each strategy implies). The second
lowers the full-size model with abstract shapes (no weights are made), reads FLOPs, HBM bytes,
collectives and per-chip memory from the compiled step, and projects a step time on the chip:

    t = max(FLOPs / peak, HBM bytes / HBM bandwidth) + ICI bytes sent / ICI bandwidth

per chip, collectives not overlapped with compute (an upper estimate; the fully overlapped
lower estimate max(...) of the three is printed too). Attention is compiled as a stand-in
with a flash kernel's HBM traffic and its FLOPs, 4 B N (L+S)^2 D per block, added
analytically. The compile is ``projection.project_step``, which says why it runs in float32
and counts bf16. A step samples as ``projection.preset_step`` says: CFG (batch 2) for the base
presets, the preset's own sampling for super-resolution (guidance 1: batch 1, where the dp=2
layouts have nothing to split), with the LR condition in its 98-channel input.
"""

from __future__ import annotations

import timing

THREADS = timing.pin_threads(timing.threads_flag())

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import torch  # noqa: E402

import sharding  # noqa: E402
from hunyuan_tpu import parallel, pipeline, projection  # noqa: E402
from hunyuan_tpu.config import DiTConfig, widened_tiny  # noqa: E402
from hunyuan_tpu.params import random_params  # noqa: E402
from hunyuan_tpu.synthetic import full_text_conditions  # noqa: E402

LAYOUTS = sharding.EIGHT_DEVICE_LAYOUTS


def layout(cfg: DiTConfig, name: str, mesh_spec: str) -> parallel.Placement:
    return parallel.placement(cfg, name, mesh_spec, batch=2)


def measure_cpu(args) -> None:
    cfg = widened_tiny(args.hidden, args.depth)
    shape = pipeline.latent_shape(args.frames, args.height, args.width)
    conditions = full_text_conditions(cfg, shape, 32, 16)
    settings = pipeline.SamplingSettings(num_inference_steps=args.steps + 1, guidance_scale=6.0)
    print(f"{args.depth} blocks, hidden {args.hidden}, float32; latents {shape} = {math.prod(shape)} tokens + 48 "
          f"text, CFG 2; {jax.device_count()} virtual devices on {os.cpu_count()} CPU cores "
          f"({platform.machine()}); {args.steps} steps per layout after 1, the layouts in turns")
    print(timing.budget_line(THREADS))
    print(timing.check_quiet(args.allow_busy) + "\n")
    built, steps = {}, {}
    for name, mesh_spec in LAYOUTS:
        placement = layout(cfg, name, mesh_spec)
        params = random_params(cfg, torch.float32, seed=0, shardings=placement.params)
        denoiser = pipeline.Denoiser(cfg, params, conditions, settings, placement=placement)
        denoiser.compile((1, 32, *shape))
        run = {"x": denoiser.place(pipeline.initial_noise(0, shape)), "i": 0}

        def step(denoiser=denoiser, run=run):
            run["x"], _ = denoiser.step(run["x"], run["i"] % settings.num_inference_steps)
            run["x"].block_until_ready()
            run["i"] += 1

        built[(name, mesh_spec)], steps[(name, mesh_spec)] = denoiser, step
    times = timing.round_robin(steps, args.steps, warmup=1)
    print("| strategy | mesh | min s/step | median s/step | collectives per step (count, result size) | "
          "wire MiB/device | args MiB/device | temp MiB/device |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, mesh_spec), denoiser in built.items():
        memory = denoiser.compiled.memory_analysis()
        kinds, wire = projection.collective_summary(denoiser.compiled)
        collectives = projection.describe_collectives(kinds)
        fastest, median = timing.min_median(times[(name, mesh_spec)])
        print(f"| {name} | {mesh_spec} | {fastest:.3f} | {median:.3f} | {collectives} | "
              f"{wire / 2**20:.2f} | {memory.argument_size_in_bytes / 2**20:.1f} | "
              f"{memory.temp_size_in_bytes / 2**20:.1f} |")
    print(f"\nload average {timing.load():.2f} at the end")


def project(args) -> None:
    chip = projection.CHIPS[args.project.split("-")[0]]
    devices = int(args.project.split("-")[1])
    if devices != jax.device_count():
        raise SystemExit(f"--project {args.project} needs {devices} devices; set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}")
    cfg = DiTConfig.preset(args.preset)
    height, width = pipeline.bucket_size(args.resolution or cfg.ideal_resolution, args.aspect_ratio)
    shape = pipeline.latent_shape(args.frames, height, width)
    cfg, conditions, settings = projection.preset_step(args.preset, shape, args.text_tokens, args.byt5_tokens)
    batch = 2 if settings.cfg else 1
    text = args.text_tokens + args.byt5_tokens
    what = "CFG batch 2" if settings.cfg else "no CFG (guidance 1): batch 1"
    if cfg.super_resolution:
        what += f", {cfg.img_in_channels} input channels (the LR condition included)"
    print(f"{args.preset} ({cfg.mm_double_blocks_depth} blocks, bf16) at {args.frames} frames {width}x{height}: "
          f"latents {shape} = {math.prod(shape)} tokens + {text} text slots, {what}; projected on "
          f"{args.project} ({chip.name}: {chip.peak_flops / 1e12:.0f} TFLOP/s, {chip.hbm_bytes / 1e9:.0f} GB HBM at "
          f"{chip.hbm_bandwidth / 1e12:.2f} TB/s, {chip.ici_bandwidth / 1e9:.0f} GB/s ICI out per chip)\n")
    print("| strategy | mesh | HBM need GB/chip (args + temp + out) | TFLOP/chip | HBM GB moved/chip | "
          "ICI GB sent/chip | collectives | compute s | memory s | ICI s | step s (overlapped) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, mesh_spec in LAYOUTS:
        try:
            placement = parallel.placement(cfg, name, mesh_spec, batch=batch)
        except ValueError:  # InputError: dp=2 with one sample
            print(f"| {name} | {mesh_spec} | n/a: dp=2 needs 2 samples, this step has {batch} |" + " |" * 8, flush=True)
            continue
        attention = projection.dense_attention_flops(cfg, batch, projection.padded_tokens(shape, placement),
                                                     args.text_tokens, args.byt5_tokens)
        r = projection.project_step(cfg, placement, shape, conditions, settings, chip, attention_flops=attention)
        fits = "" if r.fits(chip) else ": does not fit"
        print(f"| {name} | {mesh_spec} | {r.need_bytes / 1e9:.1f} ({r.args_bytes / 1e9:.1f} + "
              f"{r.temp_bytes / 1e9:.1f} + {r.output_bytes / 1e9:.2f}){fits} | "
              f"{r.flops / 1e12:.0f} | {r.hbm_bytes / 1e9:.0f} | {r.wire_bytes / 1e9:.1f} | "
              f"{projection.describe_collectives(r.collectives)} | {r.roofline.cells()} |", flush=True)
        print(f"<!-- {name} {mesh_spec}: compiled in {r.compile_s:.0f} s; non-attention {r.compiled_flops / 1e12:.1f} "
              f"TFLOP, attention {r.attention_flops / 1e12:.1f} TFLOP per chip -->", flush=True)


def report_coverage(args) -> None:
    """Per strategy: the rules of its table that match no parameter, and what it leaves whole."""
    shapes = parallel.param_shapes(DiTConfig.preset(args.preset))
    print(f"{args.preset}: {len(shapes)} parameters, {sum(math.prod(s) for s in shapes.values()):,} values\n")
    print("| strategy | rules | rules matching nothing | parameters left whole | their values |")
    print("| --- | --- | --- | --- | --- |")
    for strategy in sharding.STRATEGIES.values():
        cover = parallel.coverage(strategy, shapes)
        whole = sum(math.prod(s) for name, s in shapes.items()
                    if all(a is None for a in parallel.param_spec(strategy, name)))
        print(f"| {strategy.name} | {len(strategy.params)} | {', '.join(cover.unmatched_rules) or 'none'} | "
              f"{cover.whole} of {cover.total} | {whole:,} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4, help="CPU mode: double blocks (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=256, help="CPU mode: hidden size, 8 heads (default: %(default)s)")
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--height", type=int, default=128, help="CPU mode (default: %(default)s)")
    p.add_argument("--width", type=int, default=128, help="CPU mode (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="CPU mode: timed steps (default: %(default)s)")
    p.add_argument("--project", metavar="CHIP-N", help="project onto N chips, e.g. v6e-8")
    p.add_argument("--preset", default="720p_t2v", help="projection: model preset (default: %(default)s)")
    p.add_argument("--resolution", help="projection: bucket family, e.g. 1080p (default: the preset's)")
    p.add_argument("--aspect_ratio", default="16:9", help="projection: bucket (default: %(default)s)")
    p.add_argument("--text_tokens", type=int, default=256, help="projection: LLM text slots after trimming")
    p.add_argument("--byt5_tokens", type=int, default=64, help="projection: ByT5 slots after trimming")
    p.add_argument("--coverage", action="store_true", help="report each strategy's table over the --preset's "
                   "parameters: rules that match nothing, parameters left whole")
    timing.add_flags(p)
    args = p.parse_args()
    if args.coverage:
        report_coverage(args)
    else:
        project(args) if args.project else measure_cpu(args)


if __name__ == "__main__":
    main()
