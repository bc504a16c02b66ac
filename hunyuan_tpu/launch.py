"""A multi-process JAX job on one machine, as the hosts of a pod slice run one: N processes,
each told the coordinator's address, the process count and its own index through JAX's
variables (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), joined
by ``parallel.initialize_distributed`` and talking over real collectives on 127.0.0.1.

The job is one run: the first process to fail stops the others (a survivor would otherwise
wait in a collective for a peer that is gone), and the job ends with that process's exit
code and one line naming it. Process 0 prints to the caller's terminal; the others write to
``<logs>/process_<i>.{out,err}``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

from .files import InputError

EXIT_TIMEOUT = 124
GRACE_S = 10.0  # after SIGTERM, before SIGKILL: time for a process to remove its temporaries


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the coordinator binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CPU_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def with_cpu_devices(xla_flags: str, count: int | None) -> str:
    """``xla_flags`` (an ``XLA_FLAGS`` value) with its virtual CPU device count replaced by
    ``count``, or removed (one device) when ``count`` is None; the other flags kept."""
    flags = [f for f in xla_flags.split() if not f.startswith(CPU_DEVICE_COUNT)]
    return " ".join([*flags, f"{CPU_DEVICE_COUNT}={count}"] if count is not None else flags)


def process_environment(process_id: int, processes: int, port: int, cpu_devices: int | None,
                        environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` plus what makes a process index ``process_id`` of the job; with ``cpu_devices``,
    that many virtual CPU devices in each process."""
    env = {**environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(processes),
           "JAX_PROCESS_ID": str(process_id)}
    if cpu_devices is not None:
        env["XLA_FLAGS"] = with_cpu_devices(env.get("XLA_FLAGS", ""), cpu_devices)
        env["JAX_PLATFORMS"] = "cpu"
    return env


@dataclasses.dataclass(frozen=True)
class Ended:
    returncode: int
    message: str  # "" when every process succeeded
    process: int | None = None  # the one that failed first


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines()
                 if line.strip() and not line.startswith("[Gloo]")]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _how(code: int) -> str:
    return f"was killed by signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"exited with {code}"


class Job:
    """``command`` started as ``processes`` processes of one JAX job. ``workdirs`` gives each
    process its own working folder, as each host of a pod has its own disk: relative paths in
    ``command`` then name a different file in each process."""

    def __init__(self, command: Sequence[str], processes: int, *, cpu_devices: int | None = None,
                 logs: str | Path | None = None, environ: Mapping[str, str] | None = None, echo: bool = True,
                 workdirs: Sequence[str | Path] | None = None, timeout: float | None = None):
        if processes < 1:
            raise InputError(f"{{processes}} {processes} must be >= 1")
        if cpu_devices is not None and cpu_devices < 1:
            raise InputError(f"{{cpu_devices}} {cpu_devices} must be >= 1")
        if workdirs is not None and len(workdirs) != processes:
            raise InputError(f"{len(workdirs)} working folders for {processes} processes")
        if timeout is not None and not timeout > 0:
            raise InputError(f"{{timeout}} {timeout} must be > 0 seconds")
        self.timeout = timeout
        self._scratch = None if logs is not None else tempfile.TemporaryDirectory(prefix="launch_logs_")
        self.logs = Path(logs if logs is not None else self._scratch.name)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        port = free_port()
        base = os.environ if environ is None else environ
        self.processes: list[subprocess.Popen] = []
        self._files = []
        try:
            for i in range(processes):
                env = process_environment(i, processes, port, cpu_devices, base)
                if i == 0 and echo:
                    streams = (None, None)
                else:
                    streams = (open(self.logs / f"process_{i}.out", "w"), open(self.logs / f"process_{i}.err", "w"))
                    self._files += streams
                self.processes.append(subprocess.Popen(list(command), env=env, stdout=streams[0], stderr=streams[1],
                                                       cwd=None if workdirs is None else workdirs[i]))
        except BaseException:
            self.stop()
            raise
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def stop(self) -> None:
        """SIGTERM to every running process, SIGKILL to those still running ``GRACE_S`` later."""
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for p in self.processes:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def wait(self) -> Ended:
        """Until every process has ended, or one fails (the rest are stopped), or ``timeout``
        seconds from the start pass (all are stopped, exit 124)."""
        try:
            while True:
                codes = [p.poll() for p in self.processes]
                failed = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
                if failed is not None:
                    self.stop()
                    code = codes[failed]
                    said = _last_line(self.logs / f"process_{failed}.err") if code > 0 else ""  # a kill says nothing
                    return Ended(code if code > 0 else 128 - code,
                                 f"process {failed} of {len(codes)} {_how(code)}" + (f": {said}" if said else ""),
                                 failed)
                if all(c == 0 for c in codes):
                    return Ended(0, "")
                if self._deadline is not None and time.monotonic() > self._deadline:
                    self.stop()
                    return Ended(EXIT_TIMEOUT, f"the job ran past {self.timeout:g} s; every process was stopped")
                time.sleep(0.05)
        except BaseException:  # Ctrl-C in the launcher stops the job, not only the launcher
            self.stop()
            raise
        finally:
            self._close_files()

    def _close_files(self) -> None:
        for f in self._files:
            f.close()

    def close(self) -> None:
        """Stop what still runs, and remove the temporary log folder."""
        self.stop()
        self._close_files()
        if self._scratch is not None:
            self._scratch.cleanup()
