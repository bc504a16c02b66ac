"""Writing the decoded video: an H.264 mp4 through imageio-ffmpeg, and a PNG of one frame.

Both go to a temporary name beside the destination and are renamed into place (files.atomic_path),
the video once it is read back whole.
"""

from __future__ import annotations

import errno
import warnings
from pathlib import Path

import imageio.v2 as imageio
import imageio_ffmpeg
import numpy as np
from PIL import Image

from .files import atomic_path

FPS = 24  # the official generate.py's save_video


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = FPS) -> None:
    """(F, H, W, 3) uint8 frames -> an mp4 (libx264, yuv420p) at ``fps``."""
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # ffmpeg runs in a child process that execs at once, which JAX's warning about forking a
        # multithreaded process does not concern.
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        # macro_block_size=1: sizes are multiples of 16 already; never let imageio rescale frames
        imageio.mimwrite(tmp, list(frames), format="FFMPEG", fps=fps, codec="libx264", macro_block_size=1)
        # ffmpeg can fail (a full disk) without the writer noticing: the file must hold every frame
        written = _frame_count(tmp)
        if written != len(frames):
            raise OSError(errno.EIO, f"the video writer wrote {written} of {len(frames)} frames (disk full?)",
                          str(path))


def _frame_count(path: Path) -> int:
    try:
        return imageio_ffmpeg.count_frames_and_secs(str(path))[0]
    except (RuntimeError, OSError):  # ffmpeg cannot read the file at all
        return 0


def write_png(path: str | Path, frame: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(frame).save(tmp, format="PNG")
