"""The i2v conditions from one input image, as the official pipeline makes them.

The image picks the resolution bucket closest to its own aspect ratio, is scaled (Lanczos) to
cover the bucket and center-cropped to it; then
- the VAE encodes it to ``image_cond_latents`` (1, 32, 1, H/16, W/16), and
- SigLIP (so400m-patch14-384, from FLUX.1-Redux-dev) reads it, after its own processor's resize to
  384 x 384, into ``vision_states`` (1, 729, 1152): the last hidden state, post-layernorm.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

from .files import InputError
from .pipeline import bucket_size
from .random_init import randomize_like_trained_

TINY_IMAGE_SIZE = 56  # 4 x 4 patches of 14 pixels: 16 vision tokens


@dataclasses.dataclass(frozen=True)
class VisionEncoder:
    processor: SiglipImageProcessorPil
    model: SiglipVisionModel
    source: str  # a folder or "tiny"

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)


def read_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as RGB, fully decoded (so that a truncated file fails here)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{{image}} {path}: no such file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{{image}} {path}: cannot read the image ({e})") from None


def image_bucket(image: Image.Image, resolution: str) -> tuple[int, int]:
    """(height, width) of the bucket of ``resolution`` closest to the image's aspect ratio."""
    width, height = image.size
    return bucket_size(resolution, f"{width}:{height}")


def resize_center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale (Lanczos) to cover height x width, then crop the center."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    left, top = (resized.width - width) / 2, (resized.height - height) / 2
    return resized.crop((round(left), round(top), round(left) + width, round(top) + height))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x * 2 - 1)[None]


# ---- SigLIP ----------------------------------------------------------------------------------

def tiny_siglip(width: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> VisionEncoder:
    config = SiglipVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                num_attention_heads=4, image_size=TINY_IMAGE_SIZE, patch_size=14)
    model = randomize_like_trained_(SiglipVisionModel(config), seed=seed)
    processor = SiglipImageProcessorPil(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return VisionEncoder(processor, model.to(dtype).eval(), "tiny")


def _siglip_parts(folder: Path) -> tuple[Path, Path]:
    if not folder.is_dir():
        raise InputError(f"{{vision_encoder}} {folder}: no such folder")
    model_dir, processor_dir = folder / "image_encoder", folder / "feature_extractor"
    for sub, name in ((model_dir, "config.json"), (processor_dir, "preprocessor_config.json")):
        if not (sub / name).is_file():
            raise InputError(f"{{vision_encoder}} {folder}: no {sub.name}/{name} in it "
                             "(expected the FLUX.1-Redux-dev folder, see README)")
    return model_dir, processor_dir


def siglip_width(folder: Path) -> int:
    model_dir, _ = _siglip_parts(folder)
    try:
        return int(SiglipVisionConfig.from_pretrained(model_dir).hidden_size)
    except (ValueError, OSError) as e:
        raise InputError(f"{model_dir / 'config.json'}: cannot read ({e})") from None


def load_siglip(folder: Path, dtype: torch.dtype) -> VisionEncoder:
    """SigLIP from the FLUX.1-Redux-dev layout (the official ``ckpts/vision_encoder/siglip``):
    ``image_encoder/`` holds the model, ``feature_extractor/`` its processor settings."""
    model_dir, processor_dir = _siglip_parts(folder)
    model = SiglipVisionModel.from_pretrained(model_dir, dtype=dtype)
    model.requires_grad_(False)
    return VisionEncoder(SiglipImageProcessorPil.from_pretrained(processor_dir), model.eval(), str(folder))


# (encoder, pixel_values) -> (1, tokens, width) float32 states: SigLIP eagerly on the host
# (``eager_siglip``) or jitted on the accelerator (``encoder_runtime.siglip_call``)
SiglipCall = Callable[[VisionEncoder, torch.Tensor], torch.Tensor]


def eager_siglip(encoder: VisionEncoder, pixel_values: torch.Tensor) -> torch.Tensor:
    dtype = next(encoder.model.parameters()).dtype
    with torch.no_grad():
        return encoder.model(pixel_values=pixel_values.to(dtype)).last_hidden_state.float()


def encode_siglip(encoder: VisionEncoder, image: Image.Image, run: SiglipCall = eager_siglip) -> torch.Tensor:
    """(1, tokens, width) float32 vision states of an RGB image."""
    return run(encoder, encoder.processor(images=np.asarray(image), return_tensors="pt")["pixel_values"])
