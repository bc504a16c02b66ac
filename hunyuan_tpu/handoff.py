"""The folder the three stages hand off through.

    <folder>/config.json             run settings (prompt, task, resolution, ...) plus one entry
                                     per stage ("stage1", "stage2", ...) recording what it did
    <folder>/embeddings.safetensors  stage 1: prompt_embeds (1, S1, 3584), prompt_mask (1, S1),
                                     prompt_embeds_2 (1, S2, 1472), prompt_mask_2 (1, S2), their
                                     negative_* twins; for i2v vision_states (1, 729, 1152) and
                                     image_cond_latents (1, 32, 1, H/16, W/16)
    <folder>/latents.safetensors     stage 2: latents (1, 32, T, H/16, W/16), float32
    <folder>/sr_latents.safetensors  the SR stage: latents of the high-resolution canvas; for i2v
                                     stage 1 (--sr) adds sr_vision_states and sr_image_cond_latents,
                                     the image's conditions at that canvas, to the embeddings
    <folder>/video.mp4               stage 3: the decoded video (SR latents when there), H.264, 24 fps
    <folder>/first_frame.png         stage 3: its first frame

Readers validate everything before anything is written, so bad input never clobbers output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DiTConfig
from .files import InputError, read_json, read_safetensors, save_safetensors, write_json

CONFIG_NAME = "config.json"
EMBEDDINGS_NAME = "embeddings.safetensors"
LATENTS_NAME = "latents.safetensors"
SR_LATENTS_NAME = "sr_latents.safetensors"
VIDEO_NAME = "video.mp4"
FIRST_FRAME_NAME = "first_frame.png"
TEXT_KEYS = ("prompt_embeds", "prompt_mask", "prompt_embeds_2", "prompt_mask_2")
I2V_KEYS = ("vision_states", "image_cond_latents")
SR_PREFIX = "sr_"  # the i2v conditions at the super-resolution canvas
TASKS = ("t2v", "i2v")


def required_keys(task: str, sr: bool = False) -> tuple[str, ...]:
    image_keys = tuple((SR_PREFIX if sr else "") + k for k in I2V_KEYS) if task == "i2v" else ()
    return TEXT_KEYS + tuple("negative_" + k for k in TEXT_KEYS) + image_keys


def read_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: is a file, not a stage folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder (run stage 1 first, or stage 2 with {{demo}})")
    return read_json(folder / CONFIG_NAME)


def write_config(folder: str | Path, config: dict[str, Any]) -> None:
    """Start the folder's config.json afresh (stage 1: a new run), atomically."""
    write_json(Path(folder) / CONFIG_NAME, config)


def update_config(folder: str | Path, updates: dict[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` into the folder's config.json (atomically) and return the result."""
    path = Path(folder) / CONFIG_NAME
    config = read_json(path) if path.exists() else {}
    config.update(updates)
    write_json(path, config)
    return config


def _expect(ok: bool, path: Path, message: str) -> None:
    if not ok:
        raise InputError(f"{path}: {message}")


def read_embeddings(
    folder: str | Path, *, task: str, model: DiTConfig, latent_hw: tuple[int, int], sr: bool = False
) -> dict[str, np.ndarray]:
    """Stage-1 tensors as numpy (states float32, masks int32), checked against the model; with
    ``sr`` the i2v conditions are those of the SR canvas ``latent_hw``."""
    path = Path(folder) / EMBEDDINGS_NAME
    tensors, _ = read_safetensors(path)
    return checked_embeddings(tensors, path, task=task, model=model, latent_hw=latent_hw, sr=sr)


def checked_embeddings(
    tensors: dict[str, torch.Tensor], path: str | Path, *, task: str, model: DiTConfig, latent_hw: tuple[int, int],
    sr: bool = False,
) -> dict[str, np.ndarray]:
    """``read_embeddings`` of tensors in memory (``path`` names where they come from)."""
    missing = [k for k in required_keys(task, sr) if k not in tensors]
    hint = " (run stage 1 with {sr} for the SR stage's i2v conditions)" if sr and task == "i2v" else ""
    _expect(not missing, path, f"missing tensor(s) {', '.join(missing)} (needed for {task}){hint}")
    widths = {"prompt_embeds": model.text_states_dim, "prompt_embeds_2": model.byt5_states_dim}
    for prefix in ("", "negative_"):
        for states, mask in (("prompt_embeds", "prompt_mask"), ("prompt_embeds_2", "prompt_mask_2")):
            s, m = tensors[prefix + states], tensors[prefix + mask]
            _expect(s.ndim == 3 and s.shape[0] == 1, path, f"{prefix + states} has shape {tuple(s.shape)}, expected (1, length, width)")
            _expect(s.shape[2] == widths[states], path,
                    f"{prefix + states} is {s.shape[2]} wide but the model takes {widths[states]}")
            _expect(tuple(m.shape) == tuple(s.shape[:2]), path,
                    f"{prefix + mask} has shape {tuple(m.shape)}, expected {tuple(s.shape[:2])}")
    if task == "i2v":
        prefix = SR_PREFIX if sr else ""
        v, c = tensors[prefix + "vision_states"], tensors[prefix + "image_cond_latents"]
        _expect(v.ndim == 3 and v.shape[0] == 1 and v.shape[2] == model.vision_states_dim, path,
                f"{prefix}vision_states has shape {tuple(v.shape)}, expected (1, tokens, {model.vision_states_dim})")
        expected = (1, model.latent_channels, 1, *latent_hw)
        _expect(tuple(c.shape) == expected, path,
                f"{prefix}image_cond_latents has shape {tuple(c.shape)}, expected {expected}")
    out = {}
    for key in required_keys(task, sr):
        t = tensors[key]
        if "mask" in key:
            out[key] = t.to(torch.int32).numpy()
        else:
            _expect(bool(torch.isfinite(t).all()), path, f"{key} has non-finite values (NaN or inf)")
            out[key] = t.float().numpy()
    return out


def write_embeddings(folder: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    save_safetensors(tensors, Path(folder) / EMBEDDINGS_NAME)


def write_latents(folder: str | Path, latents: np.ndarray, name: str = LATENTS_NAME) -> Path:
    path = Path(folder) / name
    save_safetensors({"latents": torch.tensor(np.asarray(latents, np.float32))}, path)
    return path


def read_latents(folder: str | Path, name: str = LATENTS_NAME) -> np.ndarray:
    path = Path(folder) / name
    tensors, _ = read_safetensors(path)
    _expect("latents" in tensors, path, "no 'latents' tensor")
    latents = tensors["latents"].float()
    _expect(latents.ndim == 5 and latents.shape[0] == 1 and min(latents.shape) > 0, path,
            f"latents have shape {tuple(latents.shape)}, expected (1, channels, T, H, W), none of them 0")
    _expect(bool(torch.isfinite(latents).all()), path, "latents have non-finite values (NaN or inf)")
    return latents.numpy()
