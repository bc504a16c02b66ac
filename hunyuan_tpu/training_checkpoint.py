"""Training checkpoints: everything a run needs to continue exactly where it stopped, written
with orbax-checkpoint.

    <run>/checkpoints/step_000100/
        state/      the trained tensors and every optimizer-state leaf, float32, sharded as on
                    the devices: each process writes the shards its devices hold, and a resume
                    reads only the slices its own devices need (on any process count or mesh)
        position/   step, data position (global batch index), seed, run fingerprint (JSON)

orbax writes a checkpoint under a temporary name and renames it when every process has
finished, so a kill at any moment leaves the previous checkpoint whole; temporaries a killed
run left are removed when the next run opens the folder. Saving is asynchronous: the arrays
are copied off the devices, then written while the next updates run. The step's random key
is a function of (seed, step), so the seed and the step are the whole RNG state.

On several hosts the folder must be one that every host writes (a shared file system, or a
bucket mounted on each): each host writes its own shards, process 0 commits.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import jax

from .files import InputError

STATE, POSITION = "state", "position"


@dataclasses.dataclass(frozen=True)
class RunPosition:
    step: int  # optimizer updates done
    data_position: int  # global batches consumed
    seed: int
    fingerprint: str


def _abstract(tree: Any) -> Any:
    """Where and how each leaf of ``tree`` lives, without its values: what a restore fills in."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpoints:
    """The checkpoints of one run under ``folder``, the newest ``keep`` kept. Every process of
    the job opens it and calls ``save`` together (each writes its own shards)."""

    def __init__(self, folder: Path, keep: int, *, asynchronous: bool = True):
        import orbax.checkpoint as ocp  # a second to import: only runs that checkpoint pay it

        self._ocp = ocp
        self.folder = Path(folder).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, step_prefix="step", step_format_fixed_length=6, cleanup_tmp_directories=True,
            enable_async_checkpointing=asynchronous, create=False)
        self._manager = ocp.CheckpointManager(self.folder, options=options, item_names=(STATE, POSITION))

    def path(self, step: int) -> Path:
        return self.folder / f"step_{step:06d}"

    def latest(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, position: RunPosition, trainable: Mapping[str, jax.Array], opt_state: Any) -> None:
        """Start writing ``step_<step>``; it is complete (and the oldest beyond ``keep`` gone)
        once the write finishes, at the latest by the next ``save`` or ``wait``."""
        ocp = self._ocp
        self.folder.mkdir(parents=True, exist_ok=True)
        self._manager.save(position.step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave({"trainable": dict(trainable), "optimizer": opt_state}),
            POSITION: ocp.args.JsonSave(dataclasses.asdict(position)),
        }), force=True)

    def read_position(self, step: int) -> RunPosition:
        path = self.path(step)
        try:
            raw = self._manager.restore(step, args=self._ocp.args.Composite(**{POSITION: self._ocp.args.JsonRestore()}))
            raw = raw[POSITION]
            return RunPosition(int(raw["step"]), int(raw["data_position"]), int(raw["seed"]), str(raw["fingerprint"]))
        except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
            raise InputError(f"{path}: not a training checkpoint of this version ({e})") from None

    def restore(self, step: int, trainable: Mapping[str, jax.Array], opt_state: Any
                ) -> tuple[dict[str, jax.Array], Any]:
        """The checkpoint's tensors placed like the given (freshly initialised) ``trainable`` and
        ``opt_state``, whose structure, shapes and dtypes they must match."""
        ocp = self._ocp
        like = {"trainable": dict(trainable), "optimizer": opt_state}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(_abstract(like))}))[STATE]
        except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
            raise InputError(f"{self.path(step)}: its tensors do not fit this run ({e})") from None
        return restored["trainable"], restored["optimizer"]

    def wait(self) -> None:
        """Until the checkpoint being written is complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
