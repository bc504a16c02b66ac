"""Tensor parallelism with replicated proj/fc2 (the TPU port's default, seed 003).

q/k/v and fc1 are column-parallel as in Megatron, but attn_proj and fc2 keep whole weights on
every device. Their inputs are moved from feature-split to token-split (an all-to-all), each
device runs the full-width matmul on its share of the tokens, and the residual stream is
gathered back (an all-gather): no all-reduce at all, less data on the wire than the two
all-reduces per stream and block of Megatron, for the memory of replicated proj/fc2 weights.
"""

from jax.sharding import PartitionSpec as P

from .strategy import Strategy
from .tp import COLUMN

STRATEGY = Strategy(
    name="tp_fc2_replicated",
    description="column-parallel q/k/v/fc1, replicated proj/fc2 on token-split inputs (no all-reduce)",
    params=(
        (COLUMN + r"\.weight", P("tp", None)),
        (COLUMN + r"\.bias", P("tp")),
    ),
    activations={
        "img": P("dp"), "txt": P("dp"),
        "img_heads": P("dp", None, "tp"), "txt_heads": P("dp", None, "tp"),
        "img_attn": P("dp", "tp"), "txt_attn": P("dp", "tp"),
        "img_mlp": P("dp", "tp"), "txt_mlp": P("dp", "tp"),
    },
    axes=("dp", "tp"),
)
