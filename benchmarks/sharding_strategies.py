"""Sharding strategies side by side: time, collectives and per-device memory of one denoising step.

    python benchmarks/sharding_strategies.py                 # measured on 8 virtual CPU devices
    python benchmarks/sharding_strategies.py --project v6e-8 --preset 720p_t2v --frames 121
    python benchmarks/sharding_strategies.py --coverage      # each table's rules over the parameters

The first mode runs a small model on this machine's CPU split into 8 devices (so absolute
times mean little; the collectives and memory are what each strategy implies). The second
lowers the full-size model with abstract shapes (no weights are made), reads FLOPs, HBM bytes,
collectives and per-chip memory from the compiled step, and projects a step time on the chip:

    t = max(FLOPs / peak, HBM bytes / HBM bandwidth) + ICI bytes sent / ICI bandwidth

per chip, collectives not overlapped with compute (an upper estimate; the fully overlapped
lower estimate max(...) of the three is printed too). Attention is compiled as a stand-in
with a flash kernel's HBM traffic and its FLOPs, 4 B N (L+S)^2 D per block, added
analytically (see hunyuan_tpu/projection.py for why).

The projection is compiled in float32: XLA's CPU backend has no bf16 matmul and would insert
float32 copies of every weight (temporaries a TPU never makes). Weights are counted at their
bf16 size exactly (from the sharding tables); activation memory, HBM traffic and collective
bytes are the float32 figures halved, as the chip holds them in bf16 (the few float32
pieces, norm statistics, RoPE tables and the latents, are small).
"""

from __future__ import annotations

import timing

THREADS = timing.pin_threads(timing.threads_flag())

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import sharding  # noqa: E402
from hunyuan_tpu import hlo, parallel, pipeline, projection  # noqa: E402
from hunyuan_tpu.config import DiTConfig, widened_tiny  # noqa: E402
from hunyuan_tpu.model import loop_blocks  # noqa: E402
from hunyuan_tpu.params import random_params  # noqa: E402
from hunyuan_tpu.runtime import jax_dtype, tracing  # noqa: E402
from hunyuan_tpu.synthetic import full_text_conditions  # noqa: E402

LAYOUTS = sharding.EIGHT_DEVICE_LAYOUTS


def layout(cfg: DiTConfig, name: str, mesh_spec: str) -> parallel.Placement:
    return parallel.placement(cfg, name, mesh_spec, batch=2)


def collective_line(compiled, scale: float = 1.0) -> tuple[str, float]:
    """('kind count (result MiB), ...', bytes one device sends), sizes multiplied by ``scale``."""
    ops = hlo.collectives(compiled.as_text())
    parts = [f"{kind} {count} ({scale * nbytes / 2**20:.1f} MiB)"
             for kind, (count, nbytes) in hlo.summary(ops).items() if count]
    return ", ".join(parts) or "none", scale * sum(op.wire_bytes for op in ops)


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
        collectives, wire = collective_line(denoiser.compiled)
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
    height, width = pipeline.bucket_size(cfg.ideal_resolution, args.aspect_ratio)
    shape = pipeline.latent_shape(args.frames, height, width)
    conditions = full_text_conditions(cfg, shape, args.text_tokens, args.byt5_tokens)
    settings = pipeline.SamplingSettings(num_inference_steps=50, guidance_scale=6.0)
    dtype = jax_dtype(torch.float32)  # see the module docstring: halved to bf16 below
    host = pipeline.device_conditions(conditions, settings, dtype)
    text = args.text_tokens + args.byt5_tokens
    print(f"{args.preset} ({cfg.mm_double_blocks_depth} blocks, bf16) at {args.frames} frames {width}x{height}: "
          f"latents {shape} = {math.prod(shape)} tokens + {text} text slots, CFG batch 2; projected on "
          f"{args.project} ({chip.name}: {chip.peak_flops / 1e12:.0f} TFLOP/s, {chip.hbm_bytes / 1e9:.0f} GB HBM at "
          f"{chip.hbm_bandwidth / 1e12:.2f} TB/s, {chip.ici_bandwidth / 1e9:.0f} GB/s ICI out per chip)\n")
    print("| strategy | mesh | HBM need GB/chip (args + temp + out) | TFLOP/chip | HBM GB moved/chip | "
          "ICI GB sent/chip | collectives | compute s | memory s | ICI s | step s (overlapped) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, mesh_spec in LAYOUTS:
        placement = layout(cfg, name, mesh_spec)
        mesh, shardings = placement.mesh, placement.params
        shapes = parallel.param_shapes(cfg)
        abstract_params = {k: jax.ShapeDtypeStruct(s, dtype, sharding=shardings[k]) for k, s in shapes.items()}
        replicated = placement.replicated
        abstract_conditions = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=replicated)
                               for k, v in host.items()}
        latents = jax.ShapeDtypeStruct((1, 32, *shape), jnp.float32, sharding=replicated)
        begin = time.perf_counter()
        # the blocks unrolled (and the weights per layer): XLA's cost analysis, read below,
        # counts a loop body once, so the scanned step would show one block's FLOPs and bytes
        with tracing(mesh, projection.attention_stand_in):
            compiled = pipeline.step_function(cfg, settings, dtype, placement=placement, run_blocks=loop_blocks).lower(
                abstract_params, abstract_conditions, latents, 0).compile()
        compile_s = time.perf_counter() - begin
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        memory = compiled.memory_analysis()
        weights = sum(2 * math.prod(shardings[k].shard_shape(s)) for k, s in shapes.items())  # bf16
        other_args = memory.argument_size_in_bytes - 2 * weights  # conditions, latents (float32 here)
        temp = memory.temp_size_in_bytes / 2
        args_bytes = weights + other_args / 2
        need = args_bytes + temp + memory.output_size_in_bytes
        hbm_moved = cost["bytes accessed"] / 2
        # attention is split by batch over dp and by heads over every other axis: over all chips
        split = mesh.size
        tokens = math.prod(shape) + -math.prod(shape) % placement.execution.token_multiple
        attention = (cfg.mm_double_blocks_depth * projection.attention_flops(2, cfg.heads_num, tokens + text,
                                                                             tokens + text, cfg.head_dim)
                     + cfg.refiner_depth * projection.attention_flops(2, cfg.heads_num, args.text_tokens,
                                                                      args.text_tokens, cfg.head_dim)) / split
        flops = cost["flops"] + attention
        collectives, wire = collective_line(compiled, scale=0.5)
        r = projection.roofline(flops, hbm_moved, wire, chip)
        print(f"| {name} | {mesh_spec} | {need / 1e9:.1f} ({args_bytes / 1e9:.1f} + "
              f"{temp / 1e9:.1f} + {memory.output_size_in_bytes / 1e9:.2f}) | "
              f"{flops / 1e12:.0f} | {hbm_moved / 1e9:.0f} | {wire / 1e9:.1f} | {collectives} | "
              f"{r.compute_s:.2f} | {r.memory_s:.2f} | {r.comm_s:.2f} | {r.step_s:.2f} ({r.overlapped_s:.2f}) |",
              flush=True)
        print(f"<!-- {name} {mesh_spec}: compiled in {compile_s:.0f} s; non-attention {cost['flops'] / 1e12:.1f} "
              f"TFLOP, attention {attention / 1e12:.1f} TFLOP per chip -->", flush=True)


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
