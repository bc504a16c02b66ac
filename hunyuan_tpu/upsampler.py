"""The super-resolution stage's latent upsamplers, with the official parameter names.

The SR pipeline resizes the low-resolution latents bilinearly to the target latent size, then
refines them with a small causal 3D conv net in float32 (``upsampler/<sr version>/`` of the
official checkpoint, a diffusers ModelMixin folder: config.json + safetensors):
- ``SRTo720pUpsampler``: a conv in, residual blocks of three convs, a conv out, optionally a
  residual over the whole net.
- ``SRTo1080pUpsampler``: the VAE decoder's shape without upsampling: a conv in plus the input
  repeated across channels, ResNet blocks (RMS norm, SiLU, conv, twice), RMS norm, SiLU, conv out.
Both take latents already at the target size (the official 1080p module can resize itself; the
SR pipeline never asks it to).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .files import InputError, read_json, read_safetensors
from .random_init import randomize_like_trained_
from .runtime import jax_view

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class CausalConv3d(nn.Module):
    """3D conv that sees only the current and earlier frames: the input is padded by repeating
    its edges, ``k - 1`` frames before the first and ``k // 2`` pixels on each spatial side."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int = 3):
        super().__init__()
        self.padding = (kernel // 2, kernel // 2, kernel // 2, kernel // 2, kernel - 1, 0)  # W, H, T
        self.conv = nn.Conv3d(channels_in, channels_out, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding, mode="replicate"))


class RMSNorm(nn.Module):
    """RMS norm over the channel axis of (B, C, T, H, W): x / rms(x) * gamma."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResnetBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.norm1, self.conv1 = RMSNorm(channels_in), CausalConv3d(channels_in, channels_out)
        self.norm2, self.conv2 = RMSNorm(channels_out), CausalConv3d(channels_out, channels_out)
        self.nin_shortcut = nn.Conv3d(channels_in, channels_out, 1) if channels_in != channels_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class ResidualConvBlock(nn.Module):
    """x + conv(silu(conv(silu(conv(x))))); ``block`` indices 0, 2, 4 are the convs (the
    official ``nn.Sequential`` numbering, activations included)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(CausalConv3d(channels, channels), nn.SiLU(), CausalConv3d(channels, channels),
                                   nn.SiLU(), CausalConv3d(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class SRTo720pUpsampler(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int | None = None,
                 num_blocks: int = 6, global_residual: bool = False):
        super().__init__()
        hidden = 64 if hidden_channels is None else hidden_channels
        self.in_conv = CausalConv3d(in_channels, hidden)
        self.blocks = nn.ModuleList(ResidualConvBlock(hidden) for _ in range(num_blocks))
        self.out_conv = CausalConv3d(hidden, out_channels)
        self.global_residual = bool(global_residual) and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.in_conv(x)
        for block in self.blocks:
            y = block(y)
        y = self.out_conv(y)
        return y + x if self.global_residual else y


class _Level(nn.Module):
    def __init__(self, blocks: list[ResnetBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class SRTo1080pUpsampler(nn.Module):
    def __init__(self, z_channels: int, out_channels: int, block_out_channels: tuple[int, ...],
                 num_res_blocks: int = 2, is_residual: bool = False):
        super().__init__()
        del is_residual  # stored in the official config, unused by its forward
        first = block_out_channels[0]
        if first % z_channels:
            raise ValueError(f"block_out_channels[0] {first} is not a multiple of z_channels {z_channels}")
        self.repeats = first // z_channels
        self.conv_in = CausalConv3d(z_channels, first)
        levels, width = [], first
        for channels in block_out_channels:
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(width, channels))
                width = channels
            levels.append(_Level(blocks))
        self.up = nn.ModuleList(levels)
        self.norm_out = RMSNorm(width)
        self.conv_out = CausalConv3d(width, out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z) + z.repeat_interleave(self.repeats, dim=1)
        for level in self.up:
            for block in level.block:
                h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


Upsampler = SRTo720pUpsampler | SRTo1080pUpsampler
CLASSES: dict[str, type[nn.Module]] = {"SRTo720pUpsampler": SRTo720pUpsampler, "SRTo1080pUpsampler": SRTo1080pUpsampler}
# The released upsampler/<version>/config.json values. Neither file is quoted anywhere public; these
# are what the released weights imply (tensor count and size): 720p 100 tensors, 86 MB float32;
# 1080p 201 MB (README.md, "Super-resolution"). The loader reads the real config.json.
RELEASED_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "720p_sr_distilled": ("SRTo720pUpsampler", {"in_channels": 32, "out_channels": 32, "hidden_channels": 128,
                                                "num_blocks": 16, "global_residual": False}),
    "1080p_sr_distilled": ("SRTo1080pUpsampler", {"z_channels": 32, "out_channels": 32,
                                                  "block_out_channels": [256, 512], "num_res_blocks": 2,
                                                  "is_residual": False}),
}
# The smallest twins that keep every kind of block (tests and weight-free runs).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "SRTo720pUpsampler": {"in_channels": 32, "out_channels": 32, "hidden_channels": 16, "num_blocks": 2,
                          "global_residual": True},
    "SRTo1080pUpsampler": {"z_channels": 32, "out_channels": 32, "block_out_channels": [64, 32],
                           "num_res_blocks": 1, "is_residual": True},
}


def build(class_name: str, config: dict[str, Any], source: str = "config") -> Upsampler:
    """The upsampler ``class_name`` with the official config's arguments (``_`` keys ignored)."""
    if class_name not in CLASSES:
        raise InputError(f"{source}: _class_name {class_name!r} is not one of {', '.join(CLASSES)}")
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    if "block_out_channels" in kwargs:
        kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
    try:
        return CLASSES[class_name](**kwargs)
    except (TypeError, ValueError) as e:
        raise InputError(f"{source}: not a {class_name} config ({e})") from None


def tiny_upsampler(class_name: str = "SRTo720pUpsampler", seed: int = 0) -> Upsampler:
    """A small upsampler with seeded weights drawn like a trained model's."""
    return randomize_like_trained_(build(class_name, TINY_CONFIGS[class_name]), seed=seed).eval()


def load_upsampler(folder: str | Path) -> Upsampler:
    """The upsampler of an official ``upsampler/<sr version>/`` folder, in float32 (the SR
    pipeline always runs it in float32). Names and shapes are checked against the config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{{upsampler}} {folder}: no such folder")
    config_path = folder / "config.json"
    config = read_json(config_path)
    # the official loader picks the class by the version's name when the config does not say
    class_name = config.get("_class_name") or ("SRTo720pUpsampler" if "720p" in folder.name else "SRTo1080pUpsampler")
    model = build(class_name, config, str(config_path))
    weights_path = folder / WEIGHTS_NAME
    tensors, _ = read_safetensors(weights_path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = [f"missing {', '.join(missing[:4])}" if missing else "",
                 f"unexpected {', '.join(unexpected[:4])}" if unexpected else ""]
        raise InputError(f"{weights_path}: not the weights of this {class_name} ({'; '.join(p for p in parts if p)})")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise InputError(f"{weights_path}: {name} has shape {tuple(t.shape)}, the config gives "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict({k: t.float() for k, t in tensors.items()})
    return model.requires_grad_(False).eval()


def upsampler_function(model: Upsampler) -> Callable[[np.ndarray], np.ndarray]:
    """``upsample(latents)``: (1, C, T, H, W) -> (1, C_out, T, H, W), float32 weights and activations,
    as one jitted function on the default device (the 1080p upsampler is 25 TFLOP at 1080p x 121:
    not host work). The weights go to the device once; each shape compiles once."""
    params, apply = jax_view(model, torch.float32)
    jitted = jax.jit(apply)
    return lambda latents: np.asarray(jitted(params, jnp.asarray(latents, jnp.float32)), np.float32)


def upsample(model: Upsampler, latents: np.ndarray) -> np.ndarray:
    """``upsampler_function(model)(latents)``, for one call."""
    return upsampler_function(model)(latents)
