"""Training data: precomputed latents and text embeddings in safetensors shards, grouped into
buckets of one shape each, and the order they are read in.

    <folder>/dataset.json               {"format": FORMAT, "samples": N, "buckets": [{"name", "samples",
                                         "shapes": per-sample shape of each tensor, "shards": [{"file", "samples"}]}]}
    <folder>/<shard>.safetensors        latents (n, 32, T, H, W): VAE latents, already scaled;
                                        prompt_embeds (n, S1, 3584), prompt_mask (n, S1),
                                        prompt_embeds_2 (n, S2, 1472), prompt_mask_2 (n, S2): stage 1;
                                        optionally vision_states (n, 729, 1152): SigLIP of the first
                                        frame, which makes the samples usable for i2v
    <folder>/empty_prompt.safetensors   optional: the four text tensors (1, ...) of the prompt "",
                                        the negative prompt stage 1 writes by default (text dropout)

Every sample of a bucket has the same shapes (buckets differ in their latents: frames, height,
width; the text tensors are padded to one length everywhere), so a run compiles one step per
bucket. A batch is drawn from one bucket; the order is seeded per epoch and a batch is
identified by its global index alone, so a run resumes mid-epoch from that index.
``hunyuan-tpu-training/1`` folders (one shape, "shards" and "shapes" at the top) read as one bucket.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open

from .config import DiTConfig
from .files import InputError, read_json, read_safetensors, save_safetensors, write_json
from .handoff import TEXT_KEYS
from .pipeline import LATENT_CHANNELS, VAE_SPATIAL, VAE_TEMPORAL

FORMAT = "hunyuan-tpu-training/2"
FORMAT_V1 = "hunyuan-tpu-training/1"
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


def bucket_name(latent_shape: Sequence[int]) -> str:
    """``FRAMESxHEIGHTxWIDTH`` in video pixels for (32, T, H, W) latents, e.g. 121x480x848."""
    _, t, h, w = latent_shape
    return f"{VAE_TEMPORAL * (t - 1) + 1}x{h * VAE_SPATIAL}x{w * VAE_SPATIAL}"


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Samples of one shape: ``shards`` are (file, samples) in order."""

    name: str
    shapes: dict[str, tuple[int, ...]]
    shards: tuple[tuple[str, int], ...]

    @property
    def samples(self) -> int:
        return sum(n for _, n in self.shards)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(32, T, H, W) of every sample."""
        return self.shapes["latents"]

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "samples": self.samples, "shapes": {k: list(v) for k, v in self.shapes.items()},
                "shards": [{"file": f, "samples": n} for f, n in self.shards]}


def _buckets_of(manifest: dict, path: Path) -> list[Bucket]:
    """The manifest's buckets (a version-1 manifest is one)."""
    if manifest.get("format") not in (FORMAT, FORMAT_V1):
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    entries = [manifest] if manifest["format"] == FORMAT_V1 else manifest.get("buckets")
    try:
        buckets = []
        for entry in entries:
            shapes = {k: tuple(int(n) for n in v) for k, v in entry["shapes"].items()}
            shards = tuple((str(s["file"]), int(s["samples"])) for s in entry["shards"])
            buckets.append(Bucket(entry.get("name") or bucket_name(shapes["latents"]), shapes, shards))
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: each bucket needs 'shapes' and 'shards' [{{file, samples}}] "
                        f"(a latents shape among them): {e!r}") from None
    if not buckets or not all(b.shards for b in buckets):
        raise DataError(f"{path}: no buckets, or a bucket without shards")
    return buckets


class TrainingData:
    """A dataset folder, checked against ``config`` from the headers alone (no tensor is read).
    Samples are numbered bucket after bucket, shard after shard."""

    def __init__(self, folder: str | Path, config: DiTConfig):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: no such dataset folder")
        manifest_path = self.folder / MANIFEST
        self.buckets = _buckets_of(read_json(manifest_path), manifest_path)
        first = self.buckets[0].shapes
        for bucket in self.buckets:
            missing = [k for k in REQUIRED if k not in bucket.shapes]
            if missing:
                raise DataError(f"{manifest_path}: bucket {bucket.name} has no shape for {', '.join(missing)}")
            if set(bucket.shapes) != set(first) or any(bucket.shapes[k] != first[k] for k in TEXT_KEYS):
                raise DataError(f"{manifest_path}: bucket {bucket.name} has other tensors or text shapes than "
                                f"{self.buckets[0].name}; every bucket needs the same (only latents differ)")
            for key, (axis, size) in expected_widths(config).items():
                shape = bucket.shapes.get(key)
                if shape is not None and (len(shape) <= axis or shape[axis] != size):
                    raise DataError(f"{manifest_path}: {key} has per-sample shape {shape} in bucket {bucket.name}, "
                                    f"but the model needs {size} at axis {axis}")
        self.keys = tuple(k for k in REQUIRED + OPTIONAL if k in first)
        self._shards = [(bucket, file, count) for bucket in self.buckets for file, count in bucket.shards]
        self._offsets = np.cumsum([0] + [count for _, _, count in self._shards])
        for bucket, file, count in self._shards:
            self._check_shard(self.folder / file, count, bucket.shapes)
        self._empty = self._read_empty_prompt()

    def _check_shard(self, path: Path, count: int, shapes: dict[str, tuple[int, ...]]) -> None:
        if not path.is_file():
            raise DataError(f"{path}: shard listed in {MANIFEST} is missing")
        try:
            with safe_open(str(path), framework="np") as f:
                found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:
            raise DataError(f"{path}: cannot read safetensors header (truncated or corrupt?): {e}") from None
        for key in self.keys:
            expected = (count, *shapes[key])
            if key not in found:
                raise DataError(f"{path}: no tensor {key}")
            if found[key] != expected:
                raise DataError(f"{path}: {key} has shape {found[key]}, expected {expected} (from {MANIFEST})")

    def _read_empty_prompt(self) -> dict[str, np.ndarray] | None:
        path = self.folder / EMPTY_PROMPT
        if not path.exists():
            return None
        tensors, _ = read_safetensors(path, error=DataError)
        out = {}
        shapes = self.buckets[0].shapes
        for key in TEXT_KEYS:
            if key not in tensors or tuple(tensors[key].shape) != (1, *shapes[key]):
                raise DataError(f"{path}: {key} must have shape {(1, *shapes[key])}")
            out[key] = _numpy(key, tensors[key])
        return out

    @property
    def num_samples(self) -> int:
        return int(self._offsets[-1])

    @property
    def bucket_sizes(self) -> tuple[int, ...]:
        return tuple(b.samples for b in self.buckets)

    @property
    def i2v_capable(self) -> bool:
        return "vision_states" in self.keys

    @property
    def fingerprint(self) -> list[dict[str, Any]]:
        """What identifies the data: its buckets, their shapes and shards."""
        return [b.record() for b in self.buckets]

    def bucket_of(self, index: int) -> Bucket:
        shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return self._shards[shard][0]

    def empty_prompt(self) -> dict[str, np.ndarray] | None:
        """The encoding of "" (1, ...) for text dropout, if the folder has one."""
        return self._empty

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The samples at ``indices`` (of one bucket) stacked: states and latents float32, masks int32."""
        if len({self.bucket_of(int(i)).name for i in indices}) > 1:
            raise DataError(f"samples {list(indices)} are of several buckets; a batch takes one")
        out: dict[str, list[np.ndarray]] = {k: [] for k in self.keys}
        with contextlib.ExitStack() as stack:
            handles: dict[int, object] = {}
            for index in indices:
                shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
                path = self.folder / self._shards[shard][1]
                if shard not in handles:
                    try:
                        handles[shard] = stack.enter_context(safe_open(str(path), framework="pt"))
                    except Exception as e:
                        raise DataError(f"{path}: cannot read shard: {e}") from None
                row = int(index - self._offsets[shard])
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
    """Which samples form global batch ``n`` when the samples come in buckets of ``sizes``
    (numbered bucket after bucket). In epoch ``n // per_epoch`` each bucket's samples are
    permuted (seeded by seed, epoch, bucket) and cut into batches, the few left over at a
    bucket's end skipped; then the batches of all buckets are shuffled together (seed, epoch),
    so every batch is of one bucket and the buckets mix in proportion to their sizes."""

    sizes: tuple[int, ...]
    batch: int
    seed: int

    def __post_init__(self) -> None:
        if self.batch > max(self.sizes):
            raise DataError(f"a step takes {self.batch} samples but the largest bucket has {max(self.sizes)}")

    @property
    def per_epoch(self) -> int:
        return sum(n // self.batch for n in self.sizes)

    def indices(self, n: int) -> np.ndarray:
        epoch, k = divmod(n, self.per_epoch)
        batches = []
        for b, (start, size) in enumerate(zip(np.cumsum((0,) + self.sizes[:-1]), self.sizes)):
            order = np.random.default_rng([self.seed, epoch, b]).permutation(size) + start
            batches += [order[i * self.batch:(i + 1) * self.batch] for i in range(size // self.batch)]
        return batches[int(np.random.default_rng([self.seed, epoch]).permutation(len(batches))[k])]


def write_shard(path: Path, samples: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None) -> int:
    """One shard (renamed into place when whole); returns its sample count."""
    missing = [k for k in REQUIRED if k not in samples]
    if missing:
        raise DataError(f"samples lack {', '.join(missing)}")
    keys = [k for k in REQUIRED + OPTIONAL if k in samples]
    count = len(samples["latents"])
    if any(len(samples[k]) != count for k in keys):
        raise DataError("every tensor needs the same number of samples")
    save_safetensors({k: torch.from_numpy(np.ascontiguousarray(samples[k])) for k in keys}, path, metadata=metadata)
    return count


def write_manifest(folder: Path, buckets: Sequence[Bucket]) -> None:
    """dataset.json, written last and atomically: a folder without one is not a dataset."""
    write_json(folder / MANIFEST, {"format": FORMAT, "samples": sum(b.samples for b in buckets),
                                   "buckets": [b.record() for b in buckets]})


def write_empty_prompt(folder: Path, empty_prompt: Mapping[str, np.ndarray]) -> None:
    save_safetensors({k: torch.from_numpy(np.ascontiguousarray(empty_prompt[k])) for k in TEXT_KEYS},
                     folder / EMPTY_PROMPT)


def write_dataset(
    folder: str | Path,
    samples: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    *,
    shard_size: int = 64,
    empty_prompt: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write ``samples`` (each tensor with a leading sample axis; or a list of such groups, one
    bucket each) as shards, then the manifest."""
    folder = Path(folder)
    groups = [samples] if isinstance(samples, Mapping) else list(samples)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    buckets, index = [], 0
    for group in groups:
        shards = []
        for start in range(0, len(group["latents"]), shard_size):
            file = f"shard-{index:05d}.safetensors"
            count = write_shard(folder / file, {k: v[start:start + shard_size] for k, v in group.items()})
            shards.append((file, count))
            index += 1
        shapes = {k: tuple(v.shape[1:]) for k, v in group.items() if k in REQUIRED + OPTIONAL}
        buckets.append(Bucket(bucket_name(shapes["latents"]), shapes, tuple(shards)))
    if empty_prompt is not None:
        write_empty_prompt(folder, empty_prompt)
    write_manifest(folder, buckets)
    return folder
