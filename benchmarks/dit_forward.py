"""One DiT forward at t=999: torchax + jax.jit against eager PyTorch (diffusers), same weights.

    python benchmarks/dit_forward.py --preset tiny --frames 9 33 --height 128 --width 128
    python benchmarks/dit_forward.py --preset 480p_t2v --frames 121 --dtype bfloat16 --runs 3   # on a GPU

Builds diffusers' HunyuanVideo15Transformer3DModel with trained-scale random weights, converts
them with the project's name mapping for the JAX path, feeds both random inputs (t2v, padded
text) and times --runs forwards of each after --warmup untimed ones, the two paths taking turns
(``timing.round_robin``) on one thread budget (--threads), min and median reported; a busy
machine stops the run (``--allow_busy`` marks it instead). Peak memory: the device allocator's
peak on a GPU; on a CPU the process's peak resident memory (VmHWM) over one call, reset before
each path. Achieved TFLOP/s = hunyuan_tpu.projection.dit_forward_flops / median time.
"""

from __future__ import annotations

import os

import timing

# torch and JAX share the GPU here: JAX must not take 75% of it up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
THREADS = timing.pin_threads(timing.threads_flag())

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from hunyuan_tpu import attention, pipeline  # noqa: E402
from hunyuan_tpu.config import DiTConfig, widened_tiny  # noqa: E402
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


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--hidden", type=int,
                   help="tiny widened to this hidden size, 8 heads (hunyuan_tpu.config.widened_tiny)")
    p.add_argument("--depth", type=int, help="tiny with this many double blocks (with --hidden)")
    p.add_argument("--frames", type=int, nargs="+", default=[9, 33], help="video frames, 4k+1 each")
    p.add_argument("--height", type=int, help="pixels (default: the preset's 16:9 bucket; 64 for tiny)")
    p.add_argument("--width", type=int, help="pixels (default: the preset's 16:9 bucket; 112 for tiny)")
    p.add_argument("--cfg", choices=["on", "off"], default="off", help="batch of 2 (CFG pair) or 1")
    p.add_argument("--runs", type=int, default=5, help="timed runs per path, in turns (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--attention", choices=attention.BACKENDS, default="auto", help="JAX kernel (default: by platform)")
    p.add_argument("--text_tokens", type=int, default=1000, help="LLM slots stage 1 writes (default: %(default)s)")
    p.add_argument("--valid_text", type=int, default=120, help="valid LLM tokens of them (default: %(default)s)")
    p.add_argument("--byt5_tokens", type=int, default=256, help="ByT5 slots stage 1 writes (default: %(default)s)")
    p.add_argument("--valid_byt5", type=int, default=20, help="valid ByT5 tokens of them (default: %(default)s)")
    p.add_argument("--untrimmed", action="store_true",
                   help="feed every slot stage 1 writes (default: only the valid ones, as stage 2's step does: it "
                   "drops trailing slots that are padding in every sample)")
    p.add_argument("--skip_torch", action="store_true", help="time only the JAX path")
    timing.add_flags(p)
    return p.parse_args()


def jax_path(apply, params, inputs: dict, dtype: torch.dtype, kernel) -> tuple[Callable, float, float]:
    """(one jitted forward, waited for; its compile seconds; the host peak bytes of one call)."""
    jax_inputs = {k: device_array(v.to(dtype) if v.is_floating_point() and k != "t" else v) for k, v in inputs.items()}
    begin = time.perf_counter()
    with tracing(attention=kernel):
        compiled = apply.lower(params, **jax_inputs).compile()
    compile_s = time.perf_counter() - begin

    def run():
        return jax.block_until_ready(compiled(params, **jax_inputs))

    reset_host_peak()
    run()
    stats = jax.devices()[0].memory_stats() or {}
    return run, compile_s, stats.get("peak_bytes_in_use") or host_peak_bytes()


def torch_path(reference, cfg: DiTConfig, inputs: dict, dtype: torch.dtype, batch: int) -> tuple[Callable, float]:
    """(one eager diffusers forward, synchronised; the peak bytes of one call)."""
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    x = {k: (v.to(dtype) if v.is_floating_point() and k != "t" else v).to(device) for k, v in inputs.items()}
    vision = torch.zeros(batch, 16, cfg.vision_states_dim, dtype=dtype, device=device)  # t2v: all zero

    @torch.no_grad()
    def run():
        out = reference(x["x"], x["t"], x["text_states"], x["text_mask"], encoder_hidden_states_2=x["byt5_states"],
                        encoder_attention_mask_2=x["byt5_mask"], image_embeds=vision, return_dict=False)[0]
        if gpu:
            torch.cuda.synchronize()
        return out

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    reset_host_peak()
    run()
    return run, torch.cuda.max_memory_allocated() if gpu else host_peak_bytes()


def main() -> None:
    args = parse_args()
    cfg = DiTConfig.preset(args.preset)
    if args.hidden or args.depth:
        if args.preset != "tiny":
            raise SystemExit("--hidden/--depth widen the tiny preset only")
        cfg = widened_tiny(args.hidden or cfg.hidden_size, args.depth or cfg.mm_double_blocks_depth)
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
    name = args.preset
    if args.hidden or args.depth:
        name = f"tiny widened (hidden {cfg.hidden_size}, {cfg.mm_double_blocks_depth} blocks)"
    print(f"{name}: {sum(1 for _ in meta_model(cfg).parameters())} tensors, {args.dtype}, batch {batch}, "
          f"t=999, {args.valid_text} of {args.text_tokens} LLM and {args.valid_byt5} of {args.byt5_tokens} ByT5 slots "
          f"valid, {'all slots fed' if args.untrimmed else 'only the valid slots fed (as stage 2 trims)'}; "
          f"torch {torch.__version__} on {device}, jax {jax.__version__} on {jax.devices()[0].device_kind} "
          f"({platform.machine()}), attention {args.attention}\n")
    reference = diffusers_model(cfg, dtype, device)
    params = {k: device_array(v.to("cpu")) for k, v in diffusers_to_official(reference.state_dict()).items()}
    if args.skip_torch:
        del reference
    apply = jax.jit(functional(meta_model(cfg)))

    print(timing.budget_line(THREADS))
    print(timing.check_quiet(args.allow_busy) + "\n")
    print("| frames | latents (tokens) | path | min s | median s | runs | peak GiB | TFLOP/s (median) | "
          "eager / jit (median) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for frames in args.frames:
        shape = pipeline.latent_shape(frames, height, width)
        text, byt5 = (args.text_tokens, args.byt5_tokens) if args.untrimmed else (args.valid_text, args.valid_byt5)
        inputs = random_inputs(cfg, batch=batch, latent=shape, text_len=text, byt5_len=byt5)
        inputs["t"][:] = 999.0
        for key, valid in (("text_mask", args.valid_text), ("byt5_mask", args.valid_byt5)):
            inputs[key][:] = 0
            inputs[key][:, :valid] = 1
        flops = dit_forward_flops(cfg, batch, int(np.prod(shape)), text, byt5)
        run_jax, compile_s, peak = jax_path(apply, params, inputs, dtype, kernel)
        paths, peaks = {"torchax jit": run_jax}, {"torchax jit": peak}
        if not args.skip_torch:
            paths["eager torch (diffusers)"], peaks["eager torch (diffusers)"] = torch_path(
                reference, cfg, inputs, dtype, batch)
            error = rel_l2(np.asarray(run_jax().astype(np.float32)), paths["eager torch (diffusers)"]().float().cpu())
        times = timing.round_robin(paths, args.runs, args.warmup)
        jit_median = timing.min_median(times["torchax jit"])[1]
        for name, path_times in times.items():
            fastest, median = timing.min_median(path_times)
            ratio = f"{median / jit_median:.2f}x" if name != "torchax jit" else "-"
            print(f"| {frames} | {shape} ({int(np.prod(shape))}) | {name} | {fastest:.3f} | {median:.3f} | "
                  f"{len(path_times)} | {peaks[name] / 2**30 if peaks[name] else float('nan'):.2f} | "
                  f"{flops / median / 1e12:.3f} | {ratio} |", flush=True)
        note = f"; JAX vs torch output rel L2 {error:.1e}" if not args.skip_torch else ""
        print(f"<!-- {frames} frames: {flops / 1e12:.3f} TFLOP per forward; JAX compile {compile_s:.1f} s{note} -->")
    print(f"\nload average {timing.load():.2f} at the end")


if __name__ == "__main__":
    main()
