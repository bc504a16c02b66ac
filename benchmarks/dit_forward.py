"""One DiT forward at t=999: torchax + jax.jit against eager PyTorch (diffusers), same weights.

    python benchmarks/dit_forward.py --preset tiny --frames 9 33 --height 128 --width 128
    python benchmarks/dit_forward.py --preset 480p_t2v --frames 121 --dtype bfloat16 --runs 3   # on a GPU

Builds diffusers' HunyuanVideo15Transformer3DModel with trained-scale random weights, converts
them with the project's name mapping for the JAX path, feeds both random inputs (t2v, padded
text) and times --runs forwards after --warmup untimed ones. Peak memory: the device
allocator's peak on a GPU; on a CPU the process's peak resident memory (VmHWM), reset before
each path. Achieved TFLOP/s = hunyuan_tpu.projection.dit_forward_flops / mean time.
"""

from __future__ import annotations

import os

# torch and JAX share the GPU here: JAX must not take 75% of it up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from hunyuan_tpu import attention, pipeline  # noqa: E402
from hunyuan_tpu.config import DiTConfig  # noqa: E402
from hunyuan_tpu.metrics import rel_l2  # noqa: E402
from hunyuan_tpu.naming import diffusers_to_official  # noqa: E402
from hunyuan_tpu.params import meta_model  # noqa: E402
from hunyuan_tpu.projection import dit_forward_flops  # noqa: E402
from hunyuan_tpu.random_init import randomize_like_trained_  # noqa: E402
from hunyuan_tpu.runtime import device_array, functional, jax_dtype, tracing  # noqa: E402
from hunyuan_tpu.synthetic import random_inputs  # noqa: E402

_STATUS = Path("/proc/self/status")


def reset_host_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def host_peak_bytes() -> float | None:
    try:
        line = next(line for line in _STATUS.read_text().splitlines() if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return float(line.split()[1]) * 1024


def diffusers_model(cfg: DiTConfig, dtype: torch.dtype, device: str):
    from diffusers import HunyuanVideo15Transformer3DModel

    model = HunyuanVideo15Transformer3DModel(
        in_channels=cfg.img_in_channels, out_channels=cfg.out_channels, num_attention_heads=cfg.heads_num,
        attention_head_dim=cfg.head_dim, num_layers=cfg.mm_double_blocks_depth, num_refiner_layers=cfg.refiner_depth,
        mlp_ratio=cfg.mlp_width_ratio, patch_size=cfg.patch_size[1], patch_size_t=cfg.patch_size[0],
        text_embed_dim=cfg.text_states_dim, text_embed_2_dim=cfg.byt5_states_dim,
        image_embed_dim=cfg.vision_states_dim, rope_theta=cfg.rope_theta, rope_axes_dim=cfg.rope_dim_list,
        use_meanflow=cfg.use_meanflow,
    ).eval()
    return randomize_like_trained_(model, seed=0).to(device=device, dtype=dtype)


def timed(fn, runs: int, warmup: int, sync) -> list[float]:
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - begin)
    return times


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--frames", type=int, nargs="+", default=[9, 33], help="video frames, 4k+1 each")
    p.add_argument("--height", type=int, help="pixels (default: the preset's 16:9 bucket; 64 for tiny)")
    p.add_argument("--width", type=int, help="pixels (default: the preset's 16:9 bucket; 112 for tiny)")
    p.add_argument("--cfg", choices=["on", "off"], default="off", help="batch of 2 (CFG pair) or 1")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--attention", choices=attention.BACKENDS, default="auto", help="JAX kernel (default: by platform)")
    p.add_argument("--text_tokens", type=int, default=1000, help="LLM slots (default: %(default)s)")
    p.add_argument("--valid_text", type=int, default=120, help="valid LLM tokens of them (default: %(default)s)")
    p.add_argument("--byt5_tokens", type=int, default=256)
    p.add_argument("--skip_torch", action="store_true", help="time only the JAX path")
    return p.parse_args()


def time_jax(apply, params, inputs: dict, dtype: torch.dtype, kernel, args) -> tuple[list[float], float, float, object]:
    """(times, peak bytes, compile seconds, output) of the jitted forward."""
    jax_inputs = {k: device_array(v.to(dtype) if v.is_floating_point() and k != "t" else v) for k, v in inputs.items()}
    reset_host_peak()
    begin = time.perf_counter()
    with tracing(attention=kernel):
        compiled = apply.lower(params, **jax_inputs).compile()
    compile_s = time.perf_counter() - begin
    out = []
    times = timed(lambda: out.append(compiled(params, **jax_inputs)) or out[-1], args.runs, args.warmup,
                  jax.block_until_ready)
    stats = jax.devices()[0].memory_stats() or {}
    return times, stats.get("peak_bytes_in_use") or host_peak_bytes(), compile_s, out[-1]


def time_torch(reference, cfg: DiTConfig, inputs: dict, dtype: torch.dtype, batch: int, args
               ) -> tuple[list[float], float, torch.Tensor]:
    """(times, peak bytes, output) of diffusers' eager forward."""
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    x = {k: (v.to(dtype) if v.is_floating_point() and k != "t" else v).to(device) for k, v in inputs.items()}
    vision = torch.zeros(batch, 16, cfg.vision_states_dim, dtype=dtype, device=device)  # t2v: all zero
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    reset_host_peak()
    out = []

    @torch.no_grad()
    def run():
        out.append(reference(x["x"], x["t"], x["text_states"], x["text_mask"], encoder_hidden_states_2=x["byt5_states"],
                             encoder_attention_mask_2=x["byt5_mask"], image_embeds=vision, return_dict=False)[0])
        return out[-1]

    times = timed(run, args.runs, args.warmup, lambda _: torch.cuda.synchronize() if gpu else None)
    return times, torch.cuda.max_memory_allocated() if gpu else host_peak_bytes(), out[-1]


def main() -> None:
    args = parse_args()
    cfg = DiTConfig.preset(args.preset)
    if cfg.byt5_hidden_dim != 2048:  # diffusers fixes the ByT5 projection's inner width at 2048
        cfg = dataclasses.replace(cfg, byt5_hidden_dim=2048)
    if args.preset == "tiny":
        height, width = args.height or 64, args.width or 112
    else:
        bucket = pipeline.bucket_size(cfg.ideal_resolution, "16:9")
        height, width = args.height or bucket[0], args.width or bucket[1]
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = 2 if args.cfg == "on" else 1
    kernel = attention.kernel(args.attention, dtype=jax_dtype(dtype))
    print(f"{args.preset}: {sum(1 for _ in meta_model(cfg).parameters())} tensors, {args.dtype}, batch {batch}, "
          f"t=999, {args.valid_text} of {args.text_tokens} LLM slots valid, {args.byt5_tokens} ByT5 slots; "
          f"torch {torch.__version__} on {device}, jax {jax.__version__} on {jax.devices()[0].device_kind} "
          f"({platform.machine()}), attention {args.attention}\n")
    reference = diffusers_model(cfg, dtype, device)
    params = {k: device_array(v.to("cpu")) for k, v in diffusers_to_official(reference.state_dict()).items()}
    if args.skip_torch:
        del reference
    apply = jax.jit(functional(meta_model(cfg)))

    print("| frames | latents (tokens) | path | mean s | min s | max s | peak GiB | TFLOP/s | JAX speedup |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for frames in args.frames:
        shape = pipeline.latent_shape(frames, height, width)
        inputs = random_inputs(cfg, batch=batch, latent=shape, text_len=args.text_tokens, byt5_len=args.byt5_tokens)
        inputs["t"][:] = 999.0
        inputs["text_mask"][:] = 0
        inputs["text_mask"][:, : args.valid_text] = 1
        flops = dit_forward_flops(cfg, batch, int(np.prod(shape)), args.text_tokens, args.byt5_tokens)
        times, peak, compile_s, out_jax = time_jax(apply, params, inputs, dtype, kernel, args)
        rows = {"torchax jit": (times, peak)}
        if not args.skip_torch:
            times, peak, out_torch = time_torch(reference, cfg, inputs, dtype, batch, args)
            rows["eager torch (diffusers)"] = (times, peak)
            error = rel_l2(np.asarray(out_jax.astype(np.float32)), out_torch.float().cpu())
        jax_mean = statistics.mean(rows["torchax jit"][0])
        for name, (times, peak) in rows.items():
            mean = statistics.mean(times)
            speedup = f"{mean / jax_mean:.2f}x" if name != "torchax jit" else "-"
            print(f"| {frames} | {shape} ({int(np.prod(shape))}) | {name} | {mean:.3f} | {min(times):.3f} | "
                  f"{max(times):.3f} | {peak / 2**30 if peak else float('nan'):.2f} | {flops / mean / 1e12:.3f} | "
                  f"{speedup} |", flush=True)
        note = f"; JAX vs torch output rel L2 {error:.1e}" if not args.skip_torch else ""
        print(f"<!-- {frames} frames: {flops / 1e12:.3f} TFLOP per forward; JAX compile {compile_s:.1f} s{note} -->")


if __name__ == "__main__":
    main()
