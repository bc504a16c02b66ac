"""A LoRA adapter file for the tiny model, for the tests that load one."""

from __future__ import annotations

from pathlib import Path

import torch

from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.lora import LoRASpec, init_adapter, save_adapter
from hunyuan_tpu.model import HunyuanVideo15DiT


def tiny_adapter(folder: Path, poison: bool = False) -> Path:
    """A rank-2 LoRA file for the tiny model, B nonzero; with ``poison`` one weight is NaN."""
    spec = LoRASpec(rank=2, alpha=2.0)
    weights = init_adapter(HunyuanVideo15DiT(DiTConfig.preset("tiny")), spec, seed=0)
    weights = {k: torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) if ".lora_B." in k else t
               for k, t in weights.items()}
    if poison:
        next(t for k, t in weights.items() if ".lora_B." in k)[0, 0] = float("nan")
    return save_adapter(folder / ("nan.safetensors" if poison else "adapter.safetensors"), weights, spec)
