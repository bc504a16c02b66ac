"""One training step: measured at the tiny preset on this CPU, and its per-chip memory at full size.

    python benchmarks/train_step.py                                  # tiny: s/update, peak memory here
    python benchmarks/train_step.py --project v6e-8 --preset 480p_t2v --frames 121

The first mode trains the tiny preset on one CPU device (synthetic batch, float32) for each
setting and reports the compile time, the process's peak resident memory (VmHWM, reset before
each setting's compile and first update; the settings built before it stay in memory, so that
they can take turns) and the min and median time of an update, the
settings taking turns update by update (``timing.round_robin``) on one thread budget
(--threads); a busy machine stops the run (``--allow_busy``).

The second projects the full model's per-chip memory for a fine-tuning step (full: float32
master weights and Muon/AdamW state; LoRA: the default targets, r 8, on a frozen bf16 base),
remat on, batch 1, under each sharding strategy on 8 virtual CPU devices, without making any
weights. Weights and optimizer state are exact: the abstract state placed by the strategy's
tables. Temporaries come from XLA's memory analysis of the step compiled with abstract shapes
for the model cut to one double block (attention as a stand-in with a flash kernel's memory,
``projection.attention_stand_in``), plus what each further block adds under remat: the two
residual streams it keeps (bf16, laid out as the strategy says) and the float32 gradients of
its trained weights, alive until the update.

Why not compile all 54 blocks: XLA:CPU's buffer assignment does not reuse the memory of
rematerialised activations from one block's backward to the next (it lets independent work
overlap), so its temporaries grow by the whole per-block activation footprint, about 2.8 GB per
block here, where a TPU's scheduler keeps one block's at a time. The one-block compile runs its
activations in float32 (XLA's CPU backend has no bf16 matmul): an upper bound for a chip that
holds them in bf16.
"""

from __future__ import annotations

import timing

THREADS = timing.pin_threads(timing.threads_flag())

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from sharding import IMG, TXT  # noqa: E402
from hunyuan_tpu import lora as lora_lib  # noqa: E402
from hunyuan_tpu import objective as obj  # noqa: E402
from hunyuan_tpu import parallel, pipeline, projection  # noqa: E402
from hunyuan_tpu.config import DiTConfig  # noqa: E402
from hunyuan_tpu.params import meta_model, random_params  # noqa: E402
from hunyuan_tpu.scan import stack_blocks, stacked_abstract  # noqa: E402
from hunyuan_tpu.synthetic import training_samples  # noqa: E402
from hunyuan_tpu.training import OptimizerSettings, Trainer, step_key  # noqa: E402

_STATUS = Path("/proc/self/status")
LAYOUTS = [("fsdp", "fsdp=8"), ("sp", "sp=8"), ("tp", "tp=8"), ("tp_fc2_replicated", "tp=8"), ("replicated", "tp=8")]
KINDS = [("full", "muon"), ("full", "adamw"), ("lora", "muon")]
VISION_TOKENS = 729  # SigLIP tokens: i2v-capable data keeps them in every sample (masked for t2v ones)


def reset_host_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def host_peak_bytes() -> float:
    line = next(line for line in _STATUS.read_text().splitlines() if line.startswith("VmHWM:"))
    return float(line.split()[1]) * 1024


def measure_cpu(args) -> None:
    cfg = DiTConfig.preset("tiny")
    latent = tuple(args.latent)
    samples, _ = training_samples(cfg, count=args.batch, latent=latent, seed=0)
    print(f"tiny preset ({cfg.mm_double_blocks_depth} blocks, hidden {cfg.hidden_size}), float32, batch {args.batch}"
          f" of latents {latent} ({math.prod(latent)} tokens) + 16 LLM + 8 ByT5 + 8 vision slots, i2v 30%; one CPU "
          f"device; {args.steps} updates per setting after 2, the settings in turns")
    print(timing.budget_line(THREADS))
    print(timing.check_quiet(args.allow_busy) + "\n")
    rows, updates = {}, {}
    for (kind, optimizer), remat in [(k, r) for k in KINDS for r in (True, False)]:
        reset_host_peak()
        spec = lora_lib.LoRASpec() if kind == "lora" else None
        tr = Trainer(cfg, obj.Objective(), OptimizerSettings(name=optimizer, learning_rate=1e-3), lora=spec,
                     compute_dtype=jnp.float32, remat=remat, micro_batch=args.batch)
        base = random_params(cfg, torch.float32, seed=0)
        trainable, frozen = (base, {}) if spec is None else (
            {k: v.numpy() for k, v in lora_lib.init_adapter(meta_model(cfg), spec, 0).items()}, stack_blocks(base))
        run = {"state": tr.init_state(trainable), "step": 0}
        batch = tr.place_batch(samples)
        begin = time.perf_counter()
        tr.compile(run["state"], frozen, batch, None)
        compile_s = time.perf_counter() - begin

        def update(tr=tr, frozen=frozen, batch=batch, run=run):
            run["state"], metrics = tr.step(run["state"], frozen, batch, None, step_key(0, run["step"]))
            jax.block_until_ready(metrics["loss"])
            run["step"] += 1

        update()
        key = (kind, optimizer, "on" if remat else "off")
        rows[key], updates[key] = (compile_s, host_peak_bytes()), update
    times = timing.round_robin(updates, args.steps, warmup=1)
    print("| training | optimizer | remat | compile s | min s/update | median s/update | "
          "peak RSS GiB (the settings above still held) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for key, (compile_s, peak) in rows.items():
        fastest, median = timing.min_median(times[key])
        print(f"| {' | '.join(key)} | {compile_s:.1f} | {fastest:.4f} | {median:.4f} | {peak / 2**30:.2f} |")
    print(f"\nload average {timing.load():.2f} at the end")


def compile_one_block(cfg: DiTConfig, kind: str, optimizer: str, name: str, mesh_spec: str, shape, text: int,
                      byt5: int) -> tuple[Trainer, object, float]:
    """The training step of a one-block ``cfg`` compiled on the mesh with abstract shapes."""
    spec = lora_lib.LoRASpec() if kind == "lora" else None
    one = dataclasses.replace(cfg, mm_double_blocks_depth=1)
    placement = parallel.placement(one, name, mesh_spec, batch=1)
    tr = Trainer(one, obj.Objective(), OptimizerSettings(name=optimizer), compute_dtype=jnp.float32, lora=spec,
                 placement=placement, remat=True, micro_batch=1, attention=projection.attention_stand_in)
    base = abstract_params(one, tr.base_shardings)
    trainable, frozen = (base, {}) if spec is None else (adapter_shapes(one, spec), stacked_abstract(base))
    batch = {
        "latents": (1, 32, *shape), "prompt_embeds": (1, text, cfg.text_states_dim), "prompt_mask": (1, text),
        "prompt_embeds_2": (1, byt5, cfg.byt5_states_dim), "prompt_mask_2": (1, byt5),
        "vision_states": (1, VISION_TOKENS, cfg.vision_states_dim),
    }
    batch = {k: jax.ShapeDtypeStruct(s, jnp.int32 if "mask" in k else jnp.float32, sharding=tr.placement.batch)
             for k, s in batch.items()}
    begin = time.perf_counter()
    compiled = tr.compile(tr.abstract_state(trainable), frozen, batch, None)
    return tr, compiled, time.perf_counter() - begin


def abstract_params(cfg: DiTConfig, shardings) -> dict:
    return {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=shardings[k])
            for k, s in parallel.param_shapes(cfg).items()}


def adapter_shapes(cfg: DiTConfig, spec: lora_lib.LoRASpec) -> dict:
    return {name: jax.ShapeDtypeStruct(shape, jnp.float32)
            for name, shape in lora_lib.adapter_shapes(meta_model(cfg), spec).items()}


def device_bytes(tree, itemsize: int | None = None) -> float:
    """Bytes one device holds of the arrays in ``tree`` (at their dtype, or ``itemsize`` each)."""
    return sum((itemsize or a.dtype.itemsize) * math.prod(a.sharding.shard_shape(a.shape))
               for a in jax.tree.leaves(tree))


def per_device(cfg: DiTConfig, kind: str, optimizer: str, name: str, mesh_spec: str, shape, text: int,
               byt5: int) -> tuple[dict[str, float], float]:
    """Per-device bytes of a ``cfg`` training step: weights and optimizer state from the tables,
    temporaries compiled for one block, and what each further block adds under remat."""
    tr, compiled, seconds = compile_one_block(cfg, kind, optimizer, name, mesh_spec, shape, text, byt5)
    memory = compiled.memory_analysis()
    full = Trainer(cfg, obj.Objective(), OptimizerSettings(name=optimizer), compute_dtype=jnp.bfloat16, lora=tr.lora,
                   placement=parallel.placement(cfg, name, mesh_spec, batch=1), micro_batch=1)
    base = abstract_params(cfg, full.base_shardings)
    trainable = base if tr.lora is None else adapter_shapes(cfg, tr.lora)
    state = full.abstract_state(trainable)
    weights = device_bytes(state.trainable) + (0 if tr.lora is None else device_bytes(base, itemsize=2))
    opt = device_bytes(state.opt_state)
    one_state = tr.abstract_state(abstract_params(tr.config, tr.base_shardings) if tr.lora is None
                                  else adapter_shapes(tr.config, tr.lora))
    one_frozen = 0 if tr.lora is None else device_bytes(abstract_params(tr.config, tr.base_shardings))
    other = (memory.argument_size_in_bytes - device_bytes(one_state.trainable) - device_bytes(one_state.opt_state)
             - one_frozen + memory.output_size_in_bytes - memory.alias_size_in_bytes)
    # each further block: the two streams remat keeps (bf16, laid out as the strategy says) and
    # the float32 gradients of its trained weights, alive until the update
    tokens = math.prod(shape)
    tokens += -tokens % tr.placement.execution.token_multiple
    slots = text + byt5 + VISION_TOKENS
    streams = sum(2 * math.prod(tr.placement.activation(n).shard_shape((1, length, cfg.hidden_size)))
                  for n, length in ((IMG, tokens), (TXT, slots)))
    block = [k for k in state.trainable if k.startswith("double_blocks.0.")]
    grads = device_bytes({k: state.trainable[k] for k in block})
    extra = (cfg.mm_double_blocks_depth - 1) * (streams + grads)
    return {"weights": weights, "optimizer": opt, "temp": memory.temp_size_in_bytes + extra, "other": other,
            "block": streams + grads}, seconds


def project(args) -> None:
    chip = projection.CHIPS[args.project.split("-")[0]]
    if int(args.project.split("-")[1]) != jax.device_count():
        raise SystemExit(f"--project {args.project} needs {args.project.split('-')[1]} devices")
    cfg = DiTConfig.preset(args.preset)
    height, width = pipeline.bucket_size(cfg.ideal_resolution, args.aspect_ratio)
    shape = pipeline.latent_shape(args.frames, height, width)
    print(f"{args.preset} ({cfg.mm_double_blocks_depth} blocks) fine-tuning step at {args.frames} frames "
          f"{width}x{height}: latents {shape} = {math.prod(shape)} tokens + {args.text_tokens} LLM + "
          f"{args.byt5_tokens} ByT5 + {VISION_TOKENS} vision slots, batch 1, remat on, per device of {args.project} "
          f"({chip.name}, {chip.hbm_bytes / 1e9:.0f} GB HBM)\n")
    print("| training | optimizer | strategy | mesh | weights GB | optimizer state GB | temporaries GB (1 block "
          "compiled + 53 x kept streams and gradients) | other GB | total GB/chip | fits |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, optimizer in KINDS:
        for name, mesh_spec in LAYOUTS:
            at, seconds = per_device(cfg, kind, optimizer, name, mesh_spec, shape, args.text_tokens, args.byt5_tokens)
            total = sum(v for k, v in at.items() if k != "block")
            print(f"| {kind} | {optimizer} | {name} | {mesh_spec} | {at['weights'] / 1e9:.1f} | "
                  f"{at['optimizer'] / 1e9:.1f} | {at['temp'] / 1e9:.1f} | {at['other'] / 1e9:.2f} | "
                  f"{total / 1e9:.1f} | {'yes' if total <= chip.hbm_bytes else 'no'} |", flush=True)
            print(f"<!-- {kind} {optimizer} {name} {mesh_spec}: one block compiled in {seconds:.0f} s; each further "
                  f"block adds {at['block'] / 1e9:.3f} GB -->", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4, help="CPU mode: samples per update (default: %(default)s)")
    p.add_argument("--latent", type=int, nargs=3, default=[5, 8, 8], metavar=("T", "H", "W"),
                   help="CPU mode: latent frames, rows, columns (default: 5 8 8)")
    p.add_argument("--steps", type=int, default=10, help="CPU mode: timed updates (default: %(default)s)")
    p.add_argument("--project", metavar="CHIP-N", help="project the full model's memory onto N chips, e.g. v6e-8")
    p.add_argument("--preset", default="480p_t2v", help="projection: model preset (default: %(default)s)")
    p.add_argument("--frames", type=int, default=121, help="projection: video frames (default: %(default)s)")
    p.add_argument("--aspect_ratio", default="16:9", help="projection: bucket (default: %(default)s)")
    p.add_argument("--text_tokens", type=int, default=1000, help="projection: LLM slots (stage 1 pads to 1000)")
    p.add_argument("--byt5_tokens", type=int, default=256, help="projection: ByT5 slots (stage 1 pads to 256)")
    timing.add_flags(p)
    args = p.parse_args()
    project(args) if args.project else measure_cpu(args)


if __name__ == "__main__":
    main()
