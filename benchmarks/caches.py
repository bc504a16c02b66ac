"""The feature caches side by side: full and cached steps, their cost, the speedup, the drift, and
the v6e-8 projection of the 720p x 121 job.

    python benchmarks/caches.py --depth 16 --hidden 256 --frames 33 --height 128 --width 128

On this CPU, one model at a size where the blocks dominate (as benchmarks/deepcache.py did),
the same seeded weights, embeddings and noise for every run: the loop without a cache, then
each cache at its official default and at one faster setting. MagCache is calibrated first on
this model (``MagCacheCalibration``: every step in full, its ratios recorded). The loops take
turns (``timing.round_robin``) in --repeats rounds after an untimed one, on one thread budget
(--threads); a busy machine stops the run (``--allow_busy``). Drift is the final latents
against the uncached run (relative L2; PSNR over the uncached latents' range). The weights are
random, so drift checks the plumbing, not the quality: a user measures quality on real weights.

With --project, each cache's cached step of the 720p_t2v preset at 121 frames (1280x720, CFG
batch 2) is compiled abstractly on a v6e-8 mesh (``projection.project_step``, tp_fc2_replicated
tp=8) next to the uncached step and TaylorCache's full step; a job's s/step is the schedule's
mix of full and cached steps, the schedule being the one measured on this CPU.
"""

from __future__ import annotations

import timing

THREADS = timing.pin_threads(timing.threads_flag())

import argparse  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from hunyuan_tpu import attention, parallel, pipeline, projection  # noqa: E402
from hunyuan_tpu.cache import (  # noqa: E402
    Calibration, DeepCache, FeatureCache, MagCache, MagCacheCalibration, NoCache, Schedule, TaylorCache, TeaCache,
)
from hunyuan_tpu.config import widened_tiny  # noqa: E402
from hunyuan_tpu.metrics import rel_l2  # noqa: E402
from hunyuan_tpu.params import random_params  # noqa: E402
from hunyuan_tpu.synthetic import stage1_embeddings  # noqa: E402

FASTER = Schedule(5, 47, 6)  # 15 full steps of 50 instead of 25


def psnr(x: np.ndarray, reference: np.ndarray) -> float:
    rmse = float(np.sqrt(np.mean((x - reference) ** 2)))
    return 20 * math.log10(float(reference.max() - reference.min()) / rmse) if rmse else math.inf


def caches(calibration: Calibration) -> dict[str, FeatureCache]:
    return {
        "none": NoCache(),
        "deepcache (official: 11,45,4, keep 1)": DeepCache(),
        "deepcache 5,47,6": DeepCache(FASTER),
        "teacache (official: 11,45,4)": TeaCache(),
        "teacache 5,47,6": TeaCache(FASTER),
        "taylorcache (official: 11,45,4, orders 2)": TaylorCache(),
        "taylorcache 5,47,6": TaylorCache(FASTER),
        "magcache (0.24, K 4, 20%)": MagCache(calibration),
        "magcache 0.5, K 6": MagCache(calibration, threshold=0.5, max_skips=6),
    }


def calibrate(cfg, params, conditions, settings, noise, kernel) -> Calibration:
    denoiser = pipeline.Denoiser(cfg, params, conditions, settings, attention=kernel, cache=MagCacheCalibration())
    x, ratios = denoiser.place(noise), []
    state = denoiser.initial_state(x.shape)
    for i in range(settings.num_inference_steps):
        x, state = denoiser.step(x, i, state)
        ratios.append(float(state["ratio"]))
    return Calibration(tuple(ratios), "benchmark", None, "benchmark", settings.flow_shift, settings.guidance_scale)


def project(named: dict[str, FeatureCache], steps: dict[str, tuple[int, int]], frames: int) -> None:
    """The 720p_t2v step on v6e-8 (tp_fc2_replicated, tp=8) without a cache and each cache's
    cached step, and the job's s/step under each schedule."""
    chip = projection.CHIPS["v6e"]
    shape = pipeline.latent_shape(frames, 720, 1280)
    cfg, conditions, settings = projection.preset_step("720p_t2v", shape, 1000, 256)
    placement = parallel.placement(cfg, "tp_fc2_replicated", "tp=8", batch=2)
    tokens = projection.padded_tokens(shape, placement)
    per_block = projection.attention_flops(2, cfg.heads_num, tokens + 1256, tokens + 1256, cfg.head_dim)
    full_attention = projection.dense_attention_flops(cfg, 2, tokens, 1000, 256)
    full = projection.project_step(cfg, placement, shape, conditions, settings, chip, attention_flops=full_attention)
    # TaylorCache's full step also splits the image stream into bands and updates 5 derivatives;
    # the other caches' full steps add at most a subtraction of the stream to the plain step
    taylor = projection.project_step(cfg, placement, shape, conditions, settings, chip, attention_flops=full_attention,
                                     cache=TaylorCache())
    print(f"\nv6e-8 projection, 720p_t2v, 121 frames ({'x'.join(map(str, shape))} latents), CFG batch 2, "
          f"tp_fc2_replicated tp=8 (compute | memory | ICI | upper (lower) s): full step {full.roofline.cells()}, "
          f"compiled in {full.compile_s:.0f} s; TaylorCache's full step {taylor.roofline.cells()}\n")
    print("| cache | full / cached steps | full step s (upper) | cached step s (upper) | cached / full | "
          "job s/step (upper) | speedup |")
    print("|---|---|---|---|---|---|---|")
    done: dict[tuple, float] = {}
    for name, cache in named.items():
        n_full, n_cached = steps[name]
        full_s = (taylor if isinstance(cache, TaylorCache) else full).roofline.step_s
        cached_s = 0.0
        if n_cached:
            kind = (type(cache), getattr(cache, "keep_blocks", 0))  # the cached step does not depend on the schedule
            if kind not in done:
                blocks = getattr(cache, "keep_blocks", 0)
                r = projection.project_step(cfg, placement, shape, conditions, settings, chip,
                                            attention_flops=blocks * per_block, cache=cache, cached=True)
                done[kind] = r.roofline.step_s
            cached_s = done[kind]
        job = (n_full * full_s + n_cached * cached_s) / (n_full + n_cached)
        print(f"| {name} | {n_full} / {n_cached} | {full_s:.3f} | {cached_s:.3f} | {cached_s / full_s:.3f} | "
              f"{job:.2f} | {full.roofline.step_s / job:.2f}x |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=16, help="double blocks (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size, 8 heads (default: %(default)s)")
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default: %(default)s)")
    p.add_argument("--attention", choices=attention.BACKENDS, default="auto",
                   help="the jitted path's kernel, as stage 2's --attention (default: %(default)s)")
    p.add_argument("--project", action="store_true", help="also the v6e-8 projection of the 720p x 121 job")
    p.add_argument("--project_frames", type=int, default=121)
    timing.add_flags(p)
    args = p.parse_args()

    cfg = widened_tiny(args.hidden, args.depth)
    shape = pipeline.latent_shape(args.frames, args.height, args.width)
    emb = {k: v.numpy() for k, v in stage1_embeddings(cfg, latent_hw=shape[1:], seed=0).items()}
    conditions = pipeline.build_conditions(emb, task="t2v", shape=shape, cfg=True)
    settings = pipeline.SamplingSettings(num_inference_steps=args.steps, guidance_scale=6.0, flow_shift=5.0)
    params = random_params(cfg, torch.float32, seed=0)
    noise = pipeline.initial_noise(0, shape)
    kernel = attention.kernel(args.attention, dtype=jax.numpy.float32)
    print(f"model: {args.depth} blocks, hidden {args.hidden}, float32; latents {shape} = {math.prod(shape)} "
          f"video tokens; CFG batch 2; {args.steps} steps")
    print(timing.budget_line(THREADS))
    print(timing.check_quiet(args.allow_busy) + "\n")

    calibration = calibrate(cfg, params, conditions, settings, noise, kernel)
    print("MagCache ratios of this model: " + " ".join(f"{r:.3f}" for r in calibration.ratios) + "\n")
    named = caches(calibration)
    denoisers = {name: pipeline.Denoiser(cfg, params, conditions, settings, attention=kernel, cache=cache)
                 for name, cache in named.items()}
    for denoiser in denoisers.values():
        denoiser.compile(noise.shape)
    results: dict[str, pipeline.LoopResult] = {}

    def loop(name: str):
        def run():
            results[name] = pipeline.denoise(denoisers[name], noise, progress=False)
        return run

    times = timing.round_robin({name: loop(name) for name in named}, args.repeats, warmup=1)
    plain = results["none"]
    plain_s = timing.min_median(times["none"])[1]
    print("| cache | full / cached steps | full step s | cached step s | loop s (min / median) | speedup (medians) | "
          "rel L2 | PSNR dB |")
    print("|---|---|---|---|---|---|---|---|")
    steps = {}
    for name in named:
        result = results[name]
        loop_min, loop_s = timing.min_median(times[name])
        step_s, full = np.array(result.step_seconds), np.array(result.full)
        steps[name] = (int(full.sum()), int((~full).sum()))
        cached_s = f"{step_s[~full].mean():.4f}" if (~full).any() else "-"
        print(f"| {name} | {full.sum()} / {(~full).sum()} | {step_s[full].mean():.4f} | {cached_s} | "
              f"{loop_min:.2f} / {loop_s:.2f} | {plain_s / loop_s:.2f}x | "
              f"{rel_l2(result.latents, plain.latents):.2e} | {psnr(result.latents, plain.latents):.1f} |", flush=True)
    print(f"\nload average {timing.load():.2f} at the end")
    if args.project:
        project(named, steps, args.project_frames)


if __name__ == "__main__":
    main()
