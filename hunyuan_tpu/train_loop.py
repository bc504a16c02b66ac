"""A training run: data in order, one compiled step per bucket, checkpoints, validation, logs.

    <output>/metrics.jsonl        one line per update: step, loss, grad_norm, lr, seconds, bucket
    <output>/loss_curve.png       the loss per update and its running mean
    <output>/checkpoints/         see ``training_checkpoint`` (orbax); ``resume`` continues from the newest
    <output>/validation/          step_<n>.safetensors: latents sampled with the weights at update n
    <output>/final/               full: diffusion_pytorch_model.safetensors + config.json (a
                                  --model for stage 2); LoRA: pytorch_lora_weights.safetensors
                                  (official trainer's name and format; stage 2 --lora)
    <output>/run.json             the settings and what the run measured

On several processes every one runs this loop on its own devices' share; process 0 writes the
logs, the validation latents and the final weights, each tensor gathered alone (the host never
holds the whole model), and every process writes its shards of each checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Mapping

import jax
import numpy as np
import torch
from tqdm import tqdm

from . import lora as lora_lib
from . import pipeline
from . import training_checkpoint as ckpt
from .attention import Kernel, xla_attention
from .checkpoint import WEIGHTS_NAME
from .config import DiTConfig
from .dataset import DataOrder, TrainingData
from .files import InputError, atomic_path, locked_folder, safetensors_writer, save_safetensors, write_json
from .handoff import TEXT_KEYS
from .objective import Objective
from .parallel import Placement
from .params import meta_model, model_params
from .runtime import JaxParams, gather_to_host, jax_dtype
from .scan import stack_blocks
from .training import OptimizerSettings, Trainer, TrainState, step_key

METRICS = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclasses.dataclass(frozen=True)
class RunSettings:
    data: Path
    output_dir: Path
    model: str = "tiny"
    dtype: torch.dtype = torch.bfloat16
    objective: Objective = Objective()
    optimizer: OptimizerSettings = OptimizerSettings()
    lora: lora_lib.LoRASpec | None = None
    batch_size: int = 1
    accumulation: int = 1
    remat: bool = True
    seed: int = 42
    placement: Placement = Placement()
    attention: Kernel = xla_attention
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    resume: bool = False
    validate_every: int = 0
    validation_steps: int = 8
    validation_guidance: float = 6.0
    progress: bool = True

    def fingerprint(self, data: TrainingData) -> str:
        """What fixes the run's trajectory; a resume with anything else different is refused.
        Placement (mesh, strategy, remat, kernel) is not in it: a run may resume on other chips."""
        fixed = {
            "model": self.model, "dtype": str(self.dtype), "objective": dataclasses.asdict(self.objective),
            "optimizer": dataclasses.asdict(self.optimizer),
            "lora": dataclasses.asdict(self.lora) if self.lora else None,
            "batch_size": self.batch_size, "accumulation": self.accumulation, "seed": self.seed,
            "data": data.fingerprint,
        }
        return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass
class Summary:
    steps_run: int
    first_step: int
    final_loss: float
    compile_s: float  # every bucket's step
    mean_step_s: float
    total_s: float
    final: Path
    compiles: int = 0  # steps compiled: one per bucket met
    buckets: dict[str, int] = dataclasses.field(default_factory=dict)  # updates per bucket in this run


class Validation:
    """Samples a short clip from the first training sample's text with the current weights.

    The denoiser is built at the first call and then reused with new weights, so it compiles
    once per run. The negative prompt is the dataset's empty prompt; without one, no CFG.
    """

    def __init__(self, settings: RunSettings, config: DiTConfig, data: TrainingData):
        self.settings, self.config, self.data = settings, config, data
        self.denoiser: pipeline.Denoiser | None = None
        self.shape = data.bucket_of(0).latent_shape[1:]  # the first sample's text, at its own size
        self.noise = pipeline.initial_noise(settings.seed, self.shape)

    def __call__(self, params: JaxParams, step: int, folder: Path, writer: bool) -> None:
        s = self.settings
        if self.denoiser is None:
            sample = self.data.read(np.array([0]))
            empty = self.data.empty_prompt()
            guidance = s.validation_guidance if empty is not None else 1.0
            embeddings = {k: sample[k] for k in TEXT_KEYS}
            for k in list(embeddings):
                embeddings["negative_" + k] = empty[k] if empty is not None else embeddings[k]
            shape = self.shape
            sampling = dataclasses.replace(pipeline.default_sampling(self.config),
                                           num_inference_steps=s.validation_steps, guidance_scale=guidance)
            conditions = pipeline.build_conditions(embeddings, task="t2v", shape=shape, cfg=sampling.cfg)
            self.denoiser = pipeline.Denoiser(self.config, params, conditions, sampling, placement=s.placement,
                                              attention=s.attention)
        self.denoiser.use_params(params)
        latents = pipeline.denoise(self.denoiser, self.noise, progress=False).latents
        if writer:
            folder.mkdir(parents=True, exist_ok=True)
            save_safetensors({"latents": torch.from_numpy(np.array(latents))}, folder / f"step_{step:06d}.safetensors",
                             metadata={"step": str(step)})


def _read_metrics(path: Path, upto: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def plot_loss(rows: list[dict], path: Path, title: str) -> None:
    """Loss per update (thin) and its running mean over ~5% of the run."""
    import matplotlib  # imported here: a second or so, only when there is a curve to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    window = max(1, len(loss) // 20)
    mean = np.convolve(loss, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, loss, lw=0.8, alpha=0.4, label="loss")
    ax.plot(steps[window - 1:], mean, lw=2, label=f"mean of {window}")
    ax.set(xlabel="update", ylabel="flow-matching loss (MSE)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def _export(arrays: Mapping[str, jax.Array], dtype: np.dtype, path: Path, metadata: dict[str, str] | None,
            writer: bool) -> None:
    """``arrays`` cast to ``dtype`` into one safetensors file, one tensor at a time: every process
    takes part in gathering each tensor, the ``writer`` writes it, and no host ever holds more
    than one."""
    layout = {k: (v.shape, dtype) for k, v in arrays.items()}
    with safetensors_writer(path, layout, metadata) if writer else contextlib.nullcontext() as write:
        for name, array in arrays.items():
            host = gather_to_host(array).astype(dtype)
            if writer:
                write(name, host)
            del host


def _write_final(settings: RunSettings, config: DiTConfig, trainable: Mapping[str, jax.Array], folder: Path,
                 writer: bool) -> Path:
    """The weights a user takes away: the LoRA adapter in the official trainer's format, or a
    ``--model`` folder for stage 2 (config.json and the weights in the run's dtype)."""
    if writer:
        folder.mkdir(parents=True, exist_ok=True)
    if settings.lora is not None:
        path = folder / LORA_WEIGHTS
        _export(trainable, np.dtype(np.float32), path, lora_lib.adapter_metadata(trainable, settings.lora), writer)
        return path
    _export(trainable, np.dtype(jax_dtype(settings.dtype)), folder / WEIGHTS_NAME, None, writer)
    if writer:
        write_json(folder / "config.json", config.to_official_dict())
    return folder


@dataclasses.dataclass
class _Session:
    """One run's state between its phases: the data, the trainer, the device state, where it is."""

    data: TrainingData
    order: DataOrder
    trainer: Trainer
    state: TrainState
    frozen: JaxParams
    fingerprint: str
    step: int = 0
    position: int = 0
    rows: list[dict] = dataclasses.field(default_factory=list)


def _build(s: RunSettings, config: DiTConfig, log: Callable[[str], None]) -> _Session:
    """The data, the trainer and the state on device at update 0."""
    data = TrainingData(s.data, config)
    order = DataOrder(data.bucket_sizes, s.batch_size * s.accumulation, s.seed)
    if s.objective.text_dropout > 0 and data.empty_prompt() is None:
        raise InputError(f"{{text_dropout}} {s.objective.text_dropout} needs {s.data}/empty_prompt.safetensors "
                         "(the stage-1 encoding of the empty prompt)")
    trainer = Trainer(config, s.objective, s.optimizer, compute_dtype=jax_dtype(s.dtype), lora=s.lora,
                      placement=s.placement, remat=s.remat, micro_batch=s.batch_size, accumulation=s.accumulation,
                      attention=s.attention)
    if not Path(s.model).exists():
        log(f"model {s.model}: seeded random weights (no checkpoint)")
    base_dtype = torch.float32 if s.lora is None else s.dtype
    base = model_params(s.model, config, base_dtype, trainer.base_shardings)
    if s.lora is None:
        trainable, frozen = base, {}
    else:
        trainable = {k: v.numpy() for k, v in lora_lib.init_adapter(meta_model(config), s.lora, s.seed).items()}
        frozen = stack_blocks(base, donate=True)  # once, outside the step (the step would copy them each time)
    return _Session(data, order, trainer, trainer.init_state(trainable), frozen, s.fingerprint(data))


def _resume(s: RunSettings, run: _Session, checkpoints: ckpt.Checkpoints, log: Callable[[str], None]) -> None:
    """Continue from the newest checkpoint (``resume``), or refuse to overwrite one."""
    step = checkpoints.latest()
    if step is not None and not s.resume:
        raise InputError(f"{checkpoints.path(step)}: a checkpoint of an earlier run; pass {{resume}} to continue it, "
                         "or choose another {output_dir}")
    if step is None:
        if s.resume:
            log(f"no checkpoint in {checkpoints.folder}: starting from update 0")
        return
    found = checkpoints.path(step)
    saved = checkpoints.read_position(step)
    if saved.fingerprint != run.fingerprint:
        raise InputError(f"{found}: saved by a run with other settings or data; drop {{resume}} or use "
                         "another {output_dir}")
    run.state = TrainState(*checkpoints.restore(step, run.state.trainable, run.state.opt_state))
    run.step, run.position = saved.step, saved.data_position
    log(f"resuming at update {run.step} of {s.optimizer.total_steps} from {found}")


def _describe_data(run: _Session, log: Callable[[str], None]) -> None:
    log("data: " + ", ".join(f"{b.name} ({b.samples})" for b in run.data.buckets)
        + f" -> {run.order.per_epoch} updates per epoch")
    for bucket in run.data.buckets:
        if bucket.samples < run.order.batch:
            log(f"warning: bucket {bucket.name} has {bucket.samples} samples, fewer than an update's "
                f"{run.order.batch}: not trained on")


def _start_metrics(out: Path, run: _Session, writer: bool) -> None:
    """metrics.jsonl as of the run's update: a resumed run drops what the interrupted one
    logged after its last checkpoint."""
    path = out / METRICS
    run.rows = _read_metrics(path, run.step) if run.step else []
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{METRICS}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in run.rows))
        tmp.replace(path)


@dataclasses.dataclass
class _Batch:
    bucket: str
    arrays: dict


def _next_batch(run: _Session, position: int) -> _Batch:
    indices = run.order.indices(position)
    return _Batch(run.data.bucket_of(int(indices[0])).name, run.trainer.place_batch(run.data.read(indices)))


def _loop(s: RunSettings, config: DiTConfig, run: _Session, checkpoints: ckpt.Checkpoints, empty: dict | None,
          writer: bool) -> tuple[list[float], list[float]]:
    """The updates from ``run.step`` to the last; returns each one's seconds and each compile's
    (a bucket's step compiles before that bucket's first update, outside its seconds)."""
    out, trainer = Path(s.output_dir), run.trainer
    metrics_path = out / METRICS
    validation = Validation(s, config, run.data)
    title = f"{'LoRA' if s.lora else 'full'} training of {Path(s.model).name}, {s.optimizer.name}"
    seconds, compiles = [], []
    batch = _next_batch(run, run.position)
    bar = tqdm(total=s.optimizer.total_steps, initial=run.step, desc="train", unit="update",
               disable=not (writer and s.progress))
    with bar, open(metrics_path, "a") if writer else open(os.devnull, "w") as metrics_file:
        while run.step < s.optimizer.total_steps:
            if not trainer.compiled_for(batch.arrays):
                begin = time.perf_counter()
                trainer.compile(run.state, run.frozen, batch.arrays, empty)
                compiles.append(time.perf_counter() - begin)
            begin = time.perf_counter()
            run.state, metrics = trainer.step(run.state, run.frozen, batch.arrays, empty, step_key(s.seed, run.step))
            bucket = batch.bucket
            if run.step + 1 < s.optimizer.total_steps:  # read the next batch while the step runs
                batch = _next_batch(run, run.position + 1)
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
            seconds.append(time.perf_counter() - begin)
            if not math.isfinite(loss):
                checkpoints.wait()  # the one being written completes
                last = checkpoints.latest()
                kept = f"The last checkpoint, {checkpoints.path(last)}, is intact." if last else \
                    "No checkpoint was written."
                raise InputError(f"update {run.step + 1}: the loss is {loss}; stopping. {kept} Check the data for "
                                 "extreme values or lower {learning_rate}.")
            run.step, run.position = run.step + 1, run.position + 1
            row = {"step": run.step, "loss": loss, "grad_norm": grad_norm,
                   "lr": float(trainer.schedule(run.step - 1)), "seconds": round(seconds[-1], 4), "bucket": bucket}
            run.rows.append(row)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", s_per_update=f"{seconds[-1]:.3f}")
            bar.update()
            if s.checkpoint_every and run.step % s.checkpoint_every == 0 and run.step < s.optimizer.total_steps:
                checkpoints.save(ckpt.RunPosition(run.step, run.position, s.seed, run.fingerprint),
                                 run.state.trainable, run.state.opt_state)
                if writer:
                    plot_loss(run.rows, out / LOSS_CURVE, title)
            if s.validate_every and (run.step % s.validate_every == 0 or run.step == s.optimizer.total_steps):
                validation(trainer.inference_params(run.state, run.frozen), run.step, out / "validation", writer)
    if writer and run.rows:
        plot_loss(run.rows, out / LOSS_CURVE, title)
    return seconds, compiles


def _run_record(s: RunSettings, summary: Summary) -> dict:
    """run.json: the settings and what the run measured."""
    return {
        "settings": {"data": str(s.data), "model": s.model, "dtype": str(s.dtype).removeprefix("torch."),
                     "objective": dataclasses.asdict(s.objective), "optimizer": dataclasses.asdict(s.optimizer),
                     "lora": dataclasses.asdict(s.lora) if s.lora else None, "batch_size": s.batch_size,
                     "gradient_accumulation_steps": s.accumulation, "gradient_checkpointing": s.remat,
                     "seed": s.seed, "sharding": s.placement.strategy.name if s.placement.strategy else None,
                     "mesh": s.placement.sizes},
        "summary": {**dataclasses.asdict(summary), "final": str(summary.final),
                    "devices": {"count": s.placement.mesh.size if s.placement.mesh else 1,
                                "platform": jax.devices()[0].platform}},
    }


def train(settings: RunSettings, config: DiTConfig, log: Callable[[str], None] = print) -> Summary:
    """Run (or resume) the training described by ``settings`` for ``config``."""
    started = time.perf_counter()
    s, out = settings, Path(settings.output_dir)
    writer = jax.process_index() == 0
    run = _build(s, config, log)
    with contextlib.ExitStack() as stack:
        checkpoints = stack.enter_context(ckpt.Checkpoints(out / "checkpoints", s.keep_checkpoints))
        _resume(s, run, checkpoints, log)
        _describe_data(run, log)
        # from here on the run writes into its folder: another run there is refused, a killed one's temporaries go
        if writer:
            stack.enter_context(locked_folder(out))
        return _run(s, config, run, checkpoints, writer, started)


def _run(s: RunSettings, config: DiTConfig, run: _Session, checkpoints: ckpt.Checkpoints, writer: bool,
         started: float) -> Summary:
    """From the run's update to the last, then the final weights and run.json."""
    out = Path(s.output_dir)
    _start_metrics(out, run, writer)
    empty = run.data.empty_prompt()
    if empty is not None:
        empty = jax.device_put(empty, s.placement.replicated) if s.objective.text_dropout > 0 else None
    first = run.step
    seconds, compiles = _loop(s, config, run, checkpoints, empty, writer)
    final = _write_final(s, config, run.state.trainable, out / "final", writer)
    mix: dict[str, int] = {}
    for row in run.rows:
        if row["step"] > first:
            mix[row["bucket"]] = mix.get(row["bucket"], 0) + 1
    summary = Summary(
        steps_run=len(seconds), first_step=first, final_loss=run.rows[-1]["loss"] if run.rows else float("nan"),
        compile_s=sum(compiles), mean_step_s=float(np.mean(seconds)) if seconds else 0.0,
        total_s=time.perf_counter() - started, final=final, compiles=len(compiles), buckets=mix,
    )
    if writer:
        write_json(out / "run.json", _run_record(s, summary))
    return summary
