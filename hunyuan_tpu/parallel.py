"""Meshes from spec strings, and the one place where a sharding strategy's tables are applied.

A mesh spec names axis sizes, e.g. ``tp=8``, ``fsdp=8``, ``dp=2,tp=4``, ``dp=2,sp=4``; the mesh
always has the four axes (dp, fsdp, sp, tp), unnamed ones of size 1.
"""

from __future__ import annotations

import math
import os
import re
from typing import Mapping

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
            raise InputError(f"--mesh {text!r}: {part!r} is not AXIS=SIZE (axes: {', '.join(MESH_AXES)})")
        axis, size = m.group(1), int(m.group(2))
        if axis not in sizes:
            raise InputError(f"--mesh {text!r}: unknown axis {axis!r} (axes: {', '.join(MESH_AXES)})")
        if axis in seen or size < 1:
            raise InputError(f"--mesh {text!r}: axis {axis} given twice or with size < 1")
        seen.add(axis)
        sizes[axis] = size
    if not seen:
        raise InputError(f"--mesh {text!r}: empty (e.g. tp=8 or dp=2,sp=4)")
    return sizes


def make_mesh(sizes: Mapping[str, int], devices: list | None = None) -> Mesh:
    """A mesh over all (or the given) devices; ``Auto`` axes, as row-parallel layouts need."""
    devices = jax.devices() if devices is None else devices
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        spec = ",".join(f"{a}={sizes[a]}" for a in MESH_AXES if sizes[a] > 1) or "1 device"
        raise InputError(f"--mesh {spec}: uses {math.prod(shape)} devices, but {len(devices)} are available")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def default_mesh_sizes(strategy: Strategy, device_count: int) -> dict[str, int]:
    """All devices on the strategy's main (last) axis, e.g. tp=8 for tp, sp=8 for sp."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    sizes[strategy.axes[-1]] = device_count
    return sizes


def choose_layout(
    name: str | None, mesh_spec: str | None, device_count: int, default: str
) -> tuple[Strategy, dict[str, int]] | None:
    """The strategy and mesh sizes for ``--sharding NAME --mesh SPEC``, or None for a single
    device without a mesh. Without a name: the strategy whose axis the mesh splits, else
    ``default``; without a mesh: every device on the strategy's own axis."""
    if name is None and mesh_spec is None and device_count == 1:
        return None
    sizes = parse_mesh_spec(mesh_spec) if mesh_spec else None
    if name is None and sizes is None:
        name = default
    elif name is None:
        used = [a for a in ("fsdp", "sp", "tp") if sizes[a] > 1]
        name = {"fsdp": "fsdp", "sp": "sp", "tp": "tp_fc2_replicated"}[used[0]] if used else "replicated"
    if name not in sharding.STRATEGIES:
        raise InputError(f"--sharding {name!r} is not one of {', '.join(sharding.STRATEGIES)}")
    strategy = sharding.get(name)
    return strategy, sizes or default_mesh_sizes(strategy, device_count)


def param_spec(strategy: Strategy, name: str) -> P:
    for pattern, spec in strategy.params:
        if re.fullmatch(pattern, name):
            return spec
    return P()


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
            f"--mesh axis {', '.join(unused)} is not used by strategy {strategy.name} (its axes: "
            f"{', '.join(strategy.axes)}); those devices would only repeat the same work"
        )
    head_split = math.prod(mesh.shape[a] for a in MESH_AXES if a != "dp")
    if config.heads_num % head_split:
        raise InputError(
            f"--mesh: attention splits the {config.heads_num} heads over {head_split} devices "
            f"(every axis but dp); heads_num must be divisible by it"
        )
    if batch % mesh.shape["dp"]:
        raise InputError(
            f"--mesh dp={mesh.shape['dp']} splits the batch into equal parts, but the {batch_name} has "
            f"{batch} sample(s)"
        )
    for name, shape in shapes.items():
        problem = _divides(param_spec(strategy, name), shape, mesh)
        if problem:
            raise InputError(f"strategy {strategy.name} on this mesh: parameter {name} {tuple(shape)}: {problem}")


def param_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, from a model on the meta device (no memory)."""
    return {name: tuple(t.shape) for name, t in meta_model(config).state_dict().items()}


def sharded_layout(
    config: DiTConfig, strategy: Strategy, sizes: Mapping[str, int], *, batch: int, batch_name: str = CFG_BATCH
) -> tuple[Mesh, dict[str, NamedSharding]]:
    """A mesh of ``sizes`` over all devices, checked to fit ``strategy`` for ``config`` and a
    ``batch`` (the CFG pair by default), and where each parameter lives on it."""
    mesh = make_mesh(sizes)
    shapes = param_shapes(config)
    check_fit(strategy, mesh, config, shapes, batch, batch_name)
    return mesh, param_shardings(strategy, mesh, shapes)


def activation_sharding(strategy: Strategy, mesh: Mesh, name: str) -> NamedSharding:
    """Where a named activation lives between steps; replicated where the strategy leaves it to XLA."""
    return NamedSharding(mesh, strategy.activations.get(name, P()))


def execution(strategy: Strategy, mesh: Mesh) -> Execution:
    """The model's layout hook and token padding for ``strategy`` on ``mesh``."""
    shardings = {name: NamedSharding(mesh, spec) for name, spec in strategy.activations.items()}

    def layout(x, name: str):
        sharding = shardings.get(name)
        return x if sharding is None else interop.call_jax(jax.lax.with_sharding_constraint, x, sharding)

    return Execution(layout=layout, token_multiple=math.prod(mesh.shape[a] for a in strategy.token_axes))


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


def initialize_distributed(environ: Mapping[str, str] = os.environ) -> bool:
    """Call ``jax.distributed.initialize()`` when running on several hosts (before any other JAX use)."""
    if not multi_host(environ):
        return False
    jax.distributed.initialize()
    return True
