"""Counting XLA compilations in a test: the names of the functions compiled inside a block."""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def recorded() -> Iterator[list[str]]:
    """``with recorded() as compiles:`` gives the list of jitted function names compiled in the block."""
    compiles: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE:
            compiles.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
