"""Trace time, compile time and program size of the full denoising step: unrolled blocks vs one scan.

    python benchmarks/compile_size.py                          # 720p_t2v, 121 frames, 54 blocks
    python benchmarks/compile_size.py --depth 4 8 16           # the same model cut to fewer blocks

Compiles the step (CFG batch of 2, DiT forward, guidance, Euler update) of the full-size model
abstractly on this CPU: no weights, ``jax.ShapeDtypeStruct`` parameters in float32 (XLA's CPU
backend has no bf16 matmul), attention as ``projection.attention_stand_in`` (so the program is
the model's, without the score matrix), (a) on one device without a mesh and (b) on 8 virtual
devices laid out by ``tp_fc2_replicated`` at ``tp=8``. Each with the Python-loop runner
(``model.loop_blocks``: a copy of the block per layer, per-layer weights, the code before the
scan) and the scanned runner (``scan.scanned_blocks``: one loop over weights stacked by layer).

Columns: lowering = tracing to StableHLO (s); compile = XLA (s); StableHLO = characters of
``lowered.as_text()``; HLO = characters of the optimized module's text and its instruction
count; matmul TFLOP = the compiled program's dot FLOPs with every loop iteration counted
(``hlo.dot_flops``; both runners should do the same work); args / temp GB = XLA's memory
analysis per device, float32 (the same weights either way; temp shows that the scan copies
no weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import re
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hunyuan_tpu import hlo, parallel, pipeline, projection  # noqa: E402
from hunyuan_tpu.config import DiTConfig  # noqa: E402
from hunyuan_tpu.model import loop_blocks  # noqa: E402
from hunyuan_tpu.runtime import tracing  # noqa: E402
from hunyuan_tpu.scan import scanned_blocks, stacked_abstract  # noqa: E402
from hunyuan_tpu.synthetic import full_text_conditions  # noqa: E402

LAYOUTS = {"one device": None, "tp_fc2_replicated tp=8": ("tp_fc2_replicated", "tp=8")}
RUNNERS = {"loop": loop_blocks, "scan": scanned_blocks}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=", re.M)


@dataclasses.dataclass(frozen=True)
class Measure:
    lower_s: float
    compile_s: float
    stablehlo_chars: int
    hlo_chars: int
    hlo_instructions: int
    matmul_tflop: float
    args_gb: float
    temp_gb: float


def abstract_step_inputs(cfg: DiTConfig, layout, runner, shape, host: dict[str, np.ndarray]):
    """(placement, params, conditions, latents) as shapes: per-layer weights for the loop,
    stacked by layer for the scan, placed by the strategy's tables on a mesh."""
    placement = parallel.Placement() if layout is None else parallel.placement(cfg, *layout, batch=2)
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=placement.param(k))
              for k, s in parallel.param_shapes(cfg).items()}
    if runner is scanned_blocks:
        params = stacked_abstract(params)
    conditions = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=placement.replicated)
                  for k, v in host.items()}
    latents = jax.ShapeDtypeStruct((1, 32, *shape), jnp.float32, sharding=placement.replicated)
    return placement, params, conditions, latents


def measure(cfg: DiTConfig, layout, runner, shape, host, settings) -> Measure:
    placement, params, conditions, latents = abstract_step_inputs(cfg, layout, runner, shape, host)
    step = pipeline.step_function(cfg, settings, jnp.float32, placement=placement, run_blocks=runner)
    with tracing(placement.mesh, projection.attention_stand_in):
        begin = time.perf_counter()
        lowered = step.lower(params, conditions, latents, 0)
        lower_s = time.perf_counter() - begin
        begin = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - begin
    text, memory = compiled.as_text(), compiled.memory_analysis()
    return Measure(lower_s, compile_s, len(lowered.as_text()), len(text), len(_INSTRUCTION.findall(text)),
                   hlo.dot_flops(text) / 1e12, memory.argument_size_in_bytes / 1e9, memory.temp_size_in_bytes / 1e9)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="720p_t2v", help="model preset (default: %(default)s)")
    p.add_argument("--frames", type=int, default=121)
    p.add_argument("--aspect_ratio", default="16:9")
    p.add_argument("--depth", type=int, nargs="+", help="double blocks (default: the preset's)")
    p.add_argument("--runner", choices=list(RUNNERS), nargs="+", default=list(RUNNERS))
    p.add_argument("--layout", choices=list(LAYOUTS), nargs="+", default=list(LAYOUTS))
    p.add_argument("--text_tokens", type=int, default=256, help="LLM text slots after trimming")
    p.add_argument("--byt5_tokens", type=int, default=64, help="ByT5 slots after trimming")
    args = p.parse_args()

    preset = DiTConfig.preset(args.preset)
    height, width = pipeline.bucket_size(preset.ideal_resolution, args.aspect_ratio)
    shape = pipeline.latent_shape(args.frames, height, width)
    settings = pipeline.SamplingSettings(num_inference_steps=50, guidance_scale=6.0)
    host = pipeline.device_conditions(full_text_conditions(preset, shape, args.text_tokens, args.byt5_tokens),
                                      settings, jnp.float32)
    print(f"{args.preset} at {args.frames} frames {width}x{height}: latents {shape} = {math.prod(shape)} tokens + "
          f"{args.text_tokens + args.byt5_tokens} text slots, CFG batch 2, float32, attention stand-in; "
          f"{jax.device_count()} virtual CPU devices on {os.cpu_count()} cores ({platform.machine()}), "
          f"jax {jax.__version__}; load average {_load()} at the start\n")
    print("| layout | blocks | runner | lowering s | compile s | StableHLO chars | HLO chars | HLO instructions | "
          "matmul TFLOP | args GB | temp GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for layout_name in args.layout:
        for depth in args.depth or [preset.mm_double_blocks_depth]:
            cfg = dataclasses.replace(preset, mm_double_blocks_depth=depth)
            for runner_name in args.runner:
                m = measure(cfg, LAYOUTS[layout_name], RUNNERS[runner_name], shape, host, settings)
                print(f"| {layout_name} | {depth} | {runner_name} | {m.lower_s:.1f} | {m.compile_s:.1f} | "
                      f"{m.stablehlo_chars:,} | {m.hlo_chars:,} | {m.hlo_instructions:,} | {m.matmul_tflop:.1f} | "
                      f"{m.args_gb:.1f} | {m.temp_gb:.1f} |", flush=True)
    print(f"\nload average {_load()} at the end (both runners alternate within one process, one XLA compile at a time)")


if __name__ == "__main__":
    main()
