"""Training clips from a folder: which files are clips, their captions, their frames, and the
bucket each is fitted to.

A clip is a video (mp4, webm, mov, mkv, avi, gif; decoded by ffmpeg through imageio-ffmpeg, the
library the project writes its videos with) or an image (a one-frame clip). Its caption is the
same-named ``.txt`` beside it, or the row of a ``captions.jsonl`` ({"file", "caption"} per line) or
``captions.csv`` (a header with ``file`` and ``caption`` columns), ``file`` relative to the folder.

Frames are taken at a target rate (each source frame nearest at or before 1/fps steps; a source
slower than that gives every frame) or every ``stride``-th frame, and the clip is cut to the
longest allowed length (4k+1 frames) it reaches. Each frame is scaled to cover the official bucket
closest to the clip's aspect ratio and center-cropped to it, as stage 1 fits an i2v image.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Iterator

import imageio_ffmpeg
import numpy as np
from PIL import Image, UnidentifiedImageError

from .files import InputError
from .image_condition import resize_center_crop
from .pipeline import VAE_TEMPORAL, bucket_size

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# The default lengths: every second at 24 fps (the model's rate), as 4k+1 frames, up to --max_frames
SECOND_LENGTHS = (25, 49, 73, 97, 121, 145, 169, 193, 217, 241)


class ClipError(Exception):
    """A clip that cannot be used; the message is the reason the report gives."""


@dataclasses.dataclass(frozen=True)
class Clip:
    path: Path
    name: str  # relative to the folder, posix: what the report and the shards call it
    caption: str | None  # None: none found

    @property
    def is_image(self) -> bool:
        return self.path.suffix.lower() in IMAGE_SUFFIXES


@dataclasses.dataclass(frozen=True)
class FrameRule:
    """How frames are taken from a video: at ``fps`` or every ``stride``-th, cut to the longest
    of ``lengths`` (ascending, each 4k+1) reached."""

    lengths: tuple[int, ...]
    fps: float | None = 24.0
    stride: int | None = None

    def __post_init__(self) -> None:
        if (self.fps is None) == (self.stride is None):
            raise InputError("give one of {fps} and {frame_stride}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise InputError(f"{{fps}} {self.fps} must be > 0")
        if self.stride is not None and self.stride < 1:
            raise InputError(f"{{frame_stride}} {self.stride} must be >= 1")
        bad = [n for n in self.lengths if n < 1 or (n - 1) % VAE_TEMPORAL]
        if not self.lengths or bad or list(self.lengths) != sorted(set(self.lengths)):
            raise InputError(f"{{frame_buckets}} {','.join(map(str, self.lengths))}: need ascending lengths of the "
                             "form 4k+1 (e.g. 25,49,121)")

    def step(self, source_fps: float) -> float:
        """Source frames per taken frame."""
        if self.stride is not None:
            return float(self.stride)
        return max(1.0, source_fps / self.fps) if source_fps > 0 else 1.0


def default_lengths(max_frames: int) -> tuple[int, ...]:
    """A length a second (at 24 fps) up to ``max_frames``, and ``max_frames`` itself when it is 4k+1."""
    lengths = {n for n in SECOND_LENGTHS if n <= max_frames}
    if (max_frames - 1) % VAE_TEMPORAL == 0:
        lengths.add(max_frames)
    if not lengths:
        raise InputError(f"{{max_frames}} {max_frames}: no clip length of the form 4k+1 fits (the shortest is 1)")
    return tuple(sorted(lengths))


# ---- finding clips and captions --------------------------------------------------------------

def _caption_table(path: Path) -> dict[str, str]:
    """file -> caption from a .jsonl or .csv file."""
    if not path.is_file():
        raise InputError(f"{{captions}} {path}: no such file")
    table: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{{captions}} {path}: cannot read it ({e})") from None
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                table[str(row["file"])] = str(row["caption"])
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{{captions}} {path}: line {number} is not a JSON object with \"file\" and "
                                 "\"caption\"") from None
    elif path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or not {"file", "caption"} <= set(reader.fieldnames):
            raise InputError(f"{{captions}} {path}: needs a header row with the columns file and caption")
        for row in reader:
            table[row["file"]] = row["caption"] or ""
    else:
        raise InputError(f"{{captions}} {path}: must be a .jsonl or a .csv file")
    return table


def find_clips(folder: Path, captions: Path | None = None, skip: Path | None = None) -> list[Clip]:
    """Every video and image under ``folder`` (hidden files and the ``skip`` folder aside), sorted
    by name, with its caption (``None`` when it has none)."""
    if not folder.is_dir():
        raise InputError(f"{{videos}} {folder}: no such folder")
    table = _caption_table(captions) if captions is not None else None
    skip = skip.resolve() if skip is not None else None
    clips = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if (not path.is_file() or any(part.startswith(".") for part in Path(name).parts)
                or path.suffix.lower() not in VIDEO_SUFFIXES + IMAGE_SUFFIXES
                or (skip is not None and path.resolve().is_relative_to(skip))):
            continue
        if table is not None:
            caption = table.get(name)
        else:
            caption = _read_caption(path.with_suffix(".txt"))
        clips.append(Clip(path, name, caption.strip() if caption is not None else None))
    return clips


def _read_caption(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def content_key(path: Path) -> str:
    """The sha256 of the file's bytes: a clip is known by its content, whatever its name."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clip_seed(key: str, seed: int) -> int:
    """The seed of a clip's posterior sample: from its content and the run's ``seed``, so it does
    not depend on the clip's name or on which run encodes it."""
    return (int(key[:15], 16) + seed) % 2 ** 63


# ---- frames --------------------------------------------------------------------------------

def _video_frames(path: Path) -> tuple[Iterator[bytes], float, tuple[int, int]]:
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        with warnings.catch_warnings():
            # ffmpeg runs in a child process that execs at once, which JAX's warning about forking a
            # multithreaded process does not concern
            warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
            meta = next(reader)
    except (OSError, RuntimeError, StopIteration) as e:
        raise ClipError(f"cannot read the video ({str(e).strip().splitlines()[-1] if str(e).strip() else e})") \
            from None
    return reader, float(meta.get("fps") or 0.0), tuple(meta["size"])


def bucket_of(width: int, height: int, resolution: str) -> tuple[int, int]:
    """(height, width) of the ``resolution`` bucket closest to a ``width`` x ``height`` frame."""
    return bucket_size(resolution, f"{width}:{height}")


def fit(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """An (h, w, 3) uint8 frame scaled (Lanczos) to cover ``height`` x ``width`` and center-cropped."""
    return np.asarray(resize_center_crop(Image.fromarray(frame), height, width))


def read_frames(clip: Clip, rule: FrameRule, resolution: str) -> np.ndarray:
    """The clip's frames as ``rule`` takes them, (F, H, W, 3) uint8, each fitted to the
    ``resolution`` bucket of the clip's aspect ratio as it is read (a 4K source never sits whole
    in memory): an image is one frame; a video the longest allowed length its taken frames reach
    (``ClipError`` when none)."""
    if clip.is_image:
        try:
            with Image.open(clip.path) as image:
                rgb = np.asarray(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ClipError(f"cannot read the image ({e})") from None
        return fit(rgb, *bucket_of(rgb.shape[1], rgb.shape[0], resolution))[None]
    reader, fps, (width, height) = _video_frames(clip.path)
    bucket = bucket_of(width, height, resolution)
    step, want, taken = rule.step(fps), rule.lengths[-1], []
    try:
        for k, raw in enumerate(reader):
            if k == math.floor(len(taken) * step + 1e-6):
                taken.append(fit(np.frombuffer(raw, np.uint8).reshape(height, width, 3), *bucket))
                if len(taken) == want:
                    break
    except (OSError, RuntimeError) as e:
        raise ClipError(f"the video breaks off after {len(taken)} taken frames ({e})") from None
    finally:
        reader.close()
    reached = [n for n in rule.lengths if n <= len(taken)]
    if not reached:
        raise ClipError(f"too short: {len(taken)} frames at the chosen rate, the shortest length is "
                        f"{rule.lengths[0]}")
    return np.stack(taken[:reached[-1]])


def to_pixels(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (1, 3, F, H, W) float32 in [-1, 1], as stage 1 scales an i2v image."""
    return (frames.astype(np.float32) / 255.0 * 2 - 1).transpose(3, 0, 1, 2)[None]
