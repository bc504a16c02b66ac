"""Seeded synthetic DiT inputs, for tests, benchmarks and the weight-free demo."""

from __future__ import annotations

import numpy as np
import torch

from .config import DiTConfig
from .pipeline import build_conditions


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
        out["image_cond_latents"] = torch.randn(1, cfg.latent_channels, 1, *latent_hw, generator=g)
    return out


def training_samples(
    cfg: DiTConfig,
    *,
    count: int,
    latent: tuple[int, int, int] = (3, 4, 6),
    text_len: int = 16,
    byt5_len: int = 8,
    vision_len: int = 8,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A synthetic training set at the model's widths, and its "empty prompt" encoding.

    Each sample's latents are a smooth random field (a few plane waves over frame, row and
    column, unit variance per channel), so there is structure to learn; text and vision
    states are noise with prefix masks of varying length.
    """
    rng = np.random.default_rng(seed)
    t, h, w = latent
    grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"))  # (3, T, H, W)
    waves = rng.normal(size=(count, 32, 4, 3)) * 0.6  # per sample and channel, 4 waves' frequencies
    phases = rng.uniform(0, 2 * np.pi, size=(count, 32, 4))
    field = np.sin(np.einsum("scka,athw->sckthw", waves, grid) + phases[..., None, None, None]).sum(2)
    field = (field - field.mean(axis=(2, 3, 4), keepdims=True)) / (field.std(axis=(2, 3, 4), keepdims=True) + 1e-6)

    def masks(length: int, low: int) -> np.ndarray:
        valid = rng.integers(low, length + 1, size=count)
        return (np.arange(length)[None] < valid[:, None]).astype(np.int32)

    samples = {
        "latents": field.astype(np.float32),
        "prompt_embeds": rng.normal(size=(count, text_len, cfg.text_states_dim)).astype(np.float32),
        "prompt_mask": masks(text_len, 2),
        "prompt_embeds_2": rng.normal(size=(count, byt5_len, cfg.byt5_states_dim)).astype(np.float32),
        "prompt_mask_2": masks(byt5_len, 1),
        "vision_states": rng.normal(size=(count, vision_len, cfg.vision_states_dim)).astype(np.float32),
    }
    empty = {
        "prompt_embeds": rng.normal(size=(1, text_len, cfg.text_states_dim)).astype(np.float32),
        "prompt_mask": (np.arange(text_len)[None] < 1).astype(np.int32),
        "prompt_embeds_2": np.zeros((1, byt5_len, cfg.byt5_states_dim), np.float32),
        "prompt_mask_2": np.zeros((1, byt5_len), np.int32),
    }
    return samples, empty


def full_text_conditions(cfg: DiTConfig, shape: tuple[int, int, int], text_tokens: int,
                         byt5_tokens: int) -> dict[str, np.ndarray]:
    """A t2v CFG step's conditions (``pipeline.build_conditions``) with exactly ``text_tokens``
    LLM and ``byt5_tokens`` ByT5 slots, every one valid: for measuring a step at a known text length."""
    emb = {k: v.numpy() for k, v in stage1_embeddings(
        cfg, latent_hw=shape[1:], text_len=text_tokens, byt5_len=byt5_tokens).items()}
    for prefix in ("", "negative_"):
        emb[prefix + "prompt_mask"][:] = 1
        emb[prefix + "prompt_mask_2"][:] = 1
    return build_conditions(emb, task="t2v", shape=shape, cfg=True)


def moving_ball(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """A seeded synthetic clip: a disc of one colour crossing a plain background at constant
    speed, (F, H, W, 3) uint8; for training data from clips without real footage."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    vy, vx = rng.uniform(-3, 3, 2)
    video = np.empty((frames, height, width, 3), np.uint8)
    video[:] = rng.integers(0, 60, size=3)
    color = rng.integers(80, 255, size=3)
    for t in range(frames):
        video[t][(y - cy - vy * t) ** 2 + (x - cx - vx * t) ** 2 < (height / 5) ** 2] = color
    return video
