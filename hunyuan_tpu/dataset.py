"""Training data: precomputed latents and text embeddings in safetensors shards, and the order
they are read in.

    <folder>/dataset.json               {"format": FORMAT, "samples": N, "shards": [{"file", "samples"}],
                                         "shapes": per-sample shape of each tensor}
    <folder>/shard-00000.safetensors    latents (n, 32, T, H, W): VAE latents, already scaled;
                                        prompt_embeds (n, S1, 3584), prompt_mask (n, S1),
                                        prompt_embeds_2 (n, S2, 1472), prompt_mask_2 (n, S2): stage 1;
                                        optionally vision_states (n, 729, 1152): SigLIP of the first
                                        frame, which makes the samples usable for i2v
    <folder>/empty_prompt.safetensors   optional: the four text tensors (1, ...) of the prompt "",
                                        the negative prompt stage 1 writes by default (text dropout)

Every sample has the same shapes, so a run compiles one step. The order is a seeded
permutation per epoch; a batch is identified by its global index alone, so a run resumes
mid-epoch from that index.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from safetensors import safe_open

from .config import DiTConfig
from .files import InputError, read_json, read_safetensors, save_safetensors, write_json
from .handoff import TEXT_KEYS
from .pipeline import LATENT_CHANNELS

FORMAT = "hunyuan-tpu-training/1"
MANIFEST = "dataset.json"
EMPTY_PROMPT = "empty_prompt.safetensors"
REQUIRED = ("latents",) + TEXT_KEYS
OPTIONAL = ("vision_states",)


class DataError(InputError):
    """Training data that is missing, malformed or does not fit the model."""


def expected_widths(config: DiTConfig) -> dict[str, tuple[int, int]]:
    """(axis, size) a model fixes for each tensor's per-sample shape."""
    return {"latents": (0, LATENT_CHANNELS), "prompt_embeds": (1, config.text_states_dim),
            "prompt_embeds_2": (1, config.byt5_states_dim), "vision_states": (1, config.vision_states_dim)}


class TrainingData:
    """A dataset folder, checked against ``config`` from the headers alone (no tensor is read)."""

    def __init__(self, folder: str | Path, config: DiTConfig):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: no such dataset folder")
        manifest_path = self.folder / MANIFEST
        manifest = read_json(manifest_path)
        if manifest.get("format") != FORMAT:
            raise DataError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        try:
            self.shards = [(str(s["file"]), int(s["samples"])) for s in manifest["shards"]]
            self.shapes = {k: tuple(int(n) for n in v) for k, v in manifest["shapes"].items()}
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{manifest_path}: needs 'shards' [{{file, samples}}] and 'shapes': {e}") from None
        missing = [k for k in REQUIRED if k not in self.shapes]
        if missing or not self.shards:
            raise DataError(f"{manifest_path}: no shards, or no shape for {', '.join(missing)}")
        for key, (axis, size) in expected_widths(config).items():
            shape = self.shapes.get(key)
            if shape is not None and (len(shape) <= axis or shape[axis] != size):
                raise DataError(f"{manifest_path}: {key} has per-sample shape {shape}, but the model needs "
                                f"{size} at axis {axis}")
        self.keys = tuple(k for k in REQUIRED + OPTIONAL if k in self.shapes)
        self._offsets = np.cumsum([0] + [n for _, n in self.shards])
        for file, count in self.shards:
            self._check_shard(self.folder / file, count)
        self._empty = self._read_empty_prompt()

    def _check_shard(self, path: Path, count: int) -> None:
        if not path.is_file():
            raise DataError(f"{path}: shard listed in {MANIFEST} is missing")
        try:
            with safe_open(str(path), framework="np") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:
            raise DataError(f"{path}: cannot read safetensors header (truncated or corrupt?): {e}") from None
        for key in self.keys:
            expected = (count, *self.shapes[key])
            if key not in shapes:
                raise DataError(f"{path}: no tensor {key}")
            if shapes[key] != expected:
                raise DataError(f"{path}: {key} has shape {shapes[key]}, expected {expected} (from {MANIFEST})")

    def _read_empty_prompt(self) -> dict[str, np.ndarray] | None:
        path = self.folder / EMPTY_PROMPT
        if not path.exists():
            return None
        tensors, _ = read_safetensors(path, error=DataError)
        out = {}
        for key in TEXT_KEYS:
            if key not in tensors or tuple(tensors[key].shape) != (1, *self.shapes[key]):
                raise DataError(f"{path}: {key} must have shape {(1, *self.shapes[key])}")
            out[key] = _numpy(key, tensors[key])
        return out

    @property
    def num_samples(self) -> int:
        return int(self._offsets[-1])

    @property
    def i2v_capable(self) -> bool:
        return "vision_states" in self.shapes

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(32, T, H, W) of every sample."""
        return self.shapes["latents"]

    def empty_prompt(self) -> dict[str, np.ndarray] | None:
        """The encoding of "" (1, ...) for text dropout, if the folder has one."""
        return self._empty

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The samples at ``indices`` stacked: states and latents float32, masks int32."""
        out: dict[str, list[np.ndarray]] = {k: [] for k in self.keys}
        with contextlib.ExitStack() as stack:
            handles: dict[int, object] = {}
            for index in indices:
                shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
                if shard not in handles:
                    path = self.folder / self.shards[shard][0]
                    try:
                        handles[shard] = stack.enter_context(safe_open(str(path), framework="pt"))
                    except Exception as e:
                        raise DataError(f"{path}: cannot read shard: {e}") from None
                row = int(index - self._offsets[shard])
                path = self.folder / self.shards[shard][0]
                for key in self.keys:
                    try:
                        value = _numpy(key, handles[shard].get_slice(key)[row:row + 1])
                    except Exception as e:
                        raise DataError(f"{path}: cannot read {key}[{row}]: {e}") from None
                    if not np.isfinite(value).all():
                        raise DataError(f"{path}: sample {row} has non-finite values (NaN or inf) in {key}")
                    out[key].append(value)
        return {k: np.concatenate(v) for k, v in out.items()}


def _numpy(key: str, t: torch.Tensor) -> np.ndarray:
    return t.to(torch.int32).numpy() if "mask" in key else t.float().numpy()


@dataclasses.dataclass(frozen=True)
class DataOrder:
    """Which samples form global batch ``n``: epoch ``n // per_epoch`` is a permutation seeded by
    (seed, epoch), cut into batches; the few samples left over at an epoch's end are skipped."""

    num_samples: int
    batch: int
    seed: int

    def __post_init__(self) -> None:
        if self.batch > self.num_samples:
            raise DataError(f"a step takes {self.batch} samples but the dataset has {self.num_samples}")

    @property
    def per_epoch(self) -> int:
        return self.num_samples // self.batch

    def indices(self, n: int) -> np.ndarray:
        epoch, k = divmod(n, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return order[k * self.batch:(k + 1) * self.batch]


def write_dataset(
    folder: str | Path,
    samples: Mapping[str, np.ndarray],
    *,
    shard_size: int = 64,
    empty_prompt: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write ``samples`` (each tensor with a leading sample axis) as shards, then the manifest
    (written last, atomically: a folder without one is not a dataset)."""
    folder = Path(folder)
    missing = [k for k in REQUIRED if k not in samples]
    if missing:
        raise DataError(f"samples lack {', '.join(missing)}")
    keys = [k for k in REQUIRED + OPTIONAL if k in samples]
    count = len(samples["latents"])
    if any(len(samples[k]) != count for k in keys):
        raise DataError("every tensor needs the same number of samples")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    shards = []
    for i, start in enumerate(range(0, count, shard_size)):
        file = f"shard-{i:05d}.safetensors"
        part = {k: torch.from_numpy(np.ascontiguousarray(samples[k][start:start + shard_size])) for k in keys}
        save_safetensors(part, folder / file)
        shards.append({"file": file, "samples": len(part["latents"])})
    if empty_prompt is not None:
        save_safetensors({k: torch.from_numpy(np.ascontiguousarray(empty_prompt[k])) for k in TEXT_KEYS},
                         folder / EMPTY_PROMPT)
    write_json(folder / MANIFEST, {"format": FORMAT, "samples": count, "shards": shards,
                                   "shapes": {k: list(samples[k].shape[1:]) for k in keys}})
    return folder
