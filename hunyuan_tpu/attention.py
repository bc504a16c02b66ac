"""Attention kernels in JAX, and how one runs on a device mesh.

A dense kernel takes q, k, v of shape (B, N, L, D), a (B, 1, 1, S) boolean key mask and the
softmax scale, and returns (B, N, L, D). The runtime puts the selected kernel under the model's
``F.scaled_dot_product_attention`` calls.

A block-sparse kernel (SSTA's) takes q (B, N, nq*bs, D), k and v (B, N, nk*bs, D), the key
blocks each query block attends, kv_blocks (B, N, nq, K) int32 ascending and padded with their
last entry, their counts kv_counts (B, N, nq) >= 1, the block size bs and the scale; it runs
under the model's ``hunyuan_tpu::block_sparse_attention`` op.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from .files import InputError

Kernel = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, float], jax.Array]
SparseKernel = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, int, float], jax.Array]
# The splash block sizes of the fastest measured configuration for this model on v6e (the seed
# TPU port's README: 5.81 s/step at 720p x 121 frames with CFG, against 7.29 with the stock ones).
SPLASH_BLOCK_Q, SPLASH_BLOCK_KV, SPLASH_BLOCK_KV_COMPUTE = 3072, 2048, 1024
# Listed key blocks the block-sparse Pallas kernel folds per grid step: a grid step has a fixed
# cost (~0.35 us) comparable to one 384 x 384 tile's MXU work, so one block a step would double it.
SPARSE_BLOCKS_PER_STEP = 4


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


# An online softmax's running state: (max, sum of exponentials, weighted values), float32. The
# max starts at a finite floor, so that a fully masked first block gives exp(-inf) = 0, not nan.
Softmax = tuple[jax.Array, jax.Array, jax.Array]


def _softmax_start(rows: tuple[int, ...], d: int) -> Softmax:
    return jnp.full(rows, -1e30, jnp.float32), jnp.zeros(rows, jnp.float32), jnp.zeros((*rows, d), jnp.float32)


def _softmax_fold(state: Softmax, s: jax.Array, v: jax.Array, subscripts: str) -> Softmax:
    """Fold one block of float32 scores ``s`` (masked entries -inf) and its values into the state;
    ``subscripts`` contracts the probabilities with ``v``."""
    m, total, acc = state
    m_next = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_next[..., None])
    correction = jnp.exp(m - m_next)
    acc = acc * correction[..., None] + jnp.einsum(subscripts, p.astype(v.dtype), v,
                                                   preferred_element_type=jnp.float32)
    return m_next, total * correction + p.sum(-1), acc


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, scale: float,
                      block: int = 512) -> jax.Array:
    """Dense attention as a loop over key blocks with an online softmax (flash attention in jnp):
    the same result as ``xla_attention`` for a (B, 1, 1, S) key mask, with one (L, block) score
    tile per head in memory instead of the (L, S) scores, which XLA:CPU would write and read
    back several times (scores, mask, max, exponentials, sum). Every row needs a valid key."""
    b, n, length, d = q.shape
    kv_length = k.shape[2]
    blocks = -(-kv_length // block)
    block = _round_up(-(-kv_length // blocks), 8)  # equal blocks of at most ``block``: little padding
    padded = blocks * block
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, padded - kv_length), (0, 0)))  # noqa: E731
    kb, vb = (pad(x).reshape(b, n, padded // block, block, d) for x in (k, v))
    valid = jnp.pad(jnp.broadcast_to(key_mask, (b, 1, 1, kv_length))[:, 0, 0], ((0, 0), (0, padded - kv_length)))
    valid = valid.reshape(b, padded // block, block)

    def fold(state, j):
        s = jnp.einsum("bnld,bnsd->bnls", q, kb[:, :, j], preferred_element_type=jnp.float32) * scale
        s = jnp.where(valid[:, j][:, None, None], s, -jnp.inf)
        return _softmax_fold(state, s, vb[:, :, j], "bnls,bnsd->bnld"), None

    (_, total, acc), _ = jax.lax.scan(fold, _softmax_start((b, n, length), d), jnp.arange(blocks))
    return (acc / total[..., None]).astype(q.dtype)


def check_splash_blocks(block_q: int, block_kv: int, block_kv_compute: int) -> None:
    """Splash block sizes: positive multiples of 128, the computed slice dividing the kv block."""
    for name, size in (("splash_block_q", block_q), ("splash_block_kv", block_kv),
                       ("splash_block_kv_compute", block_kv_compute)):
        if size < 128 or size % 128:
            raise InputError(f"{{{name}}} {size} must be a positive multiple of 128")
    if block_kv % min(block_kv_compute, block_kv):
        raise InputError(f"{{splash_block_kv_compute}} {block_kv_compute} does not divide "
                         f"{{splash_block_kv}} {block_kv}")


def splash_attention(block_q: int = SPLASH_BLOCK_Q, block_kv: int = SPLASH_BLOCK_KV,
                     block_kv_compute: int = SPLASH_BLOCK_KV_COMPUTE, interpret: bool = False) -> Kernel:
    """TPU Pallas splash attention (flash attention with block-sparse masks) as a kernel.

    The key mask becomes kv segment ids (1 valid, 0 padding; every query has segment 1, so
    padded query rows still see valid keys and stay finite). Sequences that the block sizes
    do not divide are padded, the padded keys masked and the padded queries dropped; blocks
    are shrunk to the (128-rounded) sequence for short sequences. ``block_kv_compute`` is the
    slice of a kv block computed at a time (it must divide ``block_kv``; at most the block).
    ``interpret`` runs the kernel through the Pallas interpreter, which works on any backend
    (slowly).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    check_splash_blocks(block_q, block_kv, block_kv_compute)

    def attend(q, k, v, key_mask, scale):
        b, n, length, d = q.shape
        kv_length = k.shape[2]
        bq = min(block_q, _round_up(length, 128))
        bkv = min(block_kv, _round_up(kv_length, 128))
        bkv_compute = bkv if bkv < block_kv else min(block_kv_compute, bkv)
        padded_q, padded_kv = _round_up(length, bq), _round_up(kv_length, bkv)
        pad = lambda x, size: jnp.pad(x, ((0, 0), (0, 0), (0, size - x.shape[2]), (0, 0)))  # noqa: E731
        q, k, v = pad(q * scale, padded_q), pad(k, padded_kv), pad(v, padded_kv)
        kv_segments = jnp.pad(jnp.broadcast_to(key_mask, (b, 1, 1, kv_length))[:, 0, 0],
                              ((0, 0), (0, padded_kv - kv_length))).astype(jnp.int32)
        mask = splash.MultiHeadMask([splash.FullMask((padded_q, padded_kv))] * n)
        sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv_compute)
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


BACKENDS = ("auto", "blocked", "xla", "splash", "cudnn")


def kernel(name: str, *, platform: str | None = None, dtype=jnp.bfloat16, block_q: int = SPLASH_BLOCK_Q,
           block_kv: int = SPLASH_BLOCK_KV, block_kv_compute: int = SPLASH_BLOCK_KV_COMPUTE) -> Kernel:
    """The kernel for ``--attention NAME`` at compute ``dtype``; "auto" picks splash on TPU,
    cuDNN on GPU (in bf16/fp16, the precisions it has), and elsewhere ``blocked_attention``
    (a loop over key blocks; "xla" is the plain reference that materialises the scores).

    Off TPU, splash runs in Pallas interpret mode (for tests; far too slow for real sizes).
    """
    platform = platform or jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if name == "auto":
        name = {"tpu": "splash", "gpu": "cudnn" if half else "blocked"}.get(platform, "blocked")
    if name == "xla":
        return xla_attention
    if name == "blocked":
        return blocked_attention
    if name == "splash":
        return splash_attention(block_q, block_kv, block_kv_compute, interpret=platform != "tpu")
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


# ---- block-sparse attention (SSTA) ---------------------------------------------------------------

def block_sparse_xla(q: jax.Array, k: jax.Array, v: jax.Array, kv_blocks: jax.Array, kv_counts: jax.Array,
                     block_size: int, scale: float) -> jax.Array:
    """The portable block-sparse kernel (any backend): a loop over the K listed blocks, each
    step gathering one key block per query block and folding it into an online softmax.

    Memory is one (bs x bs) score tile per query block and head at a time, O(L * bs), never the
    (L, L) scores; work is K blocks per query block, listed or not (unlisted ones are masked).
    """
    b, n, length, d = q.shape
    nq, nk = length // block_size, k.shape[2] // block_size
    qb = q.reshape(b, n, nq, block_size, d)
    kb, vb = (x.reshape(b, n, nk, block_size, d) for x in (k, v))

    def fold(state, j):
        index = kv_blocks[..., j][..., None, None]  # (B, N, nq, 1, 1): one key block per query block
        kj, vj = (jnp.take_along_axis(x, index, axis=2) for x in (kb, vb))
        s = jnp.einsum("bnqid,bnqjd->bnqij", qb, kj, preferred_element_type=jnp.float32) * scale
        s = jnp.where((j < kv_counts)[..., None, None], s, -jnp.inf)
        return _softmax_fold(state, s, vj, "bnqij,bnqjd->bnqid"), None

    init = _softmax_start((b, n, nq, block_size), d)
    (_, total, acc), _ = jax.lax.scan(fold, init, jnp.arange(kv_blocks.shape[-1]))
    return (acc / total[..., None]).reshape(b, n, length, d).astype(q.dtype)


def block_sparse_pallas(interpret: bool = False, blocks_per_step: int = SPARSE_BLOCKS_PER_STEP) -> SparseKernel:
    """The TPU block-sparse kernel (Pallas): grid (batch, head, query block, step), each step
    folding the next ``blocks_per_step`` listed key blocks into an online softmax (several per
    step, so that the fixed cost of a grid step is paid once for all of them). The block lists
    and counts are prefetched as scalars and the index maps DMA exactly the blocks they name;
    entries past a row's count repeat its last block (no new fetch) and skip their compute.
    Float32 softmax and accumulator over the inputs' dtype (bf16 on the MXU); the output is
    written once, after the last step. ``interpret`` runs it through the Pallas interpreter on
    any backend (tests; slow).

    On TPU a block must fill whole sublane tiles (a multiple of 16 tokens); smaller blocks (the
    tiny test presets) take ``block_sparse_xla``, the same math. The lists live in scalar
    memory: 4 * B * N * nq * K bytes per device call (720p x 121 frames, 2 heads a device:
    about 190 KB; one chip with all 16 heads: 1.5 MB).
    """

    def attend(q, k, v, kv_blocks, kv_counts, block_size, scale):
        if not interpret and block_size % 16:
            return block_sparse_xla(q, k, v, kv_blocks, kv_counts, block_size, scale)
        b, n, length, d = q.shape
        nq, width = length // block_size, kv_blocks.shape[-1]
        group = min(blocks_per_step, width)
        steps = -(-width // group)
        kv_blocks = jnp.concatenate(
            [kv_blocks, jnp.repeat(kv_blocks[..., -1:], steps * group - width, axis=-1)], axis=-1).astype(jnp.int32)

        def kernel(blocks_ref, counts_ref, q_ref, *refs):
            k_refs, v_refs, (o_ref, m_ref, l_ref, acc_ref) = refs[:group], refs[group:2 * group], refs[2 * group:]
            bi, h, i, j = (pl.program_id(a) for a in range(4))

            @pl.when(j == 0)
            def _init():
                m_ref[...] = jnp.full(m_ref.shape, -1e30, jnp.float32)
                l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
                acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

            def fold(k_ref, v_ref):
                s = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32) * scale
                m_prev = m_ref[...].max(axis=1, keepdims=True)  # lanes hold copies of one value
                m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
                p = jnp.exp(s - m_next)
                correction = jnp.exp(m_prev - m_next)
                l_next = l_ref[...].max(axis=1, keepdims=True) * correction + p.sum(axis=1, keepdims=True)
                acc_ref[...] = acc_ref[...] * correction + jax.lax.dot_general(
                    p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
                m_ref[...] = jnp.broadcast_to(m_next, m_ref.shape)
                l_ref[...] = jnp.broadcast_to(l_next, l_ref.shape)

            count = counts_ref[bi, h, i]
            for e in range(group):
                pl.when(j * group + e < count)(functools.partial(fold, k_refs[e], v_refs[e]))

            @pl.when(j == steps - 1)
            def _write():
                o_ref[...] = (acc_ref[...] / l_ref[...].max(axis=1, keepdims=True)).astype(o_ref.dtype)

        block = (None, None, block_size, d)

        def listed(e):
            return pl.BlockSpec(block, lambda bi, h, i, j, blocks, counts: (bi, h, blocks[bi, h, i, j * group + e], 0))

        own = pl.BlockSpec(block, lambda bi, h, i, j, blocks, counts: (bi, h, i, 0))
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, n, nq, steps),
            in_specs=[own] + [listed(e) for e in range(group)] * 2,
            out_specs=own,
            scratch_shapes=[pltpu.VMEM((block_size, 128), jnp.float32), pltpu.VMEM((block_size, 128), jnp.float32),
                            pltpu.VMEM((block_size, d), jnp.float32)],
        )
        return pl.pallas_call(
            kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
            interpret=interpret,
        )(kv_blocks, kv_counts.astype(jnp.int32), q, *[k] * group, *[v] * group)

    return attend


SPARSE_BACKENDS = ("auto", "xla", "pallas")


def sparse_kernel(name: str, *, platform: str | None = None) -> SparseKernel:
    """The block-sparse kernel for ``--sparse_attention NAME``: "auto" is the Pallas kernel on
    TPU and the portable XLA one elsewhere; "pallas" off TPU runs in interpret mode (tests)."""
    platform = platform or jax.default_backend()
    if name == "auto":
        name = "pallas" if platform == "tpu" else "xla"
    if name == "xla":
        return block_sparse_xla
    if name == "pallas":
        return block_sparse_pallas(interpret=platform != "tpu")
    raise InputError(f"{{sparse_attention}} {name!r} is not one of {', '.join(SPARSE_BACKENDS)}")


def sparse_on_mesh(kernel: SparseKernel, mesh: Mesh | None) -> SparseKernel:
    """A block-sparse kernel per device: batch over "dp", heads over every other axis (each
    head has its own block lists, so they split with it)."""
    if mesh is None or mesh.size == 1:
        return kernel
    heads = tuple(a for a in mesh.axis_names if a != "dp")
    qkv, lists, counts = P("dp", heads, None, None), P("dp", heads, None, None), P("dp", heads, None)

    def sharded(q, k, v, kv_blocks, kv_counts, block_size, scale):
        return jax.shard_map(
            functools.partial(kernel, block_size=block_size, scale=scale), mesh=mesh,
            in_specs=(qkv, qkv, qkv, lists, counts), out_specs=qkv, check_vma=False,
        )(q, k, v, kv_blocks, kv_counts)

    return sharded
