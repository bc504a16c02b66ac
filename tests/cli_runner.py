"""Running the command-line scripts of run/ from tests.

``call`` runs a script's ``main(argv)`` in this process (pytest puts run/ on the import path),
capturing what it prints: no interpreter start, no second import of JAX and torch. ``spawn``
runs the script as a real subprocess, for the tests that need one (kill -9 part-way, a fresh
interpreter proving the script starts on its own).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import io
import os
import subprocess
import sys
from pathlib import Path

import jax

from hunyuan_tpu.launch import with_cpu_devices

RUN = Path(__file__).resolve().parents[1] / "run"


@dataclasses.dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def call(script: str, *args, devices: int = 1, check: bool = True) -> Result:
    """``run/<script>``'s ``main`` on ``args`` in this process, on the first ``devices`` devices."""
    main = importlib.import_module(Path(script).stem).main
    kwargs = {"devices": jax.devices()[:devices]} if "devices" in inspect.signature(main).parameters else {}
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args], **kwargs)
    result = Result(code, out.getvalue(), err.getvalue())
    if check:
        assert code == 0, result.stderr
    return result


def environment(devices: int = 1, **extra: str) -> dict[str, str]:
    """This process's environment for a subprocess with ``devices`` CPU devices (and this
    process's other XLA flags, so that both compile alike)."""
    flags = with_cpu_devices(os.environ.get("XLA_FLAGS", ""), devices if devices > 1 else None)
    return {**os.environ, "XLA_FLAGS": flags, **extra}


def command(script: str, *args) -> list[str]:
    return [sys.executable, str(RUN / script), *map(str, args)]


def spawn(script: str, *args, env: dict[str, str] | None = None, check: bool = True,
          timeout: float = 300) -> subprocess.CompletedProcess:
    """``python run/<script> args`` as a subprocess, to completion."""
    proc = subprocess.run(command(script, *args), capture_output=True, text=True, timeout=timeout,
                          env=env or environment())
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc
