"""Timing that load cannot decide: one thread budget for every path, paths run in turn, min and
median reported, and the machine's load checked before and after.

A benchmark script calls ``pin_threads`` before anything imports jax or torch, so that XLA:CPU
sizes its thread pool from the CPUs the process may use (``sched_getaffinity``) and torch is told
the same number; ``round_robin`` then alternates the paths it compares, so a busy moment lands
on all of them rather than one.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable

# Load average (1 minute) above which the machine counts as busy for a timing.
BUSY_LOAD = 1.0


def pin_threads(threads: int | None) -> int:
    """Restrict this process to its first ``threads`` CPUs (all it may use if None) and return
    the count. Must run before jax or torch is imported."""
    if "jax" in sys.modules or "torch" in sys.modules:
        raise RuntimeError("pin_threads must run before jax and torch are imported")
    cpus = sorted(os.sched_getaffinity(0))
    chosen = cpus[:threads] if threads else cpus
    os.sched_setaffinity(0, chosen)
    return len(chosen)


def load() -> float:
    return os.getloadavg()[0]


def budget_line(threads: int) -> str:
    """The thread budget as each library sees it (call after both are imported)."""
    import jax
    import torch

    torch.set_num_threads(threads)
    return (f"thread budget {threads}: torch {torch.get_num_threads()} intra-op threads, XLA:CPU pool of "
            f"{len(os.sched_getaffinity(0))} (the CPUs this process may use), jax {jax.__version__}, "
            f"torch {torch.__version__}, {os.cpu_count()} CPUs in the machine")


def check_quiet(allow_busy: bool) -> str:
    """The load before a timing; a busy machine stops the run unless ``allow_busy``, which marks
    the results instead."""
    now = load()
    if now > BUSY_LOAD and not allow_busy:
        raise SystemExit(f"load average {now:.2f} > {BUSY_LOAD}: the machine is busy, timings would measure it "
                         "(wait, or pass --allow_busy to mark the table BUSY)")
    return f"load average {now:.2f} at the start" + (" (BUSY: results not comparable)" if now > BUSY_LOAD else "")


def round_robin(paths: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of ``repeats`` calls of each path, the paths taking turns (after ``warmup``
    untimed turns). Each call must return only when its work is done."""
    for _ in range(warmup):
        for run in paths.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            begin = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - begin)
    return times


def min_median(times: list[float]) -> tuple[float, float]:
    return min(times), statistics.median(times)


def threads_flag(argv: list[str] | None = None) -> int | None:
    """``--threads N`` from the command line, read before the full parser exists (the budget
    must be set before jax and torch are imported)."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int)
    return pre.parse_known_args(argv)[0].threads


def virtual_devices(default: int = 8) -> int:
    """``--devices N`` from the command line, read before JAX starts, and that many virtual CPU
    devices asked of XLA (no effect on an accelerator)."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--devices", type=int, default=default)
    from hunyuan_tpu.launch import with_cpu_devices  # no JAX in it: the flag is set before JAX starts

    devices = pre.parse_known_args()[0].devices
    os.environ["XLA_FLAGS"] = with_cpu_devices(os.environ.get("XLA_FLAGS", ""), devices)
    return devices


def add_flags(parser) -> None:
    """The flags every timing script shares (``threads_flag`` reads --threads early)."""
    parser.add_argument("--threads", type=int, help="CPUs for both paths: torch's threads and XLA:CPU's pool "
                        "(default: all this process may use)")
    parser.add_argument("--allow_busy", action="store_true",
                        help=f"time even when the load average is over {BUSY_LOAD}, marking the results BUSY")
