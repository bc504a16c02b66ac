"""DeepCache: cached-step cost against a full step, end-to-end speedup, and drift of the result.

    python benchmarks/deepcache.py --depth 16 --hidden 256 --frames 33 --height 128 --width 128

Runs the whole denoising loop (CFG batch of 2) without the cache and with each schedule
("start,end,interval[,keep_blocks]"), all from the same seeded weights, embeddings and noise,
in --repeats rounds after an untimed one, the runs taking turns (``timing.round_robin``) on one
thread budget (--threads); a busy machine stops the run (``--allow_busy``). Per run: the fastest
and the median loop. Per schedule: mean full and cached step times, their ratio next to the ideal (kept blocks /
all blocks) and next to the compiled matmul FLOP ratio (each loop iteration counted), the
loop's speedup, and the drift of the final
latents from the uncached run (relative L2, and PSNR over the uncached latents' range).
"""

from __future__ import annotations

import timing

THREADS = timing.pin_threads(timing.threads_flag())

import argparse  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from hunyuan_tpu import attention, hlo, pipeline  # noqa: E402
from hunyuan_tpu.cache import CacheSchedule  # noqa: E402
from hunyuan_tpu.config import widened_tiny  # noqa: E402
from hunyuan_tpu.metrics import rel_l2  # noqa: E402
from hunyuan_tpu.params import random_params  # noqa: E402
from hunyuan_tpu.synthetic import stage1_embeddings  # noqa: E402

SCHEDULES = ["11,45,4", "11,45,2", "5,47,6", "11,45,4,4"]


def psnr(x: np.ndarray, reference: np.ndarray) -> float:
    rmse = float(np.sqrt(np.mean((x - reference) ** 2)))
    return 20 * math.log10(float(reference.max() - reference.min()) / rmse) if rmse else math.inf


def parse_schedule(text: str) -> CacheSchedule:
    return CacheSchedule(*(int(v) for v in text.split(",")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=16, help="double blocks (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size, 8 heads (default: %(default)s)")
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default: %(default)s)")
    p.add_argument("--schedule", action="append", metavar="S,E,I[,K]",
                   help=f"cache schedule, repeatable (default: {' '.join(SCHEDULES)})")
    p.add_argument("--attention", choices=attention.BACKENDS, default="auto",
                   help="the jitted path's kernel, as stage 2's --attention (default: %(default)s)")
    timing.add_flags(p)
    args = p.parse_args()

    cfg = widened_tiny(args.hidden, args.depth)
    shape = pipeline.latent_shape(args.frames, args.height, args.width)
    emb = {k: v.numpy() for k, v in stage1_embeddings(cfg, latent_hw=shape[1:], seed=0).items()}
    conditions = pipeline.build_conditions(emb, task="t2v", shape=shape, cfg=True)
    settings = pipeline.SamplingSettings(num_inference_steps=args.steps, guidance_scale=6.0, flow_shift=5.0)
    params = random_params(cfg, torch.float32, seed=0)
    noise = pipeline.initial_noise(0, shape)
    print(f"model: {args.depth} blocks, hidden {args.hidden}, float32; latents {shape} = {math.prod(shape)} "
          f"video tokens; CFG batch 2; {args.steps} steps")
    print(timing.budget_line(THREADS))
    print(timing.check_quiet(args.allow_busy) + "\n")

    schedules = [None] + [parse_schedule(text) for text in args.schedule or SCHEDULES]
    kernel = attention.kernel(args.attention, dtype=jax.numpy.float32)
    denoisers = [pipeline.Denoiser(cfg, params, conditions, settings, attention=kernel, cache=cache)
                 for cache in schedules]
    compile_s = [d.compile(noise.shape) for d in denoisers]
    results: list[pipeline.LoopResult | None] = [None] * len(denoisers)

    def loop(k: int):
        def run():
            results[k] = pipeline.denoise(denoisers[k], noise, progress=False)
        return run

    times = timing.round_robin({k: loop(k) for k in range(len(denoisers))}, args.repeats, warmup=1)
    best = [(results[k], *timing.min_median(times[k])) for k in range(len(denoisers))]

    (plain, plain_min, plain_s), *cached_runs = best
    print(f"no cache: {plain_s:.2f} s (median; min {plain_min:.2f}) for {args.steps} steps, mean "
          f"{np.mean(plain.step_seconds):.4f} s/step (compile {compile_s[0]:.2f} s)\n")
    print("| schedule (start,end,interval,keep) | full / cached steps | full step s | cached step s | "
          "cached / full | ideal (keep / depth) | FLOP ratio | loop s (min / median) | speedup (medians) | rel L2 | "
          "PSNR dB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for cache, denoiser, (result, loop_min, loop_s) in zip(schedules[1:], denoisers[1:], cached_runs):
        step_s, full = np.array(result.step_seconds), np.array(result.full)
        full_s = step_s[full].mean()
        cached_s = step_s[~full].mean() if (~full).any() else math.nan  # a schedule may cache no step
        # not cost_analysis(): it counts the scanned blocks' loop body once, whatever its trip count
        flops = hlo.dot_flops(denoiser.compiled_cached.as_text()) / hlo.dot_flops(denoiser.compiled.as_text())
        print(f"| {cache.start},{cache.end},{cache.interval},{cache.keep_blocks} | {full.sum()} / {(~full).sum()} | "
              f"{full_s:.4f} | {cached_s:.4f} | {cached_s / full_s:.3f} | {cache.keep_blocks / args.depth:.3f} | "
              f"{flops:.3f} | {loop_min:.2f} / {loop_s:.2f} | {plain_s / loop_s:.2f}x | "
              f"{rel_l2(result.latents, plain.latents):.2e} | {psnr(result.latents, plain.latents):.1f} |")
    print(f"\nload average {timing.load():.2f} at the end")


if __name__ == "__main__":
    main()
