"""Training checkpoints: everything a run needs to continue exactly where it stopped.

    <run>/checkpoints/step_000100/
        trainable.safetensors   the trained tensors, float32, official names (a LoRA run: the
                                adapter in the official trainer's file format)
        optimizer.safetensors   every optimizer-state leaf, keyed by its path in the state tree
        state.json              step, data position (global batch index), seed, run fingerprint
    <run>/checkpoints/latest    the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, then ``latest`` is
rewritten: a kill at any moment leaves the previous checkpoint whole. The step's random key
is a function of (seed, step), so the seed and the step are the whole RNG state.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
import torch
from jax.experimental import multihost_utils

from .files import InputError, read_json, read_safetensors, remove_stale_temporaries, save_safetensors, write_json
from .runtime import to_torch

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
LATEST = "latest"


@dataclasses.dataclass(frozen=True)
class RunPosition:
    step: int  # optimizer updates done
    data_position: int  # global batches consumed
    seed: int
    fingerprint: str


def host_array(x: jax.Array) -> np.ndarray:
    """A device array on the host; on several hosts every process joins the gather."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def flatten_state(tree: Any) -> dict[str, jax.Array]:
    """Leaves of a pytree keyed by their path (``keystr``), e.g. ``[1][0].mu['img_in.proj.weight']``."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def save(
    folder: Path,
    position: RunPosition,
    trainable: Mapping[str, jax.Array],
    opt_state: Any,
    *,
    write_trainable: Callable[[Path, dict[str, torch.Tensor]], None],
    keep: int,
    writer: bool = True,
) -> Path:
    """Write checkpoint ``step_<step>`` under ``folder`` atomically and keep the newest ``keep``.

    ``write_trainable(path, tensors)`` writes the trained tensors (it knows their file format);
    every process takes part in gathering sharded arrays, only the ``writer`` writes.
    """
    trainable_host = {k: to_torch(host_array(v)) for k, v in trainable.items()}
    optimizer_host = {k: to_torch(host_array(v)) for k, v in flatten_state(opt_state).items()}
    name = f"step_{position.step:06d}"
    final = folder / name
    if not writer:
        return final
    tmp = folder / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    remove_stale_temporaries(folder)  # what a killed run left half-written
    try:
        write_trainable(tmp / TRAINABLE, trainable_host)
        save_safetensors(optimizer_host, tmp / OPTIMIZER)
        write_json(tmp / STATE, dataclasses.asdict(position))
        shutil.rmtree(final, ignore_errors=True)  # a step redone after a resume replaces its old copy
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(folder / LATEST, {"checkpoint": name, "step": position.step})
    for old in sorted(p for p in folder.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint under ``folder``, or None."""
    pointer = folder / LATEST
    if not pointer.exists():
        return None
    path = folder / str(read_json(pointer).get("checkpoint", ""))
    if not (path / STATE).is_file():
        raise InputError(f"{pointer}: names {path.name}, which is not a complete checkpoint")
    return path


def read_position(path: Path) -> RunPosition:
    raw = read_json(path / STATE)
    try:
        return RunPosition(int(raw["step"]), int(raw["data_position"]), int(raw["seed"]), str(raw["fingerprint"]))
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path / STATE}: not a training state ({e})") from None


def restore(path: Path, trainable: Mapping[str, jax.Array], opt_state: Any,
            read_trainable: Callable[[Path], dict[str, torch.Tensor]]) -> tuple[dict[str, jax.Array], Any]:
    """Checkpoint tensors placed like the given (freshly initialised) ``trainable`` and
    ``opt_state``, whose names, shapes and dtypes they must match."""
    def place(saved: Mapping[str, torch.Tensor], like: Mapping[str, jax.Array], file: Path) -> dict[str, jax.Array]:
        out = {}
        for key, ref in like.items():
            if key not in saved:
                raise InputError(f"{file}: no tensor {key}; the checkpoint is from another kind of run")
            value = saved[key].numpy()
            if value.shape != ref.shape:
                raise InputError(f"{file}: {key} has shape {value.shape}, the run needs {ref.shape}")
            out[key] = jax.device_put(value.astype(ref.dtype), ref.sharding)
        return out

    params = place(read_trainable(path / TRAINABLE), trainable, path / TRAINABLE)
    optimizer, _ = read_safetensors(path / OPTIMIZER)
    flat = place(optimizer, flatten_state(opt_state), path / OPTIMIZER)  # in the tree's leaf order
    return params, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(opt_state), list(flat.values()))
