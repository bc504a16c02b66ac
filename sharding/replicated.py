"""Every weight on every device: the memory baseline.

Only ``dp`` splits work (the CFG batch); on any other axis the devices repeat the same
per-token work, except attention, whose heads are always split over the non-dp axes.
"""

from jax.sharding import PartitionSpec as P

from .strategy import ACTIVATIONS, MESH_AXES, Strategy

STRATEGY = Strategy(
    name="replicated",
    description="all weights on every device; dp splits the CFG batch, other axes repeat the work",
    params=(),
    activations={name: P("dp") for name in ACTIVATIONS},
    axes=MESH_AXES,
)
