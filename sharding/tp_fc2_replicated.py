"""Tensor parallelism with replicated proj/fc2 (the TPU port's default, seed 003).

q/k/v and fc1 are column-parallel as in Megatron, but attn_proj and fc2 keep whole weights on
every device. Their inputs are moved from feature-split to token-split (an all-to-all), each
device runs the full-width matmul on its share of the tokens, and the residual stream is
gathered back (an all-gather): no all-reduce at all, less data on the wire than the two
all-reduces per stream and block of Megatron, for the memory of replicated proj/fc2 weights.
"""

from jax.sharding import PartitionSpec as P

from .strategy import IMG, IMG_ATTN, IMG_HEADS, IMG_MLP, TXT, TXT_ATTN, TXT_HEADS, TXT_MLP, Strategy
from .tp import COLUMN

STRATEGY = Strategy(
    name="tp_fc2_replicated",
    description="column-parallel q/k/v/fc1, replicated proj/fc2 on token-split inputs (no all-reduce)",
    params=(
        (COLUMN + r"\.weight", P("tp", None)),
        (COLUMN + r"\.bias", P("tp")),
    ),
    activations={
        IMG: P("dp"), TXT: P("dp"),
        IMG_HEADS: P("dp", None, "tp"), TXT_HEADS: P("dp", None, "tp"),
        IMG_ATTN: P("dp", "tp"), TXT_ATTN: P("dp", "tp"),
        IMG_MLP: P("dp", "tp"), TXT_MLP: P("dp", "tp"),
    },
    axes=("dp", "tp"),
)
