"""Attention kernels in JAX, and how one runs on a device mesh.

A kernel takes q, k, v of shape (B, N, L, D), a (B, 1, 1, S) boolean key mask and the softmax
scale, and returns (B, N, L, D). The runtime puts the selected kernel under the model's
``F.scaled_dot_product_attention`` calls.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

Kernel = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, float], jax.Array]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None, scale: float) -> jax.Array:
    """Reference attention in plain jnp (XLA materialises the (L, S) scores).

    Takes any boolean mask broadcastable to (B, N, L, S), or None. Scores and softmax in
    float32 whatever the input dtype; masked keys get -inf. Every row has at least one valid key
    by construction of the callers (image tokens, refiner slot 0, the VAE's causal frames).
    """
    scores = jnp.einsum("bnld,bnsd->bnls", q, k, preferred_element_type=jnp.float32) * scale
    if key_mask is not None:
        scores = jnp.where(key_mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bnls,bnsd->bnld", probs.astype(v.dtype), v)


KERNELS: dict[str, Kernel] = {"xla": xla_attention}


def kernel(name: str) -> Kernel:
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown attention kernel {name!r}; valid: {', '.join(KERNELS)}") from None


def on_mesh(kernel: Kernel, mesh: Mesh | None) -> Kernel:
    """Run a kernel per device with ``shard_map``: batch over "dp", heads over every other axis.

    Heads are independent, so each device attends over the full sequence for its heads; moving
    activations into that layout (an all-to-all from token-split activations for sequence
    parallelism, nothing for tensor parallelism) is left to XLA's partitioner.
    """
    if mesh is None or mesh.size == 1:
        return kernel
    heads = tuple(a for a in mesh.axis_names if a != "dp")
    qkv = P("dp", heads, None, None)

    def sharded(q, k, v, key_mask, scale):
        return jax.shard_map(
            functools.partial(kernel, scale=scale), mesh=mesh,
            in_specs=(qkv, qkv, qkv, P("dp")), out_specs=qkv, check_vma=False,
        )(q, k, v, key_mask)

    return sharded
