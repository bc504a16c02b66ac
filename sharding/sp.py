"""Sequence parallelism (Ulysses) over ``sp``: the video tokens are split across devices.

Weights are replicated. Each device runs the per-token layers (modulation, q/k/v, MLP) on its
share of the image tokens; for attention an all-to-all trades the token split for a head split
(every device then sees all tokens for its heads) and a second all-to-all trades it back. The
text stream (a few hundred tokens) is replicated; its attention output is all-gathered over heads.
"""

from jax.sharding import PartitionSpec as P

from .strategy import IMG, IMG_ATTN, IMG_HEADS, IMG_MLP, TXT, TXT_ATTN, TXT_HEADS, TXT_MLP, Strategy

STRATEGY = Strategy(
    name="sp",
    description="Ulysses sequence parallel: image tokens split, all-to-all to heads for attention",
    params=(),
    activations={
        IMG: P("dp", "sp"), TXT: P("dp"),
        IMG_HEADS: P("dp", None, "sp"), TXT_HEADS: P("dp", None, "sp"),
        IMG_ATTN: P("dp", "sp"), TXT_ATTN: P("dp"),
        IMG_MLP: P("dp", "sp"), TXT_MLP: P("dp"),
    },
    axes=("dp", "sp"),
    token_axes=("sp",),
)
