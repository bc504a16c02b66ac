"""The one place where torchax is set up: its environment, op overrides, and JAX views of modules.

torchax keeps a single process-wide environment (``torchax.default_env()``); ``torchax_env``
configures it once and every other module goes through it, so the attention kernel, the
dtype policy and any future op override live here and nowhere else.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
import torchax
from torchax import interop
from torchax.ops import mappings
from torchax.tensor import Environment

JaxParams = dict[str, jax.Array]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None, scale: float) -> jax.Array:
    """Reference attention in plain jnp: (B, N, L, D) x3, key_mask broadcastable to (B, N, L, S).

    Scores and softmax in float32 whatever the input dtype; masked keys get -inf. Every row has
    at least one valid key by construction of the model (image tokens, refiner slot 0).
    """
    scores = jnp.einsum("bnld,bnsd->bnls", q, k, preferred_element_type=jnp.float32) * scale
    if key_mask is not None:
        scores = jnp.where(key_mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bnls,bnsd->bnld", probs.astype(v.dtype), v)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` for torchax tensors, limited to what the model uses."""
    if dropout_p or is_causal or enable_gqa:
        raise NotImplementedError("the hunyuan_tpu attention override supports masked, non-causal attention only")
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise NotImplementedError("the hunyuan_tpu attention override takes boolean masks only")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return interop.call_jax(xla_attention, query, key, value, attn_mask, scale)


@functools.cache
def torchax_env() -> Environment:
    """The process's torchax environment, configured on first use.

    torchax's own lowering of ``scaled_dot_product_attention`` builds an (L, S) bias and cannot
    take the model's per-sample (B, 1, 1, S) key mask; it is replaced by ``xla_attention``.
    """
    env = torchax.default_env()
    env.param  # creates the environment's PRNG key now rather than inside a later measured region
    env.override_op_definition(F.scaled_dot_product_attention, _sdpa)
    env.override_op_definition(torch.ops.aten.scaled_dot_product_attention, _sdpa)
    return env


def to_host_array(t: torch.Tensor) -> np.ndarray:
    """A CPU torch tensor as a numpy array without a copy where possible (bfloat16 included)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; reinterpret the bits as ml_dtypes' type
        return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy()


def jax_view(module: torch.nn.Module) -> tuple[JaxParams, Callable[..., Any]]:
    """A module as JAX data and a pure JAX function: ``(params, apply(params, *args, **kwargs))``.

    ``params`` maps official parameter names to device arrays (host copies moved by
    ``jax.device_put``, which compiles nothing); ``apply`` takes and returns jax arrays, traces
    cleanly under ``jax.jit`` and runs the module's ``forward`` through torchax with this
    package's op overrides.
    """
    env = torchax_env()
    params = {name: jax.device_put(to_host_array(t)) for name, t in module.state_dict().items()}

    def apply(params: JaxParams, *args, **kwargs):
        params, args, kwargs = env.j2t_iso((params, args, kwargs))
        with env:
            out = torch.func.functional_call(module, params, args, kwargs)
        return env.t2j_iso(out)

    return params, apply


def jax_dtype(dtype: torch.dtype) -> jnp.dtype:
    """The JAX dtype for a torch dtype (bfloat16 -> jnp.bfloat16, ...)."""
    return jnp.dtype(mappings.t2j_dtype(dtype))
