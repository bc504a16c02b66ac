"""Reading user files with errors that name them, and writing files atomically.

Every write goes to a temporary name in the destination folder and is renamed into place,
so a crash or a kill never leaves a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


_SETTING = re.compile(r"\{([a-z][a-z0-9_]*)\}")


def render_settings(template: str, name_of: Callable[[str], str]) -> str:
    """``template`` with each ``{setting}`` written as ``name_of(setting)``: the bare name for the
    Python API, the flag on a command line."""
    return _SETTING.sub(lambda m: name_of(m.group(1)), template)


Note = Callable[[str], None]  # what a library call says on the way (a ``{setting}`` template), e.g. to stderr


class InputError(ValueError):
    """Bad user input (a file, key, shape or setting); the message names it in one line.

    A setting is written ``{name}`` in the message (``{{name}}`` in an f-string), under the
    name it has in the stage config.json and the Python API: ``str()`` shows the bare name,
    and a command line shows the flag that sets it (``render``), so that library code never
    speaks of flags.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.template = message

    def render(self, name_of: Callable[[str], str]) -> str:
        """The message with each ``{setting}`` written as ``name_of(setting)``."""
        return render_settings(self.template, name_of)

    def __str__(self) -> str:
        return self.render(lambda name: name)


# every temporary name this package writes: ".<final name>.tmp<pid>[suffix]"
_TEMPORARY = re.compile(r"^\..+\.tmp(\d+)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporaries (files or folders) that a killed run left in ``folder``: those whose
    process is gone. Returns what was removed."""
    removed = []
    for entry in Path(folder).iterdir() if Path(folder).is_dir() else ():
        match = _TEMPORARY.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
    return removed


@contextlib.contextmanager
def locked_folder(folder: str | Path) -> Iterator[Path]:
    """``folder`` (made if missing) held against other runs of this package for the block: a
    second run into it is refused. The lock is the kernel's (``flock``
    on the folder itself): a killed run holds none. Temporaries of killed runs are removed first;
    a folder the block made and left empty (it failed before writing) is removed at the end."""
    folder = Path(folder)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{folder}: another run is writing into this folder; wait for it to end or give "
                             "another output folder") from None
        remove_stale_temporaries(folder)
        yield folder
    finally:
        os.close(fd)
        if made and not any(folder.iterdir()):
            folder.rmdir()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed to ``path`` when the block succeeds and removed
    when it fails (an interrupt included). The temporary name keeps the suffix, so that writers
    that pick the format from it still do."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:  # named as the file the user asked for, not its temporary
        if e.filename == str(tmp):
            e.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
                     ) -> None:
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"format": "pt", **(metadata or {})})
        except SafetensorError as e:  # the file system refused (no space, too large): an OSError like any other
            code = re.search(r"os error (\d+)", str(e))
            number = int(code.group(1)) if code else errno.EIO
            raise OSError(number, os.strerror(number), str(tmp)) from None
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates files owner-only; give them the usual mode


# numpy dtype name -> safetensors' code (ml_dtypes gives numpy its bfloat16)
_SAFETENSORS_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                      "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


@contextlib.contextmanager
def safetensors_writer(path: str | Path, layout: Mapping[str, tuple[tuple[int, ...], Any]],
                       metadata: dict[str, str] | None = None) -> Iterator[Callable[[str, np.ndarray], None]]:
    """A safetensors file written one tensor at a time, so that the host holds one tensor, not
    the file: ``layout`` names each tensor's (shape, numpy dtype) in file order, and the block
    calls ``write(name, array)`` for each in that order. The file appears only when all are in."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, (shape, dtype) in layout.items():
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _SAFETENSORS_CODES[np.dtype(dtype).name], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    order = iter(layout.items())
    with atomic_path(path) as tmp, open(tmp, "wb") as f:

        def put(data) -> None:
            try:
                f.write(data)
            except OSError as e:  # a full disk: named as the file the user asked for (a write names none)
                e.filename = str(path)
                raise

        def write(name: str, array: np.ndarray) -> None:
            expected, (shape, dtype) = next(order, (None, (None, None)))
            if (name, array.shape, array.dtype) != (expected, tuple(shape or ()), np.dtype(dtype or np.float32)):
                raise ValueError(f"{path}: tensor {name} {array.shape} {array.dtype} written where the layout has "
                                 f"{expected} {shape} {dtype}")
            put(np.ascontiguousarray(array).view(np.uint8).data)

        put(struct.pack("<Q", len(blob)) + blob)
        yield write
        missing = [name for name, _ in order]
        if missing:
            raise ValueError(f"{path}: tensors never written: {', '.join(missing)}")


def read_safetensors(
    path: str | Path, dtype: torch.dtype | None = None, error: type[InputError] = InputError
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of one safetensors file (cast to ``dtype`` one at a time) and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            for name in f.keys():
                t = f.get_tensor(name)
                tensors[name] = t.to(dtype) if dtype is not None else t
    except Exception as e:  # safetensors raises several types for truncated or corrupt files
        raise error(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    return tensors, metadata
