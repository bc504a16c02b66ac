"""One denoising step (CFG batch of 2, DiT forward, guidance, Euler) eager PyTorch vs torchax + jax.jit.

    python benchmarks/denoise_step.py --depth 4 --hidden 256 --frames 33 --height 128 --width 128

Builds the tiny preset widened to --hidden / --depth with seeded trained-scale weights, the
seeded demo embeddings (trimmed as stage 2 trims them), and times --steps steps of each path,
the two paths taking turns step by step (``timing.round_robin``) on one thread budget
(--threads) after one untimed step each; min and median per path. The jit path's trace +
compile time is reported separately; a busy machine stops the run (``--allow_busy``).
"""

from __future__ import annotations

import timing

THREADS = timing.pin_threads(timing.threads_flag())

import argparse  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hunyuan_tpu import attention, pipeline, runtime  # noqa: E402
from hunyuan_tpu.config import widened_tiny  # noqa: E402
from hunyuan_tpu.metrics import rel_l2  # noqa: E402
from hunyuan_tpu.model import HunyuanVideo15DiT  # noqa: E402
from hunyuan_tpu.random_init import randomize_like_trained_  # noqa: E402
from hunyuan_tpu.runtime import jax_view  # noqa: E402
from hunyuan_tpu.synthetic import stage1_embeddings  # noqa: E402


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
    p.add_argument("--attention", choices=attention.BACKENDS, default="auto",
                   help="the jitted path's kernel, as stage 2's --attention (default: %(default)s)")
    timing.add_flags(p)
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
    torch.set_num_threads(THREADS)
    print(f"model: {args.depth} blocks, hidden {args.hidden}, {sum(p.numel() for p in model.parameters()):,} "
          f"params, {args.dtype}; latents {shape} = {tokens} video tokens + "
          f"{conditions['prompt_embeds'].shape[1] + conditions['prompt_embeds_2'].shape[1]} text; CFG batch 2")
    print(timing.budget_line(THREADS))
    print(timing.check_quiet(args.allow_busy))

    torch_conditions = {k: torch.from_numpy(np.asarray(v)) for k, v in conditions.items()}
    torch_conditions["sigmas"] = torch.from_numpy(pipeline.scheduler.sigmas(settings.num_inference_steps, 5.0))
    for k in ("prompt_embeds", "prompt_embeds_2", "cond_latents"):
        torch_conditions[k] = torch_conditions[k].to(dtype)
    params, _ = jax_view(model)
    kernel = attention.kernel(args.attention, dtype=runtime.jax_dtype(dtype))
    denoiser = pipeline.Denoiser(cfg, params, conditions, settings, attention=kernel)
    compile_s = denoiser.compile(noise.shape)
    state = {"eager": torch.from_numpy(noise), "jit": denoiser.place(noise), "eager_i": 0, "jit_i": 0}

    @torch.no_grad()
    def eager():
        state["eager"] = eager_step(model, torch_conditions, settings, state["eager"], state["eager_i"])
        state["eager_i"] += 1

    def jit():
        state["jit"], _ = denoiser.step(state["jit"], state["jit_i"], {})
        state["jit"].block_until_ready()
        state["jit_i"] += 1

    times = timing.round_robin({"eager torch": eager, "torchax jit": jit}, repeats=args.steps, warmup=1)
    print(f"compile (trace + XLA): {compile_s:.2f} s\n")
    print("| path | min s/step | median s/step | steps |")
    print("| --- | --- | --- | --- |")
    for name, path_times in times.items():
        fastest, median = timing.min_median(path_times)
        print(f"| {name} | {fastest:.4f} | {median:.4f} | {len(path_times)} |")
    ratio = timing.min_median(times["eager torch"])[1] / timing.min_median(times["torchax jit"])[1]
    error = rel_l2(np.asarray(state["jit"]), state["eager"].numpy())
    print(f"\neager / jit (medians): {ratio:.2f}x; latents rel L2 jit vs eager after {args.steps + 1} steps: "
          f"{error:.2e}; load average {timing.load():.2f} at the end")


if __name__ == "__main__":
    main()
