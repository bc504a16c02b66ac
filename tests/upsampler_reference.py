"""The official SR upsamplers (hyvideo/models/transformers/modules/upsample.py, built from the
official VAE's CausalConv3d, ResnetBlock and RMS_norm) re-stated as functions of a state dict,
independently of hunyuan_tpu.upsampler's modules, for parity tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

Weights = dict[str, torch.Tensor]


def causal_conv(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    # official CausalConv3d: pad (W: 1, 1, H: 1, 1, T: 2, 0) by replication, then a 3x3x3 conv
    x = F.pad(x, (1, 1, 1, 1, 2, 0), mode="replicate")
    return F.conv3d(x, w[f"{name}.conv.weight"], w[f"{name}.conv.bias"])


def rms_norm(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    # official RMS_norm(images=False): F.normalize over channels * sqrt(C) * gamma (C, 1, 1, 1)
    return F.normalize(x, dim=1) * x.shape[1] ** 0.5 * w[f"{name}.gamma"]


def resnet_block(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    h = causal_conv(w, f"{name}.conv1", F.silu(rms_norm(w, f"{name}.norm1", x)))
    h = causal_conv(w, f"{name}.conv2", F.silu(rms_norm(w, f"{name}.norm2", h)))
    if f"{name}.nin_shortcut.weight" in w:
        x = F.conv3d(x, w[f"{name}.nin_shortcut.weight"], w[f"{name}.nin_shortcut.bias"])
    return x + h


def sr_to_720p(w: Weights, x: torch.Tensor, *, num_blocks: int, global_residual: bool) -> torch.Tensor:
    y = causal_conv(w, "in_conv", x)
    for i in range(num_blocks):
        h = F.silu(causal_conv(w, f"blocks.{i}.block.0", y))
        h = F.silu(causal_conv(w, f"blocks.{i}.block.2", h))
        y = y + causal_conv(w, f"blocks.{i}.block.4", h)
    y = causal_conv(w, "out_conv", y)
    return y + x if global_residual and y.shape == x.shape else y


def sr_to_1080p(w: Weights, z: torch.Tensor, *, levels: int, num_res_blocks: int) -> torch.Tensor:
    first = w["conv_in.conv.weight"].shape[0]
    h = causal_conv(w, "conv_in", z) + z.repeat_interleave(first // z.shape[1], dim=1)
    for level in range(levels):
        for block in range(num_res_blocks + 1):
            h = resnet_block(w, f"up.{level}.block.{block}", h)
    return causal_conv(w, "conv_out", F.silu(rms_norm(w, "norm_out", h)))


def official_names(class_name: str, config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the official module for ``config``, as its __init__ makes them."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cin: int, cout: int, k: int = 3, causal: bool = True) -> None:
        prefix = f"{name}.conv" if causal else name
        out[f"{prefix}.weight"], out[f"{prefix}.bias"] = (cout, cin, k, k, k), (cout,)

    if class_name == "SRTo720pUpsampler":
        hidden = config.get("hidden_channels") or 64
        conv("in_conv", config["in_channels"], hidden)
        for i in range(config.get("num_blocks", 6)):
            for j in (0, 2, 4):
                conv(f"blocks.{i}.block.{j}", hidden, hidden)
        conv("out_conv", hidden, config["out_channels"])
        return out
    channels = config["block_out_channels"]
    width = channels[0]
    conv("conv_in", config["z_channels"], width)
    for level, c in enumerate(channels):
        for block in range(config.get("num_res_blocks", 2) + 1):
            name = f"up.{level}.block.{block}"
            out[f"{name}.norm1.gamma"] = (width, 1, 1, 1)
            conv(f"{name}.conv1", width, c)
            out[f"{name}.norm2.gamma"] = (c, 1, 1, 1)
            conv(f"{name}.conv2", c, c)
            if width != c:
                conv(f"{name}.nin_shortcut", width, c, k=1, causal=False)
            width = c
    out["norm_out.gamma"] = (width, 1, 1, 1)
    conv("conv_out", width, config["out_channels"])
    return out
