"""Train or fine-tune the DiT, fully or with LoRA, on precomputed latents and text embeddings.

    python run/train.py --demo                                    # tiny synthetic set, tiny model, CPU
    python run/train.py --data DIR --model ckpts/transformer/480p_t2v --lora --max_steps 2000
    python run/train.py --data DIR --model ckpts/transformer/480p_t2v --mesh fsdp=8 --resume

The data folder format is in hunyuan_tpu/dataset.py (README: Training); run/prepare_dataset.py
makes one from a folder of captioned clips. What a run writes is in hunyuan_tpu/train_loop.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import jax
from jax.experimental import multihost_utils

import sharding
from hunyuan_tpu import attention, parallel
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.dataset import write_dataset
from hunyuan_tpu.files import InputError
from hunyuan_tpu.lora import TARGET_PRESETS, LoRASpec
from hunyuan_tpu.objective import SAMPLINGS, Objective
from hunyuan_tpu.runtime import jax_dtype
from hunyuan_tpu.settings import DTYPES, check_seed, dtype_of, model_config
from hunyuan_tpu.synthetic import training_samples
from hunyuan_tpu.train_loop import RunSettings, train
from hunyuan_tpu.training import OPTIMIZERS, SCHEDULES, OptimizerSettings
from stage_cli import Parser, add_model_flag, finite_float, parse_joining, run_main

# --demo: a 16-sample synthetic set trained on the tiny preset, a few minutes on a 2-core CPU.
DEMO = {"model": "tiny", "dtype": "float32", "max_steps": 150, "learning_rate": 2e-3, "batch_size": 4,
        "warmup_steps": 10, "i2v_prob": 0.3, "text_dropout": 0.1, "checkpoint_every": 50, "validate_every": 50}
DEMO_DATA = {"count": 16, "latent": (3, 4, 6)}


def build_parser() -> Parser:
    p = Parser(description="Train the HunyuanVideo-1.5 DiT (full or LoRA) with optax on a device mesh.",
               epilog="Defaults follow the official trainer (Muon, lr 1e-5, shift 3, log-normal t, i2v 30%, "
               "LoRA r 8 / alpha 16) except the schedule: cosine here, constant there.")
    io = p.add_argument_group("data and output")
    io.add_argument("--data", metavar="DIR", help="dataset folder (dataset.json and safetensors shards)")
    io.add_argument("--output_dir", default="./train_outputs", metavar="DIR",
                    help="checkpoints, metrics, loss curve, validation latents, final weights (default: %(default)s)")
    io.add_argument("--demo", action="store_true", help="write a synthetic dataset into --output_dir/demo_data and "
                    f"train the tiny preset on it ({DEMO['max_steps']} updates unless --max_steps)")
    model = p.add_argument_group("model")
    add_model_flag(model)
    model.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype; masters and optimizer state stay "
                       "float32 (default: bfloat16)")
    model.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True,
                       help="recompute each double block in the backward pass (default: on)")
    objective = p.add_argument_group("objective")
    objective.add_argument("--timestep_sampling", choices=SAMPLINGS, default="lognorm",
                           help="t ~ sigmoid(N(0,1)) or uniform (default: %(default)s)")
    objective.add_argument("--train_shift", type=finite_float, default=3.0, metavar="S",
                           help="timestep shift (default: %(default)s)")
    objective.add_argument("--i2v_prob", type=finite_float, metavar="P",
                           help="share of samples trained as i2v when the "
                           "data has vision_states (default: 0.3)")
    objective.add_argument("--text_dropout", type=finite_float, metavar="P",
                           help="share of samples trained on the empty "
                           "prompt, for CFG (needs empty_prompt.safetensors; default: 0)")
    optimization = p.add_argument_group("optimization")
    optimization.add_argument("--optimizer", choices=OPTIMIZERS, default="muon", help="(default: %(default)s)")
    optimization.add_argument("--learning_rate", type=finite_float, metavar="LR", help="peak rate (default: 1e-5)")
    optimization.add_argument("--weight_decay", type=finite_float, default=0.01, metavar="W",
                              help="(default: %(default)s)")
    optimization.add_argument("--lr_schedule", choices=SCHEDULES, default="cosine",
                              help="after warmup (default: %(default)s)")
    optimization.add_argument("--warmup_steps", type=int, metavar="N", help="linear warmup updates (default: 0)")
    optimization.add_argument("--max_steps", type=int, metavar="N", help="optimizer updates (default: 1000)")
    optimization.add_argument("--batch_size", type=int, metavar="N", help="samples per forward (default: 1)")
    optimization.add_argument("--gradient_accumulation_steps", type=int, default=1, metavar="K",
                              help="forwards per update (default: %(default)s)")
    optimization.add_argument("--max_grad_norm", type=finite_float, default=1.0, metavar="G",
                              help="global-norm clip, 0 off (default: %(default)s)")
    optimization.add_argument("--seed", type=int, default=42, metavar="N",
                              help="data order, noise, init (default: %(default)s)")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora", action="store_true", help="train a LoRA adapter on frozen weights")
    lora.add_argument("--lora_rank", type=int, default=8, metavar="R", help="(default: %(default)s)")
    lora.add_argument("--lora_alpha", type=finite_float, default=16.0, metavar="A",
                      help="scale alpha / r (default: %(default)s)")
    lora.add_argument("--lora_targets", default="double_blocks", metavar="PRESET|REGEX",
                      help=f"linear layers to adapt: {' or '.join(TARGET_PRESETS)} (the official trainer's), or a "
                      "regex over module names (default: %(default)s)")
    devices = p.add_argument_group("devices")
    devices.add_argument("--sharding", choices=sorted(sharding.STRATEGIES),
                         help="strategy (sharding/*.py); default: none on one device, fsdp on several")
    devices.add_argument("--mesh", metavar="SPEC", help="axis sizes over all devices, e.g. fsdp=8, dp=2,fsdp=4, "
                         "dp=2,sp=4 (dp splits the batch)")
    devices.add_argument("--attention", choices=attention.BACKENDS, default="auto",
                         help="attention kernel (default: %(default)s, by platform)")
    run = p.add_argument_group("run")
    run.add_argument("--checkpoint_every", type=int, metavar="N", help="checkpoint every N updates (default: 0, off)")
    run.add_argument("--keep_checkpoints", type=int, default=3, metavar="N", help="newest kept (default: %(default)s)")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output_dir")
    run.add_argument("--validate_every", type=int, metavar="N",
                     help="sample a clip with the current weights every N updates (default: 0, off)")
    run.add_argument("--validation_steps", type=int, default=8, metavar="N",
                     help="its Euler steps (default: %(default)s)")
    return p


def pick(args: argparse.Namespace, key: str, default):
    """The flag if given, else the demo's value under --demo, else the default."""
    value = getattr(args, key)
    if value is not None:
        return value
    return DEMO.get(key, default) if args.demo else default


def demo_data(folder: Path) -> Path:
    """The demo's dataset. On several processes, process 0 writes it first; a host that then still
    sees none (a pod host's own disk) writes the same one."""
    def write() -> None:
        if not (folder / "dataset.json").exists():
            samples, empty = training_samples(model_config("tiny"), count=DEMO_DATA["count"],
                                              latent=DEMO_DATA["latent"], seed=0)
            write_dataset(folder, samples, shard_size=8, empty_prompt=empty)

    if jax.process_index() == 0:
        write()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("demo data written")
        if jax.process_index() != 0:
            write()
    return folder


def settings_from(args: argparse.Namespace, devices: Sequence[jax.Device] | None = None) -> tuple[RunSettings, DiTConfig]:
    if args.data is None and not args.demo:
        raise InputError("--data DIR is required (or --demo for a synthetic set)")
    model = pick(args, "model", "tiny")
    config = model_config(model)
    dtype = dtype_of("dtype", pick(args, "dtype", "bfloat16"))
    for flag in ("batch_size", "max_steps", "validation_steps", "keep_checkpoints", "gradient_accumulation_steps"):
        if pick(args, flag, 1) < 1:
            raise InputError(f"--{flag} must be >= 1")
    for flag in ("checkpoint_every", "validate_every", "warmup_steps"):
        if pick(args, flag, 0) < 0:
            raise InputError(f"--{flag} must be >= 0")
    check_seed("seed", args.seed)
    warmup, max_steps = pick(args, "warmup_steps", 0), pick(args, "max_steps", 1000)
    if warmup > max_steps:
        whose = " (--demo's)" if args.demo and args.warmup_steps is None else ""
        raise InputError(f"--warmup_steps {warmup}{whose} is more than --max_steps {max_steps}: give fewer warmup "
                         "steps or more steps")
    if args.demo and args.data is None and pick(args, "batch_size", 1) > DEMO_DATA["count"]:
        raise InputError(f"--batch_size {pick(args, 'batch_size', 1)} is more than the --demo set's "
                         f"{DEMO_DATA['count']} samples")
    if args.lora and args.lora_alpha <= 0:
        raise InputError(f"--lora_alpha {args.lora_alpha} must be > 0")
    objective = Objective(shift=args.train_shift, sampling=args.timestep_sampling,
                          i2v_prob=pick(args, "i2v_prob", 0.3), text_dropout=pick(args, "text_dropout", 0.0))
    optimizer = OptimizerSettings(
        name=args.optimizer, learning_rate=pick(args, "learning_rate", 1e-5), weight_decay=args.weight_decay,
        schedule=args.lr_schedule, warmup_steps=pick(args, "warmup_steps", 0),
        total_steps=pick(args, "max_steps", 1000), max_grad_norm=args.max_grad_norm)
    lora = LoRASpec(args.lora_rank, args.lora_alpha, args.lora_targets) if args.lora else None
    kernel = attention.kernel(args.attention, dtype=jax_dtype(dtype))
    batch_size = pick(args, "batch_size", 1)
    placement = parallel.placement(config, args.sharding, args.mesh, batch=batch_size,
                                   batch_name="training micro-batch ({batch_size})", default="fsdp", devices=devices)
    output = Path(args.output_dir)  # the demo's data is written only once every flag is known good
    data = demo_data(output / "demo_data") if args.demo and args.data is None else Path(args.data)
    return RunSettings(
        data=data, output_dir=output, model=model, dtype=dtype,
        objective=objective, optimizer=optimizer, lora=lora, batch_size=batch_size,
        accumulation=args.gradient_accumulation_steps, remat=args.gradient_checkpointing, seed=args.seed,
        placement=placement, attention=kernel, checkpoint_every=pick(args, "checkpoint_every", 0),
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, validate_every=pick(args, "validate_every", 0),
        validation_steps=args.validation_steps,
    ), config


def run(args: argparse.Namespace, devices: Sequence[jax.Device] | None = None) -> int:
    settings, config = settings_from(args, devices)
    summary = train(settings, config, log=lambda m: print(m, file=sys.stderr))
    if jax.process_index() == 0:
        mix = ", ".join(f"{name} {count}" for name, count in sorted(summary.buckets.items()))
        print(f"train: compile {summary.compile_s:.2f} s ({summary.compiles} bucket step(s)) | {summary.steps_run} "
              f"updates from {summary.first_step} ({mix}), mean {summary.mean_step_s:.4f} s/update, final loss "
              f"{summary.final_loss:.4f} | total {summary.total_s:.2f} s -> {summary.final}")
    return 0


def main(argv: list[str] | None = None, *, devices: Sequence[jax.Device] | None = None) -> int:
    """The command line, in this process: returns the exit code (2 and one line for bad input)."""
    return run_main(lambda: run(parse_joining(build_parser(), argv), devices))


if __name__ == "__main__":
    sys.exit(main())
