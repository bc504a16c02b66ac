"""What the stage scripts share: one-line errors with exit code 2, setting precedence, and the
flags that more than one stage takes (defined once, so that generate.py's union has each once)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import torch

from hunyuan_tpu import parallel
from hunyuan_tpu.checkpoint import checkpoint_config
from hunyuan_tpu.config import PRESETS, DiTConfig
from hunyuan_tpu.files import InputError
from hunyuan_tpu.pipeline import RESOLUTION_BASE

EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 1  # the file system refused (read-only, full, a file where a folder goes)
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


class Parser(argparse.ArgumentParser):
    """argparse with a single-line error message (usage stays available through --help)."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_BAD_INPUT)


def finite_float(text: str) -> float:
    """argparse type for a number flag: nan and inf are refused (they run, and poison the result)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


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
    args: argparse.Namespace, config: dict[str, Any], defaults: dict[str, tuple[type, Any]], source: str,
    from_config: set[str] | None = None,
) -> dict[str, Any]:
    """Each setting from the command line if given, else from the stage config.json (``source``),
    else its default. ``defaults`` maps a setting to (type, default value); ``from_config``
    collects the names of the settings config.json gave."""
    out = {}
    for key, (kind, default) in defaults.items():
        value = getattr(args, key, None)  # settings without a flag (task) come from the config
        if value is None and config.get(key) is not None:
            try:
                value = _from_config(config[key], kind)
            except (TypeError, ValueError, OverflowError):
                allowed = {int: "an integer", float: "a finite number"}.get(kind, f"a {kind.__name__}")
                raise InputError(f"{source}: {key}={config[key]!r} is not {allowed}") from None
            if from_config is not None:
                from_config.add(key)
        out[key] = default if value is None else value
    return out


@contextlib.contextmanager
def named_by_source(from_config: set[str], source: str) -> Iterator[None]:
    """Library errors raised in the block name a setting that config.json gave as its key there
    (``source: video_length 50 ...``), the others as their flags."""
    try:
        yield
    except InputError as e:
        raise InputError(e.render(lambda name: f"{source}: {name}" if name in from_config else f"{{{name}}}")) from None


def check_seed(name: str, value: int) -> None:
    """A seed torch's generator takes (0 to 2**64 - 1), refused by name otherwise."""
    if not 0 <= value < 2**64:
        raise InputError(f"--{name} {value} must be between 0 and 2**64 - 1")


def flag(setting: str) -> str:
    """The command-line flag of a library setting (every flag is the setting's name)."""
    return f"--{setting}"


def parse_joining(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The flags, after which a process of a multi-host job (a TPU pod slice, SLURM, MPI, or
    JAX_COORDINATOR_ADDRESS set) joins the others, before anything touches a JAX backend."""
    args = parser.parse_args(argv)
    if parallel.initialize_distributed() and signal.getsignal(signal.SIGTERM) is _stop:
        signal.signal(signal.SIGTERM, _stop)  # JAX's preemption notifier took SIGTERM over: ours stops the run
    return args


class Stopped(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the same cleanup on the way out."""

    signum = signal.SIGTERM


def _stop(signum: int, frame) -> None:
    raise Stopped()


INTERRUPTED = ("interrupted: no output of this run was written; a stage run with --checkpoint_every continues "
               "with --resume")


def run_main(body: Callable[[], int], interrupted: str = INTERRUPTED) -> int:
    """Run a command's body in this process and return its exit code: bad input (a library
    error, whose settings are shown as flags, or a bad flag) ends in one line on stderr and 2;
    the file system refusing (a path that is a file, no space, no permission) in one line and 1;
    Ctrl-C or SIGTERM in one line and 128 + the signal. Outputs are written under temporary names,
    renamed when complete and removed on the way out, so none of these leaves a half-written one."""
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return body()
    except InputError as e:
        sys.stderr.write(f"error: {e.render(flag)}\n")
        return _leave(EXIT_BAD_INPUT)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, its line already written)
        return _leave(e.code if isinstance(e.code, int) else EXIT_BAD_INPUT)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        sys.stderr.write(f"error: {where}{e.strerror or e}\n")
        return _leave(EXIT_ENVIRONMENT)
    except KeyboardInterrupt as e:
        sys.stderr.write(interrupted + "\n")
        return _leave(128 + getattr(e, "signum", signal.SIGINT))
    finally:
        signal.signal(signal.SIGTERM, previous)


def _leave(code: int) -> int:
    """``code``; a process of a multi-process job that failed exits with it at once: JAX's exit
    waits at a shutdown barrier for the other processes, which wait in a collective for this one."""
    if code and jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def model_config(name: str) -> DiTConfig:
    """The DiT configuration behind --model: a checkpoint's, or a preset's."""
    if Path(name).exists():
        return checkpoint_config(name)
    if name in PRESETS:
        return DiTConfig.preset(name)
    raise InputError(f"--model {name}: no such checkpoint file or folder, and not a preset ({', '.join(PRESETS)})")


def dtype_of(flag: str, name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InputError(f"{flag} {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def add_model_flag(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--model", metavar="PATH|PRESET", help="DiT checkpoint file or folder, or a preset name for "
                       f"seeded random weights ({', '.join(PRESETS)}; default: tiny)")


def add_video_group(p: argparse.ArgumentParser) -> None:
    video = p.add_argument_group("video")
    video.add_argument("--video_length", type=int, metavar="N", help="frames, 4k+1 (default: 49)")
    video.add_argument("--resolution", metavar="|".join(RESOLUTION_BASE),
                       help="bucket family (default: the model's; 96p for tiny, 480p without one)")
    video.add_argument("--aspect_ratio", metavar="W:H", help="W:H, picks the closest bucket (default: 16:9; "
                       "i2v: the image's)")
    video.add_argument("--height", type=int, metavar="PX", help="pixels, multiple of 16; overrides the bucket")
    video.add_argument("--width", type=int, metavar="PX", help="pixels, multiple of 16; overrides the bucket")


def add_vae_group(p: argparse.ArgumentParser) -> None:
    vae = p.add_argument_group("vae")
    vae.add_argument("--vae", metavar="DIR", help="VAE folder, official (ckpts/vae) or diffusers layout "
                     "(default: a tiny VAE with seeded random weights)")
    vae.add_argument("--vae_dtype", choices=sorted(DTYPES), help="VAE weights and activations dtype (default: float32)")
