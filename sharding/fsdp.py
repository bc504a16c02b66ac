"""Fully sharded weights over ``fsdp``, gathered layer by layer, with the tokens split too.

Every weight matrix is split on its first axis across ``fsdp`` (1/n of the weights per
device); XLA all-gathers each one just before its matmul and frees it after. With a CFG batch
of at most 2 there is no batch to split, so the work is split by image tokens, with the same
all-to-all attention as ``sp``: this is sp with ZeRO-3 weights.
"""

from jax.sharding import PartitionSpec as P

from .strategy import IMG, IMG_ATTN, IMG_HEADS, IMG_MLP, TXT, TXT_ATTN, TXT_HEADS, TXT_MLP, Strategy

STRATEGY = Strategy(
    name="fsdp",
    description="weights split over fsdp and all-gathered per layer; tokens split as in sp",
    params=(
        (r"cond_type_embedding\.weight", P(None, "fsdp")),  # 3 rows: split the width instead
        (r".*\.weight", P("fsdp")),
    ),
    activations={
        IMG: P("dp", "fsdp"), TXT: P("dp"),
        IMG_HEADS: P("dp", None, "fsdp"), TXT_HEADS: P("dp", None, "fsdp"),
        IMG_ATTN: P("dp", "fsdp"), TXT_ATTN: P("dp"),
        IMG_MLP: P("dp", "fsdp"), TXT_MLP: P("dp"),
    },
    axes=("dp", "fsdp"),
    token_axes=("fsdp",),
)
