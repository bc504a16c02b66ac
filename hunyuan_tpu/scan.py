"""The double blocks as one loop: block weights stacked by layer, and a runner that scans them.

Under ``jax.jit`` the model's default runner (``model.loop_blocks``) unrolls one copy of the
double block per layer, so trace time, compile time and program size grow with the depth
(54 at full size). ``scanned_blocks`` runs a range of blocks as one ``jax.lax.scan`` whose body
is a single block; the loop counter picks each layer's weights out of arrays stacked by layer.

Naming. A stacked array is named after the official per-layer names with the layer index
dropped, and holds every layer along a new leading axis::

    double_blocks.img_attn_q.weight   (depth, out, in)   = double_blocks.{0..depth-1}.img_attn_q.weight
    double_blocks.img_attn_q.lora_A.weight (depth, r, in) (a LoRA adapter, when it adapts every block)

Official names always carry a layer index after ``double_blocks.``, so the two kinds never
collide and a dict may mix them. ``stack_blocks`` makes the stacked arrays once, outside any
step, one parameter group at a time, each layer placed as before and the layer axis unsplit
(``stacked_sharding``); a step takes that dict. Inside a step ``runtime.functional``'s apply
hands the stacked arrays to the runner (``stacked_weights``, scoped to the call); blocks
whose weights come under official names are stacked on the fly inside the trace instead
(a copy per step, acceptable where the step casts them anyway, as training does).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import re
import types
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import jax
import jax.numpy as jnp
import torch
import torch.nn as nn
from jax.sharding import NamedSharding, Sharding
from jax.sharding import PartitionSpec as P
from torchax import interop

from .model import BlockCall, Scope, Streams

PREFIX = "double_blocks."
_LAYER = re.compile(r"double_blocks\.(\d+)\.(.+)")
T = TypeVar("T")


# ---- names -----------------------------------------------------------------------------------

def split_layer(name: str) -> tuple[str, int] | None:
    """``double_blocks.3.img_attn_q.weight`` -> (``double_blocks.img_attn_q.weight``, 3); None
    for a name outside the double blocks (or one already stacked)."""
    m = _LAYER.fullmatch(name)
    return (PREFIX + m.group(2), int(m.group(1))) if m else None


def layer_name(stacked: str, layer: int) -> str:
    """The official name of one layer of a stacked array: the inverse of ``split_layer``."""
    return f"{PREFIX}{layer}.{stacked.removeprefix(PREFIX)}"


def is_stacked(name: str) -> bool:
    return name.startswith(PREFIX) and split_layer(name) is None


def stack_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """Stacked name -> its per-layer names in layer order, for every block tensor that the
    names give for all layers 0..depth-1 (depth: one past the highest layer named). Tensors
    of only some layers (a LoRA adapter on a few blocks) form no group and stay per layer."""
    layers: dict[str, dict[int, str]] = {}
    for name in names:
        found = split_layer(name)
        if found:
            layers.setdefault(found[0], {})[found[1]] = name
    depth = max((max(by_layer) + 1 for by_layer in layers.values()), default=0)
    return {stacked: [by_layer[i] for i in range(depth)]
            for stacked, by_layer in layers.items() if len(by_layer) == depth}


def regroup(tree: Mapping[str, T], stack: Callable[[list[T]], T]) -> dict[str, T]:
    """``tree`` with each complete group of per-layer entries replaced by ``stack(entries)``
    under the stacked name (one group at a time, in order); other entries pass through."""
    groups = stack_groups(tree)
    grouped = {name for names in groups.values() for name in names}
    out = {name: value for name, value in tree.items() if name not in grouped}
    for stacked, names in groups.items():
        out[stacked] = stack([tree[name] for name in names])
    return out


# ---- placement -------------------------------------------------------------------------------

def stacked_sharding(sharding: Sharding | None) -> Sharding | None:
    """Where a stack of arrays each placed by ``sharding`` lives: every layer split as before,
    the layer axis whole (so that picking a layer is local to each device)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P(None, *sharding.spec))
    return sharding  # one device (or unplaced): nothing is split


def stacked_shardings(shardings: Mapping[str, Sharding | None]) -> dict[str, Sharding | None]:
    """Placements under official names (``parallel.param_shardings``, the strategies' tables)
    for the stacked names: layer 0's placement with a leading unsplit axis."""
    return regroup(shardings, lambda layers: stacked_sharding(layers[0]))


def stacked_abstract(params: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, jax.ShapeDtypeStruct]:
    """What ``stack_blocks`` makes of ``params``, as shapes, dtypes and placements only (for
    compiling a step ahead of time without weights)."""
    def stack(layers: list[jax.ShapeDtypeStruct]) -> jax.ShapeDtypeStruct:
        first = layers[0]
        return jax.ShapeDtypeStruct((len(layers), *first.shape), first.dtype, sharding=stacked_sharding(first.sharding))

    return regroup(params, stack)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _stack(layers: list[jax.Array], sharding: Sharding | None, dtype: Any) -> jax.Array:
    # a module-level jit: every group of the same shapes and placement reuses one executable
    out = jnp.stack(layers).astype(dtype)
    return out if sharding is None else jax.lax.with_sharding_constraint(out, sharding)


def _stack_group(layers: list[jax.Array], dtype: Any, free: bool) -> jax.Array:
    sharding = layers[0].sharding
    sharding = stacked_sharding(sharding) if isinstance(sharding, NamedSharding) else None  # else: stays on its device
    out = _stack(layers, sharding, jnp.dtype(dtype or layers[0].dtype))
    if free:  # XLA cannot reuse inputs of another shape for the output, so they are let go here
        out.block_until_ready()  # before the next group's stack is allocated
        for layer in layers:
            layer.delete()
    return out


def stack_blocks(params: Mapping[str, jax.Array], *, dtype: Any = None, donate: bool = False) -> dict[str, jax.Array]:
    """``params`` with the double blocks' weights stacked by layer (see the module docstring),
    cast to ``dtype`` if given (every parameter), each stack placed like its layers with the
    layer axis unsplit. Already stacked weights pass through, so calling it twice is free.

    One parameter group at a time; with ``donate`` each group's per-layer arrays are deleted
    as soon as it is stacked, so the peak stays one copy of the weights plus one group. Use
    that only where nothing else holds the per-layer arrays.
    """
    out = regroup(dict(params), functools.partial(_stack_group, dtype=dtype, free=donate))
    if dtype is not None:
        out = {name: value.astype(dtype) for name, value in out.items()}
    return out


# ---- handing stacked weights to the runner ---------------------------------------------------

# The stacked block weights of the apply call being traced, by block-relative name
# ("img_attn_q.weight"); set with ``stacked_weights``. A context variable, so that it is
# scoped to one call and never outlives it.
_STACKED: contextvars.ContextVar[Mapping[str, jax.Array]] = contextvars.ContextVar(
    "hunyuan_tpu_stacked_blocks", default=types.MappingProxyType({}))


def split_stacked(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(parameters under official names, stacked block weights by block-relative name)."""
    official = {name: value for name, value in params.items() if not is_stacked(name)}
    stacked = {name.removeprefix(PREFIX): value for name, value in params.items() if is_stacked(name)}
    return official, stacked


@contextlib.contextmanager
def stacked_weights(weights: Mapping[str, jax.Array]) -> Iterator[None]:
    """Within the block: ``scanned_blocks`` takes the double blocks' weights from ``weights``
    (block-relative name -> (depth, ...) array) where it has them."""
    token = _STACKED.set(types.MappingProxyType(dict(weights)))
    try:
        yield
    finally:
        _STACKED.reset(token)


# ---- the runner ------------------------------------------------------------------------------

def _tensors(block: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    return itertools.chain(block.named_parameters(), block.named_buffers())


def _signature(block: nn.Module) -> tuple:
    return tuple((name, tuple(t.shape)) for name, t in _tensors(block))


def _stacked_sources(blocks: nn.ModuleList, span: range) -> dict[str, tuple[jax.Array, int]]:
    """Block-relative name -> (array stacked by layer, the layer of its row 0), for every tensor
    of the blocks in ``span``: from the stacked weights of the call where given, else the
    blocks' own (official-named) tensors stacked here, inside the trace."""
    stacked = _STACKED.get()
    sources = {}
    for name, _ in _tensors(blocks[span.start]):
        if name in stacked:
            if stacked[name].shape[0] != len(blocks):
                raise ValueError(f"stacked {PREFIX}{name} has {stacked[name].shape[0]} layers; the model has "
                                 f"{len(blocks)} double blocks")
            sources[name] = stacked[name], 0
            continue
        layers = [functools.reduce(getattr, name.split("."), blocks[i]) for i in span]
        if any(t.device.type == "meta" for t in layers):
            raise ValueError(f"no weights for {PREFIX}{span.start}.{name}: give them under official names "
                             f"or stacked as {PREFIX}{name} (hunyuan_tpu.scan.stack_blocks)")
        sources[name] = jnp.stack(interop.jax_view(layers)), span.start
    return sources


@dataclasses.dataclass(frozen=True)
class _Layer:
    """Layer ``index`` of the stacked weights, called like a double block. The weights are
    picked out when it is called, that is inside any remat of the call, so a backward pass
    picks them again instead of keeping a copy per layer."""

    template: nn.Module  # any block of the span: only its structure is used
    sources: Mapping[str, tuple[jax.Array, int]]
    index: jax.Array | int

    def __call__(self, *args, **kwargs) -> Streams:
        weights = {name: interop.torch_view(jax.lax.dynamic_index_in_dim(stack, self.index - first, keepdims=False))
                   for name, (stack, first) in self.sources.items()}
        return torch.func.functional_call(self.template, weights, args, kwargs)


def scanned_blocks(blocks: nn.ModuleList, span: range, streams: Streams, run_block: BlockCall, scope: Scope) -> Streams:
    """An ``Execution.run_blocks`` for JAX: the blocks of ``span`` as one ``jax.lax.scan`` over
    the layer index, whose body is one block (scope "double_blocks_<first>_to_<last>", the body
    "double_block"). Each layer's weights are read from the full stacked arrays at the loop
    counter (``dynamic_index_in_dim``): a sub-range (the feature cache's) slices nothing.

    Blocks of different structure (a LoRA adapter on some of them only) cannot share one body;
    they run one after another, each picking its layer the same way.
    """
    if not span:
        return streams
    if len({_signature(blocks[i]) for i in span}) > 1:
        for i in span:
            with scope(f"double_block_{i}"):
                streams = run_block(_Layer(blocks[i], _stacked_sources(blocks, range(i, i + 1)), i), *streams)
        return streams
    sources = _stacked_sources(blocks, span)

    def body(carry: tuple[jax.Array, jax.Array], i: jax.Array) -> tuple[tuple[jax.Array, jax.Array], None]:
        with scope("double_block"):
            out = run_block(_Layer(blocks[span.start], sources, i), *interop.torch_view(carry))
        return interop.jax_view(tuple(out)), None

    with scope(f"double_blocks_{span.start}_to_{span.stop - 1}"):
        carry, _ = jax.lax.scan(body, interop.jax_view(tuple(streams)), jnp.arange(span.start, span.stop))
    return interop.torch_view(carry)
