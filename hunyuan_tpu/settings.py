"""How a stage's settings are settled: each one given (a keyword of the Python API, a flag of a
command), else from the hand-off config.json, else its default; each checked, and a bad one
named as its setting (``{name}``), or as its config.json key when that is where it came from."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from .checkpoint import checkpoint_config
from .config import PRESETS, DiTConfig
from .files import InputError

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


def _from_config(value: Any, kind: type) -> Any:
    """A config.json value as ``kind``, refusing what a cast would bend: a bool or a fraction for
    an int, a bool or a non-finite number for a float."""
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError
    if kind is int and value != int(value):
        raise ValueError
    if kind is float and not math.isfinite(value):
        raise ValueError
    return kind(value)


def resolve(
    given: Mapping[str, Any], config: Mapping[str, Any], defaults: Mapping[str, tuple[type, Any]], source: str,
    from_config: set[str] | None = None,
) -> dict[str, Any]:
    """Each setting from ``given`` if there and not None, else from the stage config.json
    (``source``), else its default. ``defaults`` maps a setting to (type, default value);
    ``from_config`` collects the names of the settings config.json gave."""
    out = {}
    for key, (kind, default) in defaults.items():
        value = given.get(key)  # settings no caller gives (task) come from the config
        if value is not None:
            value = _checked(value, kind, f"{{{key}}}")
        elif config.get(key) is not None:
            value = _checked(config[key], kind, f"{source}: {key}=")
            if from_config is not None:
                from_config.add(key)
        out[key] = default if value is None else value
    return out


def _checked(value: Any, kind: type, where: str) -> Any:
    """``value`` as ``kind``, or an error naming ``where`` it came from (a Python call can pass any type)."""
    try:
        return _from_config(value, kind) if kind in (int, float) else _exactly(value, kind)
    except (TypeError, ValueError, OverflowError):
        allowed = {int: "an integer", float: "a finite number"}.get(kind, f"a {kind.__name__}")
        raise InputError(f"{where}{'' if where.endswith('=') else ' '}{value!r} is not {allowed}") from None


def _exactly(value: Any, kind: type) -> Any:
    if kind is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, kind):
        raise TypeError
    return value


@contextlib.contextmanager
def named_by_source(from_config: set[str], source: str) -> Iterator[None]:
    """Library errors raised in the block name a setting that config.json gave as its key there
    (``source: video_length 50 ...``), the others as settings (``{video_length}``)."""
    try:
        yield
    except InputError as e:
        raise InputError(e.render(lambda name: f"{source}: {name}" if name in from_config else f"{{{name}}}")) from None


def check_seed(name: str, value: int) -> None:
    """A seed torch's generator takes (0 to 2**64 - 1), refused by name otherwise."""
    if not 0 <= value < 2**64:
        raise InputError(f"{{{name}}} {value} must be between 0 and 2**64 - 1")


def check_finite(name: str, value: float) -> None:
    """A number setting: nan and inf are refused (they run, and poison the result)."""
    if not math.isfinite(value):
        raise InputError(f"{{{name}}} {value!r} is not a finite number")


def dtype_of(setting: str, name: str) -> torch.dtype:
    """The torch dtype a dtype setting names."""
    if name not in DTYPES:
        raise InputError(f"{{{setting}}} {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_config(name: str, setting: str = "model") -> DiTConfig:
    """The DiT configuration a model setting names: a checkpoint's, or a preset's."""
    if Path(name).exists():
        return checkpoint_config(name)
    if name in PRESETS:
        return DiTConfig.preset(name)
    raise InputError(f"{{{setting}}} {name}: no such checkpoint file or folder, and not a preset "
                     f"({', '.join(PRESETS)})")
