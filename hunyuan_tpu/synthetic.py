"""Seeded synthetic DiT inputs, for tests, benchmarks and the weight-free demo."""

from __future__ import annotations

import torch

from .config import DiTConfig


def random_inputs(
    cfg: DiTConfig,
    *,
    batch: int = 2,
    latent: tuple[int, int, int] = (3, 4, 6),
    text_len: int = 12,
    byt5_len: int = 6,
    vision_len: int | None = None,
    meanflow: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Keyword arguments for ``HunyuanVideo15DiT.forward``: random states, padded text.

    Sample i has ``text_len - 2 - 3i`` valid LLM tokens and ``byt5_len - 1 - 2i`` (at least 1)
    valid ByT5 tokens, so padding differs across the batch; timesteps differ too.
    """
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.zeros(batch, text_len, dtype=torch.long)
    byt5_mask = torch.zeros(batch, byt5_len, dtype=torch.long)
    for i in range(batch):
        text_mask[i, : max(1, text_len - 2 - 3 * i)] = 1
        byt5_mask[i, : max(1, byt5_len - 1 - 2 * i)] = 1
    inputs = {
        "x": torch.randn(batch, cfg.img_in_channels, *latent, generator=g),
        "t": torch.rand(batch, generator=g) * 1000,
        "text_states": torch.randn(batch, text_len, cfg.text_states_dim, generator=g),
        "text_mask": text_mask,
        "byt5_states": torch.randn(batch, byt5_len, cfg.byt5_states_dim, generator=g),
        "byt5_mask": byt5_mask,
    }
    inputs["t"][0] = 999.0
    if vision_len is not None:
        inputs["vision_states"] = torch.randn(batch, vision_len, cfg.vision_states_dim, generator=g)
    if meanflow:
        inputs["timestep_r"] = inputs["t"] * torch.rand(batch, generator=g)
    return inputs


def stage1_embeddings(
    cfg: DiTConfig,
    *,
    task: str = "t2v",
    latent_hw: tuple[int, int] = (4, 7),
    text_len: int = 32,
    byt5_len: int = 16,
    vision_len: int = 8,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """What stage 1 writes to ``embeddings.safetensors``, as seeded noise at the model's widths.

    Prompt and negative prompt have different valid lengths (prefix masks), like real encoders.
    """
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for prefix, valid, valid_2 in (("", text_len * 3 // 4, byt5_len // 2), ("negative_", text_len // 4, 1)):
        out[prefix + "prompt_embeds"] = torch.randn(1, text_len, cfg.text_states_dim, generator=g)
        out[prefix + "prompt_mask"] = (torch.arange(text_len) < valid).long()[None]
        out[prefix + "prompt_embeds_2"] = torch.randn(1, byt5_len, cfg.byt5_states_dim, generator=g)
        out[prefix + "prompt_mask_2"] = (torch.arange(byt5_len) < valid_2).long()[None]
    if task == "i2v":
        out["vision_states"] = torch.randn(1, vision_len, cfg.vision_states_dim, generator=g)
        out["image_cond_latents"] = torch.randn(1, cfg.in_channels, 1, *latent_hw, generator=g)
    return out
