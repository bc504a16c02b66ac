"""One denoising step (CFG batch of 2, DiT forward, guidance, Euler) eager PyTorch vs torchax + jax.jit.

    python benchmarks/denoise_step.py --depth 4 --hidden 256 --frames 33 --height 128 --width 128

Builds the tiny preset widened to --hidden / --depth with seeded trained-scale weights, the
seeded demo embeddings, and times --steps steps of each path after one untimed step; the jit
path's trace + compile time is reported separately.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from hunyuan_tpu import pipeline
from hunyuan_tpu.config import widened_tiny
from hunyuan_tpu.metrics import rel_l2
from hunyuan_tpu.model import HunyuanVideo15DiT
from hunyuan_tpu.random_init import randomize_like_trained_
from hunyuan_tpu.runtime import jax_view
from hunyuan_tpu.synthetic import stage1_embeddings


def eager_step(model, conditions: dict[str, torch.Tensor], settings: pipeline.SamplingSettings, latents, i):
    sigmas = conditions["sigmas"]
    x = torch.cat([latents, conditions["cond_latents"]], dim=1).repeat(2, 1, 1, 1, 1)
    t = (sigmas[i] * 1000).repeat(2)
    v = model(x, t, conditions["prompt_embeds"], conditions["prompt_mask"], conditions["prompt_embeds_2"],
              conditions["prompt_mask_2"]).float()
    v = v[:1] + settings.guidance_scale * (v[1:] - v[:1])
    return latents + v * (sigmas[i + 1] - sigmas[i])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4, help="double blocks (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size, 8 heads (default: %(default)s)")
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per path (default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()

    cfg = widened_tiny(args.hidden, args.depth)
    dtype = getattr(torch, args.dtype)
    model = randomize_like_trained_(HunyuanVideo15DiT(cfg).eval(), seed=0).to(dtype)
    shape = pipeline.latent_shape(args.frames, args.height, args.width)
    emb = {k: v.numpy() for k, v in stage1_embeddings(cfg, latent_hw=shape[1:]).items()}
    settings = pipeline.SamplingSettings(num_inference_steps=args.steps + 1, guidance_scale=6.0, flow_shift=5.0)
    conditions = pipeline.build_conditions(emb, task="t2v", shape=shape, cfg=True)
    noise = pipeline.initial_noise(0, shape)
    tokens = int(np.prod(shape))
    print(f"model: {args.depth} blocks, hidden {args.hidden}, {sum(p.numel() for p in model.parameters()):,} "
          f"params, {args.dtype}; latents {shape} = {tokens} video tokens + "
          f"{conditions['prompt_embeds'].shape[1] + conditions['prompt_embeds_2'].shape[1]} text; CFG batch 2")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    torch_conditions = {k: torch.from_numpy(np.asarray(v)) for k, v in conditions.items()}
    torch_conditions["sigmas"] = torch.from_numpy(pipeline.scheduler.sigmas(settings.num_inference_steps, 5.0))
    for k in ("prompt_embeds", "prompt_embeds_2", "cond_latents"):
        torch_conditions[k] = torch_conditions[k].to(dtype)
    eager_times, x = [], torch.from_numpy(noise)
    with torch.no_grad():
        for i in range(settings.num_inference_steps):
            begin = time.perf_counter()
            x = eager_step(model, torch_conditions, settings, x, i)
            eager_times.append(time.perf_counter() - begin)
    eager = x.numpy()

    params, _ = jax_view(model)
    denoiser = pipeline.Denoiser(cfg, params, conditions, settings)
    compile_s = denoiser.compile(noise.shape)
    result = pipeline.denoise(denoiser, noise, progress=False)
    jit_times = result.step_seconds

    print(f"compile (trace + XLA): {compile_s:.2f} s")
    for name, times in (("eager torch", eager_times), ("torchax jit", jit_times)):
        steady = times[1:]
        print(f"{name:12s}: first step {times[0]:.3f} s, then mean {np.mean(steady):.3f} s/step "
              f"(min {np.min(steady):.3f}, {len(steady)} steps)")
    print(f"speedup (eager / jit, steady state): {np.mean(eager_times[1:]) / np.mean(jit_times[1:]):.2f}x; "
          f"latents rel L2 jit vs eager after {settings.num_inference_steps} steps: {rel_l2(result.latents, eager):.2e}")


if __name__ == "__main__":
    main()
