"""Model parameters as device arrays, placed by sharding as they are created.

From a checkpoint, each device reads only its own slice of each tensor from the safetensors
files (a replicated tensor is read once per host); seeded random weights are made one tensor
at a time. Either way no full copy of the model is held on the host.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Mapping

import jax
import torch
from jax.sharding import Sharding
from safetensors import safe_open

from .checkpoint import CheckpointError, check_state_dict, checkpoint_files
from .config import DiTConfig
from .model import Execution, HunyuanVideo15DiT
from .naming import is_diffusers_naming, official_sources
from .random_init import trained_scale_values
from .runtime import JaxParams, device_array, to_host_array


def meta_model(config: DiTConfig, execution: Execution = Execution()) -> HunyuanVideo15DiT:
    """The module without storage: names, shapes and the forward, for ``runtime.functional``."""
    with torch.device("meta"):
        return HunyuanVideo15DiT(config, execution)


def random_params(
    config: DiTConfig, dtype: torch.dtype, seed: int = 0, shardings: Mapping[str, Sharding] | None = None
) -> JaxParams:
    """Seeded trained-scale random weights (``random_init``), the same values as
    ``randomize_like_trained_(HunyuanVideo15DiT(config), seed)``."""
    shardings = shardings or {}
    return {
        name: device_array(value.to(dtype), shardings.get(name))
        for name, value in trained_scale_values(meta_model(config), seed)
    }


def checkpoint_params(
    path: str | Path, config: DiTConfig, dtype: torch.dtype, shardings: Mapping[str, Sharding] | None = None
) -> JaxParams:
    """A checkpoint's tensors as device arrays; each device reads only its own slice.

    A diffusers-named checkpoint's tensors are renamed, and a few fused or reordered
    (``naming.official_sources``): those are read whole, one official tensor at a time.
    """
    shardings = shardings or {}
    files = checkpoint_files(path)
    with contextlib.ExitStack() as stack:
        try:
            handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read safetensors header (truncated or corrupt?): {e}") from None
        where = {name: h for h in handles for name in h.keys()}
        file_of = {name: f for f, h in zip(files, handles) for name in h.keys()}
        stored = {name: torch.empty(h.get_slice(name).get_shape(), device="meta") for name, h in where.items()}
        plan = official_sources(where) if is_diffusers_naming(where) else \
            {name: ((name,), None) for name in where}
        shapes = {name: make(*(stored[s] for s in sources)) if make else stored[sources[0]]
                  for name, (sources, make) in plan.items()}
        check_state_dict(shapes, config, str(path))

        def read(name: str, sharding: Sharding | None) -> jax.Array:
            sources, make = plan[name]
            if make is not None:
                return device_array(make(*(where[s].get_tensor(s) for s in sources)).to(dtype), sharding)
            if sharding is None:
                return device_array(where[name].get_tensor(name).to(dtype), None)
            cache: dict = {}

            def slice_for(index):
                key = tuple((s.start, s.stop, s.step) for s in index)
                if key not in cache:
                    cache[key] = to_host_array(where[name].get_slice(name)[index].to(dtype))
                return cache[key]

            return jax.make_array_from_callback(tuple(shapes[name].shape), sharding, slice_for)

        params = {}
        for name in shapes:
            try:
                params[name] = read(name, shardings.get(name))
            except Exception as e:
                file = file_of[plan[name][0][0]]
                raise CheckpointError(f"{file}: cannot read tensor {name} (truncated or corrupt?): {e}") from None
        return params


def model_params(
    model: str, config: DiTConfig, dtype: torch.dtype, shardings: Mapping[str, Sharding] | None = None
) -> JaxParams:
    """``--model``'s weights: a checkpoint's if ``model`` is a path, else seeded random weights
    (seed 0, so that a preset name always gives the same model)."""
    if Path(model).exists():
        return checkpoint_params(model, config, dtype, shardings)
    return random_params(config, dtype, seed=0, shardings=shardings)
