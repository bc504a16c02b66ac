"""HunyuanVideo-1.5 on TPUs (and GPUs) through JAX. ``HunyuanVideoPipeline`` is the Python API
(``hunyuan_tpu.generation``); it is imported on first use, so that importing one module of the
package does not load them all."""

from __future__ import annotations

from typing import Any

__all__ = ["Generation", "HunyuanVideoPipeline"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import generation
        return getattr(generation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
