"""Megatron tensor parallelism over ``tp``.

q/k/v and fc1 are column-parallel (output features split, so each device owns whole heads and
a slice of the MLP); attn_proj and fc2 are row-parallel (input features split), so each of
those four matmuls per block ends in an all-reduce of its partial sums. The residual streams
are replicated across ``tp``.
"""

from jax.sharding import PartitionSpec as P

from .strategy import IMG, IMG_ATTN, IMG_HEADS, IMG_MLP, TXT, TXT_ATTN, TXT_HEADS, TXT_MLP, Strategy

COLUMN = r"double_blocks\.\d+\.(img|txt)_(attn_[qkv]|mlp\.fc1)"
ROW = r"double_blocks\.\d+\.(img|txt)_(attn_proj|mlp\.fc2)"

STRATEGY = Strategy(
    name="tp",
    description="Megatron: column-parallel q/k/v/fc1, row-parallel proj/fc2 (all-reduce after each)",
    params=(
        (COLUMN + r"\.weight", P("tp", None)),
        (COLUMN + r"\.bias", P("tp")),
        (ROW + r"\.weight", P(None, "tp")),
    ),
    activations={
        IMG: P("dp"), TXT: P("dp"),
        IMG_HEADS: P("dp", None, "tp"), TXT_HEADS: P("dp", None, "tp"),
        IMG_ATTN: P("dp", None, "tp"), TXT_ATTN: P("dp", None, "tp"),
        IMG_MLP: P("dp", None, "tp"), TXT_MLP: P("dp", None, "tp"),
    },
    axes=("dp", "tp"),
)
