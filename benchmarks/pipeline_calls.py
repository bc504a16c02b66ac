"""What loading once saves: the Python API's calls against fresh command runs.

    python benchmarks/pipeline_calls.py measure     # the tiny default on this machine (about 1.5 min)
    python benchmarks/pipeline_calls.py project     # the full-size fixed costs of a run, for v6e-8

``measure``: a fresh ``run/generate.py`` process (the README's first command: tiny models, 96p,
49 frames, 50 steps), then in one process ``HunyuanVideoPipeline.from_pretrained("tiny")`` and
four calls: the same settings, another prompt at the same shape, a new size (1:1, 128x128), and
another prompt at that size. Each call's seconds are its stages' records; "compiling" is what
JAX reported tracing, lowering and compiling during the call (jax.monitoring), so the rest of a
call is running. Then the command again and the two second calls again: fresh processes and
loaded calls take turns, on one thread budget (the child inherits this process's CPUs), so a
busy moment does not land on one side only.

``project``: what a fresh command pays before its first step that a second call does not, at full
size (720p_t2v, 720p x 121 frames): the checkpoint bytes it reads (parameter counts of the released
shapes on the meta device, 2 bytes each), at the read bandwidths given; the DiT step's trace and
compile on this CPU (the scanned step, tp_fc2_replicated tp=8 on 8 virtual devices, the attention
stand-in of ``compile_size.py``); Python's imports, measured here.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import load, pin_threads

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 'A neon sign that says "OPEN" flickers on a rainy street at night'
GB = 1e9
TEXT_SLOTS, BYT5_SLOTS = 256, 128  # a prompt of 129-256 LLM tokens with quoted text, in TEXT_BUCKET multiples
# The seed TPU port's README: its first run on v6e-8 takes "60 s and more", which it puts down to XLA compiling.
SEED_FIRST_RUN_S = 60
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def fresh_command(folder: Path) -> tuple[float, dict]:
    """A fresh ``generate.py`` process: its wall seconds and its config.json."""
    import json
    begin = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "run" / "generate.py"), "--prompt", PROMPT, "--output_dir",
                    str(folder)], check=True, capture_output=True)
    return time.perf_counter() - begin, json.loads((folder / "config.json").read_text())


def _row(label: str, wall: float, config: dict, compiling: float | str) -> str:
    s1, s2, s3 = config["stage1"], config["stage2"], config["stage3"]
    steps = f"{s2['steps']} x {s2['mean_step_s']:.3f}"
    jax_s = compiling if isinstance(compiling, str) else f"{compiling:.2f}"
    return (f"| {label} | {wall:.2f} | {s1['load_s']:.2f} + {s1['encode_s']:.2f} | {s2['compile_s']:.2f} | {steps} | "
            f"{s3['load_s']:.2f} + {s3['decode_s']:.2f} | {jax_s} |")


def measure(args: argparse.Namespace) -> None:
    import jax

    from hunyuan_tpu import HunyuanVideoPipeline

    seconds: list[float] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            seconds.append(duration)

    print(f"load average {load():.2f} at the start; {os.cpu_count()} cores, jax {jax.__version__}\n")
    print("| run | wall s | stage 1 load + encode s | DiT compile s | steps x s/step | stage 3 load + decode s | "
          "compiling s (JAX) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        wall, config = fresh_command(Path(tmp) / "first")
        print(_row("fresh `generate.py` process (imports included)", wall, config, "n/a"), flush=True)
        jax.monitoring.register_event_duration_secs_listener(listener)
        begin = time.perf_counter()
        pipe = HunyuanVideoPipeline.from_pretrained("tiny", devices=jax.devices()[:1], progress=False,
                                                    note=lambda _: None)
        load_s, loading = time.perf_counter() - begin, sum(seconds)
        print(f"| `from_pretrained(\"tiny\")` | {load_s:.2f} | | | | | {loading:.2f} |", flush=True)
        calls = [("call 1: the default settings", PROMPT, {}), ("call 2: another prompt, same shape",
                 "a cat walks on the grass, realistic", {"seed": 7}),
                 ("call 3: a new size (1:1, 128x128)", PROMPT, {"aspect_ratio": "1:1"}),
                 ("call 4: another prompt at that size", "waves roll onto a beach", {"aspect_ratio": "1:1"})]
        for label, prompt, options in calls:
            seconds.clear()
            begin = time.perf_counter()
            result = pipe(prompt, **options)
            print(_row(label, time.perf_counter() - begin, dict(result.config), sum(seconds)), flush=True)
        wall, config = fresh_command(Path(tmp) / "second")
        print(_row("fresh `generate.py` process, again", wall, config, "n/a"), flush=True)
        for label, prompt, options in calls[1::2]:  # the second calls again, after the second fresh process
            seconds.clear()
            begin = time.perf_counter()
            result = pipe(prompt, **options)
            print(_row(label.replace(":", " again:", 1), time.perf_counter() - begin, dict(result.config),
                       sum(seconds)), flush=True)
        jax.monitoring.unregister_event_duration_listener(listener)
    print(f"\nload average {load():.2f} at the end")


def parameter_bytes() -> dict[str, float]:
    """The released models' parameters x 2 bytes (the checkpoints' bfloat16), from their shapes."""
    import torch
    from diffusers import AutoencoderKLHunyuanVideo15
    from transformers import Qwen2_5_VLForConditionalGeneration, SiglipVisionModel, T5EncoderModel

    from hunyuan_tpu import parallel
    from hunyuan_tpu.config import DiTConfig
    from released_configs import byt5_config, qwen_vl_config, siglip_config

    def count(build) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in build().parameters())

    return {
        "DiT (transformer/720p_t2v)": 2 * sum(math.prod(s) for s in parallel.param_shapes(
            DiTConfig.preset("720p_t2v")).values()),
        "Qwen2.5-VL-7B-Instruct, whole (text_encoder/llm)": 2 * count(
            lambda: Qwen2_5_VLForConditionalGeneration(qwen_vl_config())),
        "Glyph-ByT5 (text_encoder/Glyph-SDXL-v2)": 2 * count(lambda: T5EncoderModel(byt5_config())),
        "VAE (vae)": 2 * count(AutoencoderKLHunyuanVideo15),
        "SigLIP (vision_encoder/siglip, i2v only)": 2 * count(lambda: SiglipVisionModel(siglip_config())),
    }


def import_seconds() -> float:
    """A fresh interpreter importing what ``generate.py`` imports, best of 3."""
    code = "import hunyuan_tpu.generation, hunyuan_tpu.vae, hunyuan_tpu.stage_denoise"
    best = math.inf
    for _ in range(3):
        begin = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        best = min(best, time.perf_counter() - begin)
    return best


def project(args: argparse.Namespace, srp) -> None:
    """``srp``: the sr_projection module, imported first (it sets the thread budget and 8 virtual devices)."""
    import jax.numpy as jnp

    from compile_size import LAYOUTS, RUNNERS
    from compile_size import measure as compile_step
    from hunyuan_tpu import parallel, pipeline, projection

    print(f"load average {load():.2f} at the start\n")
    sizes = parameter_bytes()
    rates = args.read_gbps
    print("| checkpoint | GB (bf16) | " + " | ".join(f"read s at {r:g} GB/s" for r in rates) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in rates) + " |")
    for name, size in sizes.items():
        print(f"| {name} | {size / GB:.2f} | " + " | ".join(f"{size / GB / r:.1f}" for r in rates) + " |")
    t2v = sum(v for k, v in sizes.items() if "i2v only" not in k)
    print(f"| a t2v run reads | {t2v / GB:.2f} | " + " | ".join(f"{t2v / GB / r:.1f}" for r in rates) + " |\n")

    chip, preset, layout = projection.CHIPS["v6e"], "720p_t2v", ("tp_fc2_replicated", "tp=8")
    shape = pipeline.latent_shape(121, *pipeline.bucket_size("720p", "16:9"))
    cfg, conditions, settings = projection.preset_step(preset, shape, TEXT_SLOTS, BYT5_SLOTS)
    host = pipeline.device_conditions(conditions, settings, jnp.float32)
    m = compile_step(cfg, LAYOUTS[" ".join(layout)], RUNNERS["scan"], shape, host, settings)
    compile_s = m.lower_s + m.compile_s
    print(f"DiT step ({preset}, {shape} latents, CFG, scanned, {' '.join(layout)}, XLA:CPU): lowering "
          f"{m.lower_s:.1f} s, compile {m.compile_s:.1f} s")
    imports_s = import_seconds()
    print(f"Python imports of generate.py (fresh interpreter, best of 3): {imports_s:.1f} s")

    placement = parallel.placement(cfg, *layout, batch=2)
    attention = projection.dense_attention_flops(cfg, 2, projection.padded_tokens(shape, placement), TEXT_SLOTS,
                                                 BYT5_SLOTS)
    step = projection.project_step(cfg, placement, shape, conditions, settings, chip, attention_flops=attention)
    decode = srp.Surroundings.of("720p_sr_distilled", shape, chip, 8)
    steps = settings.num_inference_steps
    roofline = steps * step.roofline.step_s + decode.decode_s
    seeded = steps * srp.SEED_S_PER_STEP + decode.decode_s
    runs = {"roofline": roofline, f"the seed port's {srp.SEED_S_PER_STEP} s/step": seeded}
    print(f"\nThe run, the same for a fresh command and a loaded pipeline: {steps} steps at "
          f"{step.roofline.step_s:.2f} s (roofline upper) + the VAE decode {decode.decode_s:.1f} s "
          f"(the H100's share of peak) = {roofline:.0f} s; at the seed's measured step {seeded:.0f} s.")
    print("\nWhat a fresh command pays besides, and that against the run (a loaded pipeline's second call: 0):\n")
    print("| read GB/s | compile s | imports + read + compile s | " + " | ".join(f"/ run ({k})" for k in runs) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in runs) + " |")
    for rate in rates:
        for compile_label, seconds in ((f"{compile_s:.1f} (XLA:CPU, this step)", compile_s),
                                       (f"{SEED_FIRST_RUN_S} (the seed's first run)", SEED_FIRST_RUN_S)):
            extra = imports_s + t2v / GB / rate + seconds
            print(f"| {rate:g} | {compile_label} | {extra:.0f} | "
                  + " | ".join(f"{extra / run:.2f}" for run in runs.values()) + " |")
    print(f"\nload average {load():.2f} at the end")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("measure", "project"))
    p.add_argument("--threads", type=int, help="CPUs to use (default: all this process may)")
    p.add_argument("--read_gbps", type=float, nargs="+", default=[0.25, 2.0],
                   help="checkpoint read bandwidths for the projection, GB/s (default: %(default)s)")
    args = p.parse_args()
    if args.what == "project":
        import sr_projection  # first: it sets the thread budget (--threads) and 8 virtual devices
        print(f"{sr_projection.THREADS} thread(s)")
        project(args, sr_projection)
    else:
        print(f"{pin_threads(args.threads)} thread(s)")
        measure(args)


if __name__ == "__main__":
    main()
