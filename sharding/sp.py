"""Sequence parallelism (Ulysses) over ``sp``: the video tokens are split across devices.

Weights are replicated. Each device runs the per-token layers (modulation, q/k/v, MLP) on its
share of the image tokens; for attention an all-to-all trades the token split for a head split
(every device then sees all tokens for its heads) and a second all-to-all trades it back. The
text stream (a few hundred tokens) is replicated; its attention output is all-gathered over heads.
"""

from jax.sharding import PartitionSpec as P

from .strategy import Strategy

STRATEGY = Strategy(
    name="sp",
    description="Ulysses sequence parallel: image tokens split, all-to-all to heads for attention",
    params=(),
    activations={
        "img": P("dp", "sp"), "txt": P("dp"),
        "img_heads": P("dp", None, "sp"), "txt_heads": P("dp", None, "sp"),
        "img_attn": P("dp", "sp"), "txt_attn": P("dp"),
        "img_mlp": P("dp", "sp"), "txt_mlp": P("dp"),
    },
    axes=("dp", "sp"),
    token_axes=("sp",),
)
