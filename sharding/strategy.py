"""What a sharding strategy is: data over the official parameter names and activation names.

A mesh always has the four axes ``dp`` (splits the CFG batch), ``fsdp``, ``sp`` and ``tp``;
axes a run does not use have size 1, so a spec may name any of them. Attention always runs
with the batch over ``dp`` and the heads over every other axis (``hunyuan_tpu.runtime.on_mesh``),
so the ``*_heads`` layouts below should shard heads the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from jax.sharding import PartitionSpec as P

MESH_AXES = ("dp", "fsdp", "sp", "tp")

# The activations the model names (``hunyuan_tpu.model.Execution.layout``): these constants
# are the one spelling of each name, used by the model and by every strategy's table.
IMG, TXT = "img", "txt"
IMG_HEADS, TXT_HEADS = "img_heads", "txt_heads"
IMG_ATTN, TXT_ATTN = "img_attn", "txt_attn"
IMG_MLP, TXT_MLP = "img_mlp", "txt_mlp"

ACTIVATIONS = {
    IMG: "(B, L, C) image residual stream, between blocks",
    TXT: "(B, S, C) text residual stream, between blocks",
    IMG_HEADS: "(B, L, N, D) image q, k and v entering attention",
    TXT_HEADS: "(B, S, N, D) text q, k and v entering attention",
    IMG_ATTN: "(B, L, C) image attention output, entering img_attn_proj",
    TXT_ATTN: "(B, S, C) text attention output, entering txt_attn_proj",
    IMG_MLP: "(B, L, F) image MLP hidden state, entering img_mlp.fc2",
    TXT_MLP: "(B, S, F) text MLP hidden state, entering txt_mlp.fc2",
}


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A named layout of the DiT on a mesh.

    params: ordered (regex, spec) pairs; a parameter takes the spec of the first regex that
        matches its whole official name (``double_blocks.3.img_attn_q.weight``); unmatched
        parameters are replicated.
    activations: activation name (see ACTIVATIONS) -> spec; missing names are left to XLA.
    axes: the mesh axes the strategy uses; any other axis must have size 1.
    token_axes: axes the image tokens are split over; the token count is padded (and the
        padding masked) to a multiple of their total size.
    """

    name: str
    description: str
    params: tuple[tuple[str, P], ...]
    activations: Mapping[str, P]
    axes: tuple[str, ...]
    token_axes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.activations) - set(ACTIVATIONS)
        if unknown:
            raise ValueError(f"strategy {self.name}: unknown activation name(s) {sorted(unknown)}")
        bad_axes = set(self.axes) - set(MESH_AXES)
        if bad_axes or "dp" not in self.axes:
            raise ValueError(f"strategy {self.name}: axes must be among {MESH_AXES} and include dp")
