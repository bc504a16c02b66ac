"""A training dataset (``dataset``'s format) built clip by clip, so that a run can stop anywhere
and the next one goes on.

    <folder>/prepare.json                       the settings the folder is prepared with
    <folder>/<bucket>-NNNNN.safetensors         shards of one bucket each; their metadata names
                                                the clips inside (content keys and file names)
    <folder>/empty_prompt.safetensors           the encoding of "" (text dropout)
    <folder>/dataset.json                       the manifest, rewritten at the end of every run
    <folder>/report.jsonl                       the clips the last run skipped, with the reason

The shards are the record of what is done: a shard is written under a temporary name and
renamed when whole, and the clips of a bucket wait in memory until they fill one (or the run
ends). A killed run loses those waiting clips, never a shard, and the next run encodes them
again; clips in a shard are known by content and skipped, whatever their name now.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors import safe_open

from .dataset import EMPTY_PROMPT, MANIFEST, Bucket, DataError, write_empty_prompt, write_manifest, write_shard
from .files import InputError, atomic_path, read_json, write_json

RECORD = "prepare.json"
REPORT = "report.jsonl"


class DatasetBuilder:
    """The shards of ``folder`` (held by the caller against other runs), and clips added to it."""

    def __init__(self, folder: Path, settings: Mapping[str, Any], shard_size: int):
        if shard_size < 1:
            raise InputError(f"{{shard_size}} {shard_size} must be >= 1")
        self.folder, self.shard_size = folder, shard_size
        record = folder / RECORD
        self.settings = json.loads(json.dumps(settings))  # as it reads back
        if record.exists():
            saved = read_json(record).get("settings", {})
            differ = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
            if differ:
                raise InputError(f"{folder}: prepared with other settings ({', '.join(differ)}); give the same ones "
                                 "to add clips, or another {output_dir}")
        self.shards: dict[str, list[tuple[str, int]]] = {}
        self.shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self.done: dict[str, str] = {}  # content key -> file name it was encoded from
        self.pending: dict[str, list[tuple[str, str, dict[str, np.ndarray]]]] = {}
        for path in sorted(folder.glob("*.safetensors")):
            if path.name != EMPTY_PROMPT and not path.name.startswith("."):
                self._read_shard(path)

    def _read_shard(self, path: Path) -> None:
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            keys, names, bucket = json.loads(meta["clips"]), json.loads(meta["files"]), meta["bucket"]
        except Exception as e:  # safetensors raises its own error types, the metadata may lack a key
            raise DataError(f"{path}: not a shard this preparation wrote ({e!r}); move it out of the folder") \
                from None
        self.shards.setdefault(bucket, []).append((path.name, len(keys)))
        self.shapes[bucket] = {k: v[1:] for k, v in shapes.items()}
        self.done.update(zip(keys, names))

    @property
    def samples(self) -> int:
        return sum(n for shards in self.shards.values() for _, n in shards)

    def add(self, bucket: str, key: str, name: str, sample: Mapping[str, np.ndarray]) -> None:
        """One clip's tensors (each with a leading axis of 1); a full bucket is written out."""
        self.pending.setdefault(bucket, []).append((key, name, dict(sample)))
        self.done[key] = name
        if len(self.pending[bucket]) == self.shard_size:
            self.flush(bucket)

    def flush(self, bucket: str) -> None:
        waiting = self.pending.pop(bucket, [])
        if not waiting:
            return
        index = len(self.shards.get(bucket, []))
        file = f"{bucket}-{index:05d}.safetensors"
        while (self.folder / file).exists():  # a shard numbered past a removed one
            index += 1
            file = f"{bucket}-{index:05d}.safetensors"
        if not (self.folder / RECORD).exists():  # with the first shard: a run that wrote none binds nothing
            write_json(self.folder / RECORD, {"settings": self.settings})
        samples = {k: np.concatenate([s[k] for _, _, s in waiting]) for k in waiting[0][2]}
        count = write_shard(self.folder / file, samples, metadata={
            "bucket": bucket, "clips": json.dumps([k for k, _, _ in waiting]),
            "files": json.dumps([n for _, n, _ in waiting])})
        self.shards.setdefault(bucket, []).append((file, count))
        self.shapes[bucket] = {k: tuple(v.shape[1:]) for k, v in samples.items()}

    def finish(self, empty_prompt: Mapping[str, np.ndarray]) -> list[Bucket]:
        """Write what waits, the empty prompt and the manifest (buckets by latent shape); returns them."""
        for bucket in list(self.pending):
            self.flush(bucket)
        if not self.shards:
            (self.folder / MANIFEST).unlink(missing_ok=True)
            return []
        if not (self.folder / EMPTY_PROMPT).exists():
            write_empty_prompt(self.folder, empty_prompt)
        buckets = sorted((Bucket(name, self.shapes[name], tuple(shards)) for name, shards in self.shards.items()),
                         key=lambda b: b.latent_shape)
        write_manifest(self.folder, buckets)
        return buckets


def write_report(folder: Path, skipped: list[tuple[str, str]]) -> None:
    """report.jsonl: one {"file", "reason"} per skipped clip, by file name (empty when none was)."""
    with atomic_path(folder / REPORT) as tmp:
        tmp.write_text("".join(json.dumps({"file": f, "reason": r}) + "\n" for f, r in sorted(skipped)))
