"""Fully sharded weights over ``fsdp``, gathered layer by layer, with the tokens split too.

Every weight matrix is split on its first axis across ``fsdp`` (1/n of the weights per
device); XLA all-gathers each one just before its matmul and frees it after. With a CFG batch
of at most 2 there is no batch to split, so the work is split by image tokens, with the same
all-to-all attention as ``sp``: this is sp with ZeRO-3 weights.
"""

from jax.sharding import PartitionSpec as P

from .strategy import Strategy

STRATEGY = Strategy(
    name="fsdp",
    description="weights split over fsdp and all-gathered per layer; tokens split as in sp",
    params=(
        (r"cond_type_embedding\.weight", P(None, "fsdp")),  # 3 rows: split the width instead
        (r".*\.weight", P("fsdp")),
    ),
    activations={
        "img": P("dp", "fsdp"), "txt": P("dp"),
        "img_heads": P("dp", None, "fsdp"), "txt_heads": P("dp", None, "fsdp"),
        "img_attn": P("dp", "fsdp"), "txt_attn": P("dp"),
        "img_mlp": P("dp", "fsdp"), "txt_mlp": P("dp"),
    },
    axes=("dp", "fsdp"),
    token_axes=("fsdp",),
)
