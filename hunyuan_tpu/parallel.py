"""Meshes from spec strings, and the one place where a sharding strategy's tables are applied.

A mesh spec names axis sizes, e.g. ``tp=8``, ``fsdp=8``, ``dp=2,tp=4``, ``dp=2,sp=4``; the mesh
always has the four axes (dp, fsdp, sp, tp), unnamed ones of size 1.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Iterable, Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from torchax import interop

import sharding
from sharding import MESH_AXES, Strategy

from .config import DiTConfig
from .files import InputError
from .model import Execution
from .params import meta_model


def parse_mesh_spec(text: str) -> dict[str, int]:
    """``"dp=2,tp=4"`` -> {"dp": 2, "fsdp": 1, "sp": 1, "tp": 4}."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\w+)=(\d+)", part)
        if not m:
            raise InputError(f"{{mesh}} {text!r}: {part!r} is not AXIS=SIZE (axes: {', '.join(MESH_AXES)})")
        axis, size = m.group(1), int(m.group(2))
        if axis not in sizes:
            raise InputError(f"{{mesh}} {text!r}: unknown axis {axis!r} (axes: {', '.join(MESH_AXES)})")
        if axis in seen or size < 1:
            raise InputError(f"{{mesh}} {text!r}: axis {axis} given twice or with size < 1")
        seen.add(axis)
        sizes[axis] = size
    if not seen:
        raise InputError(f"{{mesh}} {text!r}: empty (e.g. tp=8 or dp=2,sp=4)")
    return sizes


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices; ``Auto`` axes, as row-parallel layouts need."""
    devices = jax.devices() if devices is None else list(devices)
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        spec = ",".join(f"{a}={sizes[a]}" for a in MESH_AXES if sizes[a] > 1) or "1 device"
        raise InputError(f"{{mesh}} {spec}: uses {math.prod(shape)} devices, but {len(devices)} are available")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def default_mesh_sizes(strategy: Strategy, device_count: int) -> dict[str, int]:
    """All devices on the strategy's main (last) axis, e.g. tp=8 for tp, sp=8 for sp."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    sizes[strategy.axes[-1]] = device_count
    return sizes


def choose_layout(
    name: str | None, sizes: Mapping[str, int] | None, device_count: int, default: str
) -> tuple[Strategy, dict[str, int]] | None:
    """The strategy and mesh sizes for a strategy ``name`` and mesh ``sizes`` (either may be
    None), or None for a single device without a mesh. Without a name: the strategy whose axis
    the mesh splits, else ``default``; without sizes: every device on the strategy's own axis."""
    if name is None and sizes is None and device_count == 1:
        return None
    if name is None and sizes is None:
        name = default
    elif name is None:
        used = [a for a in ("fsdp", "sp", "tp") if sizes[a] > 1]
        name = {"fsdp": "fsdp", "sp": "sp", "tp": "tp_fc2_replicated"}[used[0]] if used else "replicated"
    if name not in sharding.STRATEGIES:
        raise InputError(f"{{sharding}} {name!r} is not one of {', '.join(sharding.STRATEGIES)}")
    strategy = sharding.get(name)
    return strategy, dict(sizes) if sizes else default_mesh_sizes(strategy, device_count)


def _rule(strategy: Strategy, name: str) -> tuple[str, P] | None:
    """The first (regex, spec) of ``strategy``'s table that matches all of ``name``."""
    return next(((pattern, spec) for pattern, spec in strategy.params if re.fullmatch(pattern, name)), None)


def param_spec(strategy: Strategy, name: str) -> P:
    rule = _rule(strategy, name)
    return P() if rule is None else rule[1]


@dataclasses.dataclass(frozen=True)
class Coverage:
    """What a strategy's parameter table does to a model: the rules that match no parameter
    (a misspelt regex shards nothing, silently), and how many parameters it leaves whole."""

    unmatched_rules: tuple[str, ...]
    whole: int
    total: int


def coverage(strategy: Strategy, names: Iterable[str]) -> Coverage:
    """Which of ``strategy``'s rules match none of ``names``, and how many names no rule splits."""
    rules = [_rule(strategy, name) for name in names]
    hit = {rule[0] for rule in rules if rule is not None}
    whole = sum(rule is None or all(axes is None for axes in rule[1]) for rule in rules)
    return Coverage(tuple(p for p, _ in strategy.params if p not in hit), whole, len(rules))


def param_shardings(strategy: Strategy, mesh: Mesh, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, NamedSharding]:
    return {name: NamedSharding(mesh, param_spec(strategy, name)) for name in shapes}


def _divides(spec: P, shape: tuple[int, ...], mesh: Mesh) -> str | None:
    for dim, axes in zip(shape, spec):
        if axes is None:
            continue
        n = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
        if dim % n:
            return f"dimension {dim} is not divisible by {n}"
    return None


CFG_BATCH = "CFG batch (guidance_scale <= 1 gives 1 sample)"


def check_fit(
    strategy: Strategy, mesh: Mesh, config: DiTConfig, shapes: Mapping[str, tuple[int, ...]], batch: int,
    batch_name: str = CFG_BATCH,
) -> None:
    """Raise an InputError naming the first thing that keeps ``strategy`` from running on ``mesh``
    for a ``batch`` of samples (``batch_name`` says which batch, for the message)."""
    unused = [f"{a}={mesh.shape[a]}" for a in MESH_AXES if mesh.shape[a] > 1 and a not in strategy.axes]
    if unused:
        raise InputError(
            f"{{mesh}} axis {', '.join(unused)} is not used by strategy {strategy.name} (its axes: "
            f"{', '.join(strategy.axes)}); those devices would only repeat the same work"
        )
    head_split = math.prod(mesh.shape[a] for a in MESH_AXES if a != "dp")
    if config.heads_num % head_split:
        raise InputError(
            f"{{mesh}}: attention splits the {config.heads_num} heads over {head_split} devices "
            f"(every axis but dp); heads_num must be divisible by it"
        )
    if batch % mesh.shape["dp"]:
        raise InputError(
            f"{{mesh}} dp={mesh.shape['dp']} splits the batch into equal parts, but the {batch_name} has "
            f"{batch} sample(s)"
        )
    for name, shape in shapes.items():
        problem = _divides(param_spec(strategy, name), shape, mesh)
        if problem:
            raise InputError(f"strategy {strategy.name} on this mesh: parameter {name} {tuple(shape)}: {problem}")


def device_memory(device: jax.Device) -> int:
    """Bytes one device can hold: the accelerator's limit, or this host's memory for a CPU device."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def weight_bytes(placement: Placement, shapes: Mapping[str, tuple[int, ...]], dtype_bytes: int) -> int:
    """One device's share of the weights: each parameter as its sharding splits it (whole without a mesh)."""
    return sum(dtype_bytes * math.prod(placement.params[k].shard_shape(s) if k in placement.params else s)
               for k, s in shapes.items())


def check_memory(config: DiTConfig, placement: Placement, latent_shape: tuple[int, int, int], batch: int,
                 dtype_bytes: int, device: jax.Device) -> None:
    """Refuse, before anything is compiled, a step that cannot fit on ``device``: its share of the
    weights plus a lower bound on the activations (the image stream in and out of a block and one
    projection of it) against the device's memory. What XLA allocates is more, never less."""
    weights = weight_bytes(placement, param_shapes(config), dtype_bytes)
    tokens = math.prod(n // p for n, p in zip(latent_shape, config.patch_size))
    dp = (placement.sizes or {}).get("dp", 1)
    per_device = -(-tokens // placement.execution.token_multiple) * -(-batch // dp)
    activations = 3 * per_device * config.hidden_size * dtype_bytes
    limit = device_memory(device)
    if weights + activations > limit:
        raise InputError(
            f"the step needs at least {(weights + activations) / 1e9:,.1f} GB per device ({weights / 1e9:,.1f} GB of "
            f"weights, {activations / 1e9:,.1f} GB of activations for {tokens:,} video tokens), the device has "
            f"{limit / 1e9:,.1f} GB: use a shorter {{video_length}} or a smaller canvas, a {{sharding}} that splits "
            f"the tokens (sp), or more devices")


def param_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, from a model on the meta device (no memory)."""
    return {name: tuple(t.shape) for name, t in meta_model(config).state_dict().items()}


def execution(strategy: Strategy, mesh: Mesh) -> Execution:
    """The model's layout hook and token padding for ``strategy`` on ``mesh``."""
    shardings = {name: NamedSharding(mesh, spec) for name, spec in strategy.activations.items()}

    def layout(x, name: str):
        sharding = shardings.get(name)
        return x if sharding is None else interop.call_jax(jax.lax.with_sharding_constraint, x, sharding)

    return Execution(layout=layout, token_multiple=math.prod(mesh.shape[a] for a in strategy.token_axes))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one run's model lives, built once by ``placement`` and handed to the pipeline, the
    trainer, the benchmarks and the tests: the mesh, the strategy, each parameter's sharding,
    and the model's ``Execution`` (layout hook, token multiple). The default is one device
    without a mesh, where every sharding is None and the model runs as plain ops."""

    mesh: Mesh | None = None
    strategy: Strategy | None = None
    params: Mapping[str, NamedSharding] = dataclasses.field(default_factory=dict)
    execution: Execution = Execution()

    @property
    def sizes(self) -> dict[str, int] | None:
        """The mesh's axis sizes, or None on one device."""
        return None if self.mesh is None else dict(self.mesh.shape)

    @property
    def mesh_spec(self) -> str | None:
        """The mesh as a spec string (``tp=8``; ``1`` for a one-device mesh), None without one."""
        if self.mesh is None:
            return None
        return ",".join(f"{a}={n}" for a, n in self.mesh.shape.items() if n > 1) or "1"

    @property
    def replicated(self) -> NamedSharding | None:
        """On every device of the mesh: latents, conditions and other small arrays."""
        return None if self.mesh is None else NamedSharding(self.mesh, P())

    @property
    def batch(self) -> NamedSharding | None:
        """Samples split over ``dp``; the model's layouts take it from there."""
        return None if self.mesh is None else NamedSharding(self.mesh, P("dp"))

    def param(self, name: str) -> NamedSharding | None:
        return self.params.get(name)

    def activation(self, name: str) -> NamedSharding | None:
        """Where a named activation lives between steps; replicated where the strategy leaves it to XLA."""
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, self.strategy.activations.get(name, P()))


def placement(
    config: DiTConfig,
    strategy: str | None = None,
    mesh: str | Mapping[str, int] | None = None,
    *,
    batch: int,
    batch_name: str = CFG_BATCH,
    default: str = "tp_fc2_replicated",
    devices: Sequence[jax.Device] | None = None,
) -> Placement:
    """The placement of ``config`` for a ``strategy`` name and a ``mesh`` (spec string or axis
    sizes) over ``devices`` (default: all), checked to fit a ``batch`` of samples.

    Without a strategy: the one whose axis the mesh splits, else ``default``; without a mesh:
    every device on the strategy's own axis; neither on one device: no mesh at all.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(mesh) if isinstance(mesh, str) else mesh
    if sizes is not None:
        sizes = {**dict.fromkeys(MESH_AXES, 1), **sizes}
    layout = choose_layout(strategy, sizes, len(devices), default)
    if layout is None:
        return Placement()
    chosen, sizes = layout
    built = make_mesh(sizes, devices)
    shapes = param_shapes(config)
    check_fit(chosen, built, config, shapes, batch, batch_name)
    return Placement(built, chosen, param_shardings(chosen, built, shapes), execution(chosen, built))


def multi_host(environ: Mapping[str, str]) -> bool:
    """Whether the environment describes a multi-process JAX job (TPU pod slice, SLURM, MPI, explicit)."""
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    return (
        bool(environ.get("JAX_COORDINATOR_ADDRESS"))
        or bool(environ.get("MEGASCALE_COORDINATOR_ADDRESS"))
        or len([h for h in hosts.split(",") if h.strip()]) > 1
        or int(environ.get("SLURM_NTASKS", "1") or 1) > 1
        or int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
    )


def _count(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not a whole number") from None


def initialize_distributed(environ: Mapping[str, str] = os.environ) -> bool:
    """Join the multi-process job the environment describes (before any other JAX use): on a
    TPU pod slice, SLURM or MPI, JAX finds the rest itself; elsewhere ``JAX_COORDINATOR_ADDRESS``
    (host:port of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` say it."""
    if not multi_host(environ):
        return False
    processes, index = _count(environ, "JAX_NUM_PROCESSES"), _count(environ, "JAX_PROCESS_ID")
    if environ.get("JAX_COORDINATOR_ADDRESS") and (processes is None) != (index is None):
        raise InputError("JAX_NUM_PROCESSES and JAX_PROCESS_ID go together: set both, or neither on a platform "
                         "that finds them itself")
    if processes is not None and index is not None and not 0 <= index < processes:
        raise InputError(f"JAX_PROCESS_ID={index} must be between 0 and JAX_NUM_PROCESSES - 1 ({processes - 1})")
    jax.distributed.initialize(num_processes=processes, process_id=index)
    return True
