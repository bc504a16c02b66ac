"""One jitted training step: forward, flow-matching loss, gradients and the optax update.

What is trained is either every parameter (float32 master weights, cast to the compute dtype
inside the step) or a LoRA adapter on frozen base weights held in the compute dtype; either
way the optimizer state is float32 and lives where its parameters live: placed by the same
sharding strategy tables as inference (fsdp by default for training), with the batch split
over ``dp`` and the activations laid out as the strategy says. Gradient accumulation is a
scan over micro-batches inside the step, so one call is one optimizer update and the step
compiles once per run.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from . import lora as lora_lib
from . import objective as obj
from . import parallel
from .attention import Kernel, xla_attention
from .config import DiTConfig
from .files import InputError
from .params import meta_model
from .runtime import JaxParams, functional, rematerialized, tracing
from .scan import scanned_blocks, stack_blocks

OPTIMIZERS = ("muon", "adamw")
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """Muon as the official trainer sets it up, or AdamW; a warmup then cosine or constant rate.

    The official trainer's schedule is constant (its warmup setting has no effect there);
    cosine decays to 0 at ``total_steps``.
    """

    name: str = "muon"
    learning_rate: float = 1e-5
    weight_decay: float = 0.01
    schedule: str = "cosine"
    warmup_steps: int = 0
    total_steps: int = 1000
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise InputError(f"{{optimizer}} {self.name!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"{{lr_schedule}} {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.learning_rate <= 0 or self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise InputError("need {learning_rate} > 0, {max_steps} >= 1 and 0 <= {warmup_steps} <= {max_steps}")
        for name, value in (("max_grad_norm", self.max_grad_norm), ("weight_decay", self.weight_decay)):
            if value < 0:  # a negative clip would silently turn clipping off
                raise InputError(f"{{{name}}} {value} must be >= 0 (0: off)")


def learning_rate(settings: OptimizerSettings) -> optax.Schedule:
    """Linear warmup from 0, then constant or a cosine decay to 0 at the last step."""
    if settings.schedule == "constant":
        main = optax.constant_schedule(settings.learning_rate)
    else:
        main = optax.cosine_decay_schedule(settings.learning_rate, max(settings.total_steps - settings.warmup_steps, 1))
    if settings.warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, settings.learning_rate, settings.warmup_steps)
    return optax.join_schedules([warmup, main], [settings.warmup_steps])


def _muon_dims(params: JaxParams) -> dict[str, Any]:
    """Every parameter of 2+ dimensions gets Muon (as the official optimizer): torch stores
    (out, in, ...), so the output axis is 0 and the rest are reduced; 1-D ones get AdamW."""
    # optax also calls this on its masked view of the tree, where non-Muon leaves are MaskedNode
    return {name: optax.contrib.MuonDimensionNumbers(reduction_axis=tuple(range(1, p.ndim)), output_axis=0)
            if getattr(p, "ndim", 0) >= 2 else None for name, p in params.items()}


def make_optimizer(settings: OptimizerSettings) -> optax.GradientTransformation:
    """Global-norm clipping, then Muon or AdamW on the schedule.

    Muon as the official ``get_muon_optimizer``: momentum 0.95 with Nesterov, 5 Newton-Schulz
    steps, updates scaled by 0.2 sqrt(max(out, in)), decoupled weight decay at the plain
    rate; its AdamW side (1-D parameters) uses betas (0.95, 0.95) and the same weight decay.
    One difference: optax applies the Nesterov flag to that AdamW side too (NAdam-style
    momentum), where the official one has none.
    """
    rate = learning_rate(settings)
    if settings.name == "muon":
        update = optax.contrib.muon(
            rate, beta=0.95, nesterov=True, ns_steps=5, weight_decay=settings.weight_decay, consistent_rms=0.2,
            adam_b1=0.95, adam_b2=0.95, adam_weight_decay=settings.weight_decay,
            muon_weight_dimension_numbers=_muon_dims,
        )
    else:
        update = optax.adamw(rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=settings.weight_decay)
    if settings.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(settings.max_grad_norm), update)
    return update


def accumulate(value_and_grad: Callable, params: Any, batch: dict, key: jax.Array, micro_batches: int) -> tuple:
    """The mean (loss, gradients) of ``value_and_grad(params, part, key_i)`` over ``batch`` cut
    into ``micro_batches`` equal parts along its first axis, one part at a time (a scan), so
    only one micro-batch's activations are alive at once. One part: a plain call with ``key``."""
    if micro_batches == 1:
        return value_and_grad(params, batch, key)
    parts = jax.tree.map(lambda x: x.reshape(micro_batches, -1, *x.shape[1:]), batch)

    def add(total, xs):
        part, k = xs
        return jax.tree.map(jnp.add, total, value_and_grad(params, part, k)), None

    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    total, _ = jax.lax.scan(add, zero, (parts, jax.random.split(key, micro_batches)))
    return jax.tree.map(lambda x: x / micro_batches, total)


class TrainState(NamedTuple):
    trainable: JaxParams  # float32: all parameters, or the LoRA adapter
    opt_state: Any


def state_shardings(abstract_state: Any, params: Mapping[str, jax.Array], replicated: NamedSharding) -> Any:
    """Optimizer state placed like its parameters: a leaf kept under a parameter's name (optax
    mirrors the parameter dict) with that parameter's shape takes its sharding; step counters
    and the like are replicated."""

    def place(path, leaf):
        names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey) and p.key in params]
        if names and leaf.shape == params[names[-1]].shape:
            return params[names[-1]].sharding
        return replicated

    return jax.tree_util.tree_map_with_path(place, abstract_state)


class Trainer:
    """A model, its objective and optimizer, on a mesh or one device, with the step compiled once
    per batch shape (a bucket of the data).

    ``lora`` trains an adapter (``lora_lib.init_adapter`` names) on frozen base weights;
    otherwise every parameter trains. ``micro_batch`` samples go through the model at a time
    and ``accumulation`` of them make one update, so a step takes ``micro_batch *
    accumulation`` samples. ``remat`` recomputes each double block in the backward pass.
    """

    def __init__(
        self,
        config: DiTConfig,
        objective: obj.Objective,
        optimizer: OptimizerSettings,
        *,
        compute_dtype=jnp.bfloat16,
        lora: lora_lib.LoRASpec | None = None,
        placement: parallel.Placement = parallel.Placement(),
        remat: bool = True,
        micro_batch: int = 1,
        accumulation: int = 1,
        attention: Kernel = xla_attention,
    ):
        if micro_batch < 1 or accumulation < 1:
            raise InputError("{batch_size} and {gradient_accumulation_steps} must be >= 1")
        self.config, self.objective, self.placement = config, objective, placement
        self.compute_dtype, self.lora = compute_dtype, lora
        self.micro_batch, self.accumulation, self.attention = micro_batch, accumulation, attention
        self.tx = make_optimizer(optimizer)
        self.schedule = learning_rate(optimizer)
        self.shapes = parallel.param_shapes(config)
        execution = dataclasses.replace(placement.execution, scope=jax.named_scope, run_blocks=scanned_blocks,
                                        checkpoint=rematerialized if remat else placement.execution.checkpoint)
        model = meta_model(config, execution)
        if lora is not None:
            lora_lib.with_lora(model, dict.fromkeys(lora_lib.target_layers(model, lora), lora.rank), lora.scale)
        self.apply = functional(model)
        self._compiled: dict[tuple, Callable] = {}

    # ---- placement ---------------------------------------------------------------------------

    @property
    def base_shardings(self) -> dict[str, NamedSharding | None]:
        """Where each of the model's weights lives: the strategy's tables."""
        return {name: self.placement.param(name) for name in self.shapes}

    def trainable_shardings(self, trainable: Mapping[str, Any]) -> dict[str, NamedSharding | None]:
        """Full training: the strategy's tables. LoRA: the adapter is small, so every device holds it."""
        if self.lora is None:
            return {name: self.placement.param(name) for name in trainable}
        return dict.fromkeys(trainable, self.placement.replicated)

    def init_state(self, trainable: Mapping[str, Any]) -> TrainState:
        """Place float32 ``trainable`` values (host or device arrays) and make the optimizer state."""
        shardings = self.trainable_shardings(trainable)
        trainable = {k: jax.device_put(jnp.asarray(v, jnp.float32), shardings[k]) for k, v in trainable.items()}
        opt_shardings = None
        if self.placement.mesh is not None:
            opt_shardings = jax.tree.map(lambda a: a.sharding, self.abstract_state(trainable).opt_state)
        opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(trainable)
        return TrainState(trainable, opt_state)

    def abstract_state(self, trainable: Mapping[str, Any]) -> TrainState:
        """Shapes, dtypes and placements of the state for ``trainable`` (anything with shapes),
        without making it: for compiling ahead of time, or projecting memory."""
        shardings = self.trainable_shardings(trainable)
        params = {k: jax.ShapeDtypeStruct(tuple(v.shape), jnp.float32, sharding=shardings[k])
                  for k, v in trainable.items()}
        opt = jax.eval_shape(self.tx.init, params)
        if self.placement.mesh is not None:
            placed = state_shardings(opt, params, self.placement.replicated)
            opt = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), opt, placed)
        return TrainState(params, opt)

    @property
    def base_dtype(self):
        """The dtype to load the model's weights in: float32 masters when they train, the
        compute dtype when they are a LoRA run's frozen base."""
        return jnp.float32 if self.lora is None else self.compute_dtype

    def place_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Host arrays of the whole batch on device, samples split over ``dp``; on several hosts
        each process holds the whole batch and places only its devices' slices."""
        sharding = self.placement.batch
        if sharding is None:
            return {k: jax.device_put(v) for k, v in batch.items()}
        return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
                for k, v in batch.items()}

    # ---- the step ----------------------------------------------------------------------------

    def forward_params(self, trainable: JaxParams, frozen: JaxParams) -> JaxParams:
        """What the forward takes: the frozen base and the trainable part, in the compute dtype."""
        return {**frozen, **{k: v.astype(self.compute_dtype) for k, v in trainable.items()}}

    def loss(self, trainable: JaxParams, frozen: JaxParams, batch: dict, empty_prompt: dict | None,
             key: jax.Array) -> jax.Array:
        """The objective on one micro-batch."""
        # a one-frame sample (an image) is always t2v, as in the official trainer: its first frame is all of it
        i2v_capable = "vision_states" in batch and batch["latents"].shape[2] > 1
        d = obj.draw(key, self.objective, batch["latents"].shape, i2v_capable=i2v_capable)
        inputs = obj.model_inputs(batch, d, empty_prompt if self.objective.text_dropout > 0 else None,
                                  self.compute_dtype)
        prediction = self.apply(self.forward_params(trainable, frozen), **inputs)
        return obj.velocity_loss(prediction, batch["latents"], d)

    def gradients(self, trainable: JaxParams, frozen: JaxParams, batch: dict, empty_prompt: dict | None,
                  key: jax.Array) -> tuple[jax.Array, JaxParams]:
        """Loss and gradients over the step's ``accumulation`` micro-batches (their means)."""
        value_and_grad = jax.value_and_grad(
            lambda params, part, k: self.loss(params, frozen, part, empty_prompt, k))
        return accumulate(value_and_grad, trainable, batch, key, self.accumulation)

    def _step(self, state: TrainState, frozen: JaxParams, batch: dict, empty_prompt: dict | None,
              key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        loss, grads = self.gradients(state.trainable, frozen, batch, empty_prompt, key)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        return TrainState(trainable, opt_state), {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    @staticmethod
    def _signature(batch: Mapping[str, Any]) -> tuple:
        return tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))

    def compiled_for(self, batch: Mapping[str, Any]) -> bool:
        """Whether a batch of this shape has its step compiled already."""
        return self._signature(batch) in self._compiled

    def compile(self, state: TrainState, frozen: JaxParams, batch: dict, empty_prompt: dict | None) -> Callable:
        """Trace and compile the step for these placements and this batch shape (once per run
        and bucket); returns it."""
        out_shardings = None
        if self.placement.mesh is not None:
            shardings = TrainState(*jax.tree.map(lambda x: x.sharding, tuple(state)))
            out_shardings = (shardings, self.placement.replicated)
        step = jax.jit(self._step, donate_argnums=0, out_shardings=out_shardings, keep_unused=True)
        with tracing(self.placement.mesh, self.attention):
            compiled = step.lower(state, frozen, batch, empty_prompt, jax.random.key(0)).compile()
        self._compiled[self._signature(batch)] = compiled
        return compiled

    def step(self, state: TrainState, frozen: JaxParams, batch: dict, empty_prompt: dict | None,
             key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer update on ``micro_batch * accumulation`` placed samples; ``state`` is donated."""
        compiled = self._compiled.get(self._signature(batch)) or self.compile(state, frozen, batch, empty_prompt)
        return compiled(state, frozen, batch, empty_prompt, key)

    # ---- what training produces --------------------------------------------------------------

    def inference_params(self, state: TrainState, frozen: JaxParams) -> JaxParams:
        """The model's weights after training, in the compute dtype and placed as the strategy
        says: the trained weights, or the frozen base with the adapter merged."""
        if self.lora is None:  # stacked by layer (as the denoiser takes them) in the cast's copy
            return stack_blocks(state.trainable, dtype=self.compute_dtype)
        merge = functools.partial(lora_lib.merge, scale=self.lora.scale)
        out_shardings = None if self.placement.mesh is None else {k: v.sharding for k, v in frozen.items()}
        return jax.jit(merge, out_shardings=out_shardings)(frozen, state.trainable)


def step_key(seed: int, step: int) -> jax.Array:
    """The step's random key: a function of the run's seed and the step alone, so a resumed run
    draws exactly what an uninterrupted one would."""
    return jax.random.fold_in(jax.random.key(seed), step)
