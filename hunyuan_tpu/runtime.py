"""The one place where torchax is set up: its environment, op overrides, and JAX views of modules.

torchax keeps a single process-wide environment (``torchax.default_env()``); ``torchax_env``
configures it once and every other module goes through it, so the attention kernel, the
dtype policy and any future op override live here and nowhere else.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
import torchax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, Sharding
from torchax import interop
from torchax.ops import mappings
from torchax.tensor import Environment

from . import scan, ssta
from .attention import Kernel, SparseKernel, block_sparse_xla, on_mesh, sparse_on_mesh, xla_attention

JaxParams = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Tracing:
    mesh: Mesh | None = None
    attention: Kernel = xla_attention
    sparse: SparseKernel = block_sparse_xla


# What the attention override uses while a step is traced; set with ``tracing``. A context
# variable rather than state on the (process-wide) torchax environment, so that it is scoped.
_TRACING: contextvars.ContextVar[Tracing] = contextvars.ContextVar("hunyuan_tpu_tracing", default=Tracing())


@contextlib.contextmanager
def tracing(mesh: Mesh | None = None, attention: Kernel = xla_attention, sparse: SparseKernel = block_sparse_xla):
    """Trace model code under ``mesh`` with ``attention`` as the kernel of every SDPA call and
    ``sparse`` as that of every block-sparse attention (SSTA)."""
    token = _TRACING.set(Tracing(mesh, attention, sparse))
    try:
        with torchax_env().override_property(mesh=mesh):
            yield
    finally:
        _TRACING.reset(token)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` for torchax tensors, limited to what the package uses.

    A (B, 1, 1, S) key mask (the DiT) goes to the kernel ``tracing`` selected, per device on a
    mesh; any other boolean mask (the VAE's causal frame mask) or none goes to ``xla_attention``.
    """
    if dropout_p or is_causal or enable_gqa:
        raise NotImplementedError("the hunyuan_tpu attention override supports masked, non-causal attention only")
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise NotImplementedError("the hunyuan_tpu attention override takes boolean masks only")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    key_mask = attn_mask is not None and attn_mask.ndim == 4 and tuple(attn_mask.shape[1:3]) == (1, 1)
    current = _TRACING.get()
    kernel = on_mesh(current.attention, current.mesh) if key_mask else xla_attention
    return interop.call_jax(kernel, query, key, value, attn_mask, scale)


def _block_sparse(q, k, v, kv_blocks, kv_counts, block_size):
    """``hunyuan_tpu::block_sparse_attention`` for torchax tensors: the block-sparse kernel
    ``tracing`` selected, per device on a mesh."""
    current = _TRACING.get()
    kernel = sparse_on_mesh(current.sparse, current.mesh)
    return interop.call_jax(kernel, q, k, v, kv_blocks, kv_counts, block_size, q.shape[-1] ** -0.5)


@functools.cache
def torchax_env() -> Environment:
    """The process's torchax environment, configured on first use.

    torchax's own lowering of ``scaled_dot_product_attention`` builds an (L, S) bias and cannot
    take the model's per-sample (B, 1, 1, S) key mask; it is replaced by the kernel that
    ``tracing`` names (``xla_attention`` by default), run per device on a mesh. The model's
    block-sparse attention op (``ssta``), dense under the block mask when eager, becomes the
    block-sparse kernel ``tracing`` names.
    """
    env = torchax.default_env()
    env.param  # creates the environment's PRNG key now rather than inside a later measured region
    env.override_op_definition(F.scaled_dot_product_attention, _sdpa)
    env.override_op_definition(torch.ops.aten.scaled_dot_product_attention, _sdpa)
    env.override_op_definition(ssta.block_sparse_attention._opoverload, _block_sparse)
    return env


def to_host_array(t: torch.Tensor) -> np.ndarray:
    """A CPU torch tensor as a numpy array without a copy where possible (bfloat16 included)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; reinterpret the bits as ml_dtypes' type
        return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy()


def gather_to_host(x: jax.Array) -> np.ndarray:
    """The whole of ``x`` on this host. Where other processes hold parts of it, this is a
    collective: every process of the job must call it, in the same order."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_torch(a: np.ndarray | jax.Array) -> torch.Tensor:
    """A host copy of an array as a CPU torch tensor (``to_host_array``'s inverse, bfloat16 included)."""
    a = np.array(a, order="C")  # a copy that keeps 0-d arrays 0-d
    if a.dtype == jnp.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def functional(module: torch.nn.Module) -> Callable[..., Any]:
    """``apply(params, *args, **kwargs)``: the module's forward as a pure JAX function.

    ``params`` maps parameter names to jax arrays and replaces the module's own tensors, so the
    module may live on the meta device. Arguments and results are jax arrays; the function
    traces cleanly under ``jax.jit`` and runs through torchax with this package's overrides.
    Double-block weights may come stacked by layer (``hunyuan_tpu.scan`` names); they go to the
    model's block runner (``scan.scanned_blocks``) for the duration of the call.
    """
    env = torchax_env()

    def apply(params: JaxParams, *args, **kwargs):
        params, stacked = scan.split_stacked(params)
        params, args, kwargs = env.j2t_iso((params, args, kwargs))
        with env, scan.stacked_weights(stacked):
            out = torch.func.functional_call(module, params, args, kwargs)
        return env.t2j_iso(out)

    return apply


def rematerialized(fn: Callable) -> Callable:
    """An ``Execution.checkpoint`` for training: ``fn`` (torch tensors in and out) runs under
    ``jax.checkpoint``, so the backward pass recomputes its activations from its inputs
    instead of keeping them (per double block: only the block's inputs stay alive)."""
    return interop.gradient_checkpoint(fn)


def device_array(t: torch.Tensor, sharding: Sharding | None = None) -> jax.Array:
    """A host tensor on device, placed by ``sharding``; nothing compiles. Each device gets its
    slice from the host (``jax.device_put`` would, on several processes, also all-gather the
    whole tensor across them to check that every host passed the same one)."""
    a = to_host_array(t)
    if sharding is None:
        return jax.device_put(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def jax_view(
    module: torch.nn.Module, dtype: torch.dtype | None = None, shardings: Mapping[str, Sharding] | None = None
) -> tuple[JaxParams, Callable[..., Any]]:
    """A module with real weights as ``(params, functional(module))``, the params cast to ``dtype``."""
    shardings = shardings or {}
    params = {
        name: device_array(t if dtype is None else t.to(dtype), shardings.get(name))
        for name, t in module.state_dict().items()
    }
    return params, functional(module)


def jax_dtype(dtype: torch.dtype) -> jnp.dtype:
    """The JAX dtype for a torch dtype (bfloat16 -> jnp.bfloat16, ...)."""
    return jnp.dtype(mappings.t2j_dtype(dtype))
