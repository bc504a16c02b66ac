"""Megatron tensor parallelism over ``tp``.

q/k/v and fc1 are column-parallel (output features split, so each device owns whole heads and
a slice of the MLP); attn_proj and fc2 are row-parallel (input features split), so each of
those four matmuls per block ends in an all-reduce of its partial sums. The residual streams
are replicated across ``tp``.
"""

from jax.sharding import PartitionSpec as P

from .strategy import Strategy

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
        "img": P("dp"), "txt": P("dp"),
        "img_heads": P("dp", None, "tp"), "txt_heads": P("dp", None, "tp"),
        "img_attn": P("dp", None, "tp"), "txt_attn": P("dp", None, "tp"),
        "img_mlp": P("dp", None, "tp"), "txt_mlp": P("dp", None, "tp"),
    },
    axes=("dp", "tp"),
)
