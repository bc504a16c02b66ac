"""What the stage scripts share: one-line errors with exit code 2, library settings written as
their flags, and the flags that more than one stage takes (defined once, so that generate.py's
union has each once). How the settings are settled is the library's (``hunyuan_tpu.settings``)."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from typing import Callable

import jax

from hunyuan_tpu import parallel
from hunyuan_tpu.config import PRESETS
from hunyuan_tpu.files import InputError, render_settings
from hunyuan_tpu.pipeline import RESOLUTION_BASE
from hunyuan_tpu.settings import DTYPES

EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 1  # the file system refused (read-only, full, a file where a folder goes)


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


def flag(setting: str) -> str:
    """The command-line flag of a library setting (every flag is the setting's name)."""
    return f"--{setting}"


def note(template: str) -> None:
    """What a library call says on the way, on stderr, its settings written as flags."""
    print(render_settings(template, flag), file=sys.stderr)


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
