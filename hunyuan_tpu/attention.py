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

from .files import InputError

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


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def splash_attention(block_q: int = 512, block_kv: int = 512, interpret: bool = False) -> Kernel:
    """TPU Pallas splash attention (flash attention with block-sparse masks) as a kernel.

    The key mask becomes kv segment ids (1 valid, 0 padding; every query has segment 1, so
    padded query rows still see valid keys and stay finite). Sequences that the block sizes
    do not divide are padded, the padded keys masked and the padded queries dropped; blocks
    are shrunk to the (128-rounded) sequence for short sequences. ``interpret`` runs the
    kernel through the Pallas interpreter, which works on any backend (slowly).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    def attend(q, k, v, key_mask, scale):
        b, n, length, d = q.shape
        kv_length = k.shape[2]
        bq = min(block_q, _round_up(length, 128))
        bkv = min(block_kv, _round_up(kv_length, 128))
        padded_q, padded_kv = _round_up(length, bq), _round_up(kv_length, bkv)
        pad = lambda x, size: jnp.pad(x, ((0, 0), (0, 0), (0, size - x.shape[2]), (0, 0)))  # noqa: E731
        q, k, v = pad(q * scale, padded_q), pad(k, padded_kv), pad(v, padded_kv)
        kv_segments = jnp.pad(jnp.broadcast_to(key_mask, (b, 1, 1, kv_length))[:, 0, 0],
                              ((0, 0), (0, padded_kv - kv_length))).astype(jnp.int32)
        mask = splash.MultiHeadMask([splash.FullMask((padded_q, padded_kv))] * n)
        sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv)
        kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
        q_segments = jnp.ones((padded_q,), jnp.int32)
        out = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, splash.SegmentIds(q=q_segments, kv=seg)))(
            q, k, v, kv_segments)
        return out[:, :, :length].astype(v.dtype)

    return attend


def valid_keys_first(k: jax.Array, v: jax.Array, key_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keys and values reordered so each sample's valid keys come first, and their count.

    Softmax attention does not depend on the order of the keys, so a (B, 1, 1, S) key mask of
    any pattern becomes a key length (the form cuDNN's flash kernel takes) after a stable sort.
    The DiT's valid keys are a prefix already except where sequence parallelism pads the image
    tokens in the middle of the sequence.
    """
    valid = jnp.broadcast_to(key_mask, (k.shape[0], 1, 1, k.shape[2]))[:, 0, 0]
    order = jnp.argsort(~valid, axis=-1, stable=True)[:, None, :, None]
    return (jnp.take_along_axis(k, order, axis=2), jnp.take_along_axis(v, order, axis=2),
            valid.sum(-1).astype(jnp.int32))


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, scale: float,
                    implementation: str = "cudnn") -> jax.Array:
    """cuDNN flash attention through ``jax.nn.dot_product_attention`` (GPU, bf16 or fp16).

    The key mask goes in as ``key_value_seq_lengths`` after ``valid_keys_first``: cuDNN takes a
    dense mask only as an (L, S) bias, which at video lengths is gigabytes per sample.
    ``implementation`` is for tests on CPU (``"xla"`` runs the same call without cuDNN).
    """
    k, v, lengths = valid_keys_first(k, v, key_mask)
    out = jax.nn.dot_product_attention(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
        scale=scale, key_value_seq_lengths=lengths, implementation=implementation,
    )
    return out.transpose(0, 2, 1, 3)


BACKENDS = ("auto", "xla", "splash", "cudnn")


def kernel(name: str, *, platform: str | None = None, dtype=jnp.bfloat16, block_q: int = 512,
           block_kv: int = 512) -> Kernel:
    """The kernel for ``--attention NAME`` at compute ``dtype``; "auto" picks splash on TPU,
    cuDNN on GPU (in bf16/fp16, the precisions it has; xla for float32), xla elsewhere.

    Off TPU, splash runs in Pallas interpret mode (for tests; far too slow for real sizes).
    """
    platform = platform or jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if name == "auto":
        name = {"tpu": "splash", "gpu": "cudnn" if half else "xla"}.get(platform, "xla")
    if name == "xla":
        return xla_attention
    if name == "splash":
        return splash_attention(block_q, block_kv, interpret=platform != "tpu")
    if name == "cudnn":
        if platform != "gpu":
            raise InputError(f"{{attention}} cudnn needs a GPU (this backend is {platform})")
        if not half:
            raise InputError(f"{{attention}} cudnn needs bfloat16 or float16 (the model runs in {jnp.dtype(dtype)})")
        return cudnn_attention
    raise InputError(f"{{attention}} {name!r} is not one of {', '.join(BACKENDS)}")


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
