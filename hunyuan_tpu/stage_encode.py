"""Stage 1: the prompt (and, for i2v, the image) to the DiT's conditions.

The settings, the encoders (Qwen2.5-VL, Glyph-ByT5, SigLIP and, for i2v, the VAE) loaded once,
and the encoding itself: the hand-off tensors and what the record says of them. The command
``run/stage1_text_encoder.py`` writes them to the hand-off folder; ``generation`` keeps them in
memory. Without a path, each encoder is a tiny one with seeded random weights, as wide as the
DiT takes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
import torch
from PIL import Image

from . import encoder_runtime as er
from . import image_condition as ic
from . import text_encoding as te
from .config import DiTConfig
from .files import InputError, Note
from .pipeline import bucket_size, latent_shape
from .settings import dtype_name, dtype_of, model_config
from .super_resolution import hr_bucket, sr_version
from .vae import VAE, encode_image, load_vae, tiny_vae, vae_config_latent_channels

BACKENDS = ("auto", "jax", "torch")
# (setting, what it sets, default): the official pipeline runs the LLM and SigLIP in float16, ByT5 in float32
ENCODER_DTYPES = (("text_encoder_dtype", "Qwen2.5-VL", "float16"), ("byt5_dtype", "ByT5", "float32"),
                  ("vision_encoder_dtype", "SigLIP", "float16"))


def _check_width(setting: str, path: str | None, width_of, expected: int, model: str) -> None:
    if path is not None and (width := width_of(Path(path))) != expected:
        raise InputError(f"{{{setting}}} {path}: gives {width}-wide states, but {{model}} {model} takes {expected} "
                         "(pick the model these encoders belong to)")


def check_widths(given: Mapping[str, Any], config: DiTConfig, model_name: str, *, vision: bool, vae: bool) -> None:
    """The encoders and VAE ``given`` names give what ``config``'s DiT takes (read from their configs)."""
    _check_width("text_encoder", given.get("text_encoder"), te.llm_width, config.text_states_dim, model_name)
    _check_width("byt5", given.get("byt5"), te.byt5_width, config.byt5_states_dim, model_name)
    if vision:
        _check_width("vision_encoder", given.get("vision_encoder"), ic.siglip_width, config.vision_states_dim,
                     model_name)
    if vae and given.get("vae") and (channels := vae_config_latent_channels(given["vae"])) != config.latent_channels:
        raise InputError(f"{{vae}} {given['vae']}: has {channels} latent channels, {{model}} {model_name} takes "
                         f"{config.latent_channels}")


def as_image(image: Any) -> Image.Image | None:
    """The i2v image: a file's path, a PIL image or an (H, W, 3) uint8 array; None for t2v."""
    if image is None or isinstance(image, Image.Image):
        return None if image is None else image.convert("RGB")
    if isinstance(image, (str, Path)):
        return ic.read_image(image)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise InputError(f"{{image}} is an array of shape {array.shape} and dtype {array.dtype}: give (H, W, 3) uint8, "
                         "a PIL image or a file's path")
    return Image.fromarray(array)


def _canvas(given: Mapping[str, Any], config: DiTConfig, image: Image.Image | None) -> dict:
    """The run's video settings: what is given, and the bucket (recorded for i2v, whose latents depend on it)."""
    resolution = given.get("resolution") or config.ideal_resolution or "480p"
    settings: dict = {"resolution": resolution}
    sizes = {k: given[k] for k in ("height", "width") if given.get(k) is not None}
    if image is not None:
        if given.get("aspect_ratio") is not None:
            raise InputError("{aspect_ratio} does not apply to i2v: the image's aspect ratio picks the bucket")
        height, width = ic.image_bucket(image, resolution)
        settings["height"], settings["width"] = sizes.get("height") or height, sizes.get("width") or width
    else:
        settings["aspect_ratio"] = given.get("aspect_ratio") or "16:9"
        height, width = bucket_size(resolution, settings["aspect_ratio"])
        settings.update(sizes)
    if given.get("video_length") is not None:
        settings["video_length"] = given["video_length"]
    latent_shape(settings.get("video_length", 1), settings.get("height", height), settings.get("width", width))
    return settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """A stage-1 run's settings, checked before any model is loaded."""

    prompt: str
    negative_prompt: str
    task: str
    model: str
    config: DiTConfig
    encoder_dtypes: dict[str, torch.dtype]  # by ENCODER_DTYPES setting
    backend: str  # jax or torch
    vae: str | None
    vae_dtype: torch.dtype
    canvas: dict
    sr_resolution: str | None  # with sr: the family of the SR canvas

    def sr_canvas(self, image: Image.Image) -> tuple[tuple[int, int], tuple[int, int]]:
        """(height, width) of the SR canvas (the image latents) and of SigLIP's crop there: the
        SR pipeline maps the canvas to its HR bucket, and crops the image for SigLIP at the HR
        family's bucket closest to the image itself."""
        hr = hr_bucket(self.canvas["height"], self.canvas["width"], self.sr_resolution)
        return hr, ic.image_bucket(image, self.sr_resolution)

    def handoff(self) -> dict[str, Any]:
        """The run's settings as config.json hands them to the later stages."""
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "task": self.task, **self.canvas,
                "model": self.model, "sr": bool(self.sr_resolution), "vae": self.vae,
                "vae_dtype": dtype_name(self.vae_dtype)}


def _checked_text(setting: str, text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # undecodable bytes on the command line arrive as lone surrogates
        raise InputError(f"{{{setting}}} is not valid UTF-8 text (at character {e.start}): pass it in UTF-8") from None
    return text


def resolve_settings(given: Mapping[str, Any], note: Note) -> tuple[Settings, Image.Image | None]:
    """The settings, and the i2v image (None for t2v), each value checked."""
    if given.get("prompt") is None:
        raise InputError("{prompt} is missing: describe the video")
    prompt = _checked_text("prompt", given["prompt"])
    negative = _checked_text("negative_prompt", given.get("negative_prompt") or "")
    if not prompt.strip():  # the official pipeline encodes it (an empty one as " "): so does this
        note("warning: {prompt} is only whitespace: the video follows no description")
    model_name = given.get("model") or "tiny"
    config = model_config(model_name)
    task = "t2v" if given.get("image") is None else "i2v"
    if config.ideal_task not in (None, task):
        raise InputError(f"{{model}} {model_name} is trained for {config.ideal_task}, but the run is {task}")
    encoder_dtypes = {setting: dtype_of(setting, given.get(setting) or default)
                      for setting, _, default in ENCODER_DTYPES}
    vae_dtype = dtype_of("vae_dtype", given.get("vae_dtype") or "float32")
    if task == "t2v" and given.get("vision_encoder"):
        raise InputError("{vision_encoder} is for i2v: give {image} too")
    image = as_image(given.get("image"))
    canvas = _canvas(given, config, image)
    check_widths(given, config, model_name, vision=task == "i2v", vae=task == "i2v")
    sr_resolution = None
    if given.get("sr"):
        sr_resolution = DiTConfig.preset(sr_version(config, canvas["resolution"])).ideal_resolution
    backend = given.get("encoder_backend") or "auto"
    if backend not in BACKENDS:
        raise InputError(f"{{encoder_backend}} {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "torch" if jax.default_backend() == "cpu" else "jax"
    settings = Settings(prompt, negative, task, model_name, config, encoder_dtypes, backend, given.get("vae"),
                        vae_dtype, canvas, sr_resolution)
    return settings, image


@dataclasses.dataclass(frozen=True)
class Encoders:
    llm: te.Encoder
    byt5: te.Encoder
    vision: ic.VisionEncoder | None = None
    vae: VAE | None = None
    # how each model runs: eagerly, or jitted (``on_device``)
    llm_run: te.ModelCall = te.eager_llm
    byt5_run: te.ModelCall = te.eager_byt5
    vision_run: ic.SiglipCall = ic.eager_siglip

    def on_device(self) -> Encoders:
        """The same encoders, each model jitted on the default device (weights copied there once)."""
        return dataclasses.replace(
            self, llm_run=er.llm_call(er.jax_llm(self.llm.model)), byt5_run=er.byt5_call(er.jax_byt5(self.byt5.model)),
            vision_run=er.siglip_call(er.jax_siglip(self.vision.model)) if self.vision else ic.eager_siglip)

    def with_vision(self, vision: ic.VisionEncoder, backend: str) -> Encoders:
        """These encoders and SigLIP (jitted with the jax ``backend``)."""
        run = er.siglip_call(er.jax_siglip(vision.model)) if backend == "jax" else ic.eager_siglip
        return dataclasses.replace(self, vision=vision, vision_run=run)


def _model(path: str | None, load: Callable[[], object], tiny: Callable[[], object], what: str, setting: str,
           size: str, note: Note) -> object:
    """The model at ``path`` (``load``), else a tiny one with seeded random weights, said through ``note``."""
    if path:
        return load()
    note(f"note: no {{{setting}}}: {what} is a tiny one with seeded random weights ({size})")
    return tiny()


def load_vae_setting(path: str | None, config: DiTConfig, dtype: torch.dtype, note: Note) -> VAE:
    """The VAE at ``path``, or a tiny one with seeded random weights."""
    return _model(path, lambda: load_vae(path, dtype), lambda: tiny_vae(config.latent_channels, dtype),
                  "the VAE", "vae", f"{config.latent_channels} latent channels", note)


def load_vision(path: str | None, config: DiTConfig, dtype: torch.dtype, note: Note) -> ic.VisionEncoder:
    """SigLIP at ``path``, or a tiny one as wide as ``config`` takes."""
    width = config.vision_states_dim
    return _model(path, lambda: ic.load_siglip(Path(path), dtype), lambda: ic.tiny_siglip(width, dtype),
                  "the vision encoder (SigLIP)", "vision_encoder", f"{width} wide", note)


def load_encoders(paths: Mapping[str, str | None], config: DiTConfig, dtypes: Mapping[str, torch.dtype],
                  backend: str, note: Note, *, vision: bool, vae: VAE | None = None) -> Encoders:
    """The text encoders at ``paths`` (``text_encoder``, ``byt5``; and ``vision_encoder`` with
    ``vision``), or tiny ones with seeded random weights as wide as ``config`` takes; jitted on
    the device with the jax ``backend``."""
    dtype, text_path, byt5_path = dtypes["text_encoder_dtype"], paths.get("text_encoder"), paths.get("byt5")
    llm = _model(text_path, lambda: te.load_llm(Path(text_path), dtype),
                 lambda: te.tiny_llm(config.text_states_dim, dtype), "the text encoder (Qwen2.5-VL language model)",
                 "text_encoder", f"{config.text_states_dim} wide", note)
    byt5 = _model(byt5_path, lambda: te.load_byt5(Path(byt5_path), dtypes["byt5_dtype"]),
                  lambda: te.tiny_byt5(config.byt5_states_dim, dtypes["byt5_dtype"]),
                  "the glyph encoder (ByT5)", "byt5", f"{config.byt5_states_dim} wide", note)
    encoders = Encoders(llm, byt5, vae=vae)
    encoders = encoders.on_device() if backend == "jax" else encoders
    if vision:
        siglip = load_vision(paths.get("vision_encoder"), config, dtypes["vision_encoder_dtype"], note)
        encoders = encoders.with_vision(siglip, backend)
    return encoders


def encode_prompt(encoders: Encoders, prompt: str) -> tuple[dict[str, torch.Tensor], te.Encoded, te.Encoded]:
    """The four text tensors of ``prompt`` (the LLM's states and the glyph encoder's of its quoted
    text, each with its mask), and the two encodings they come from."""
    states = te.encode_llm(encoders.llm, prompt, run=encoders.llm_run)
    glyphs = te.encode_byt5(encoders.byt5, prompt, run=encoders.byt5_run)
    tensors = {"prompt_embeds": states.states, "prompt_mask": states.mask,
               "prompt_embeds_2": glyphs.states, "prompt_mask_2": glyphs.mask}
    return tensors, states, glyphs


def _warn_truncated(what: str, encoded: te.Encoded, limit: int, note: Note) -> None:
    if encoded.dropped_tokens:
        note(f"warning: the {what} is {limit + encoded.dropped_tokens} tokens with the template, the encoder reads "
             f"{limit}: the last {encoded.dropped_tokens} are cut off (as the reference does)")


def _image_tensors(s: Settings, encoders: Encoders, image: Image.Image) -> dict[str, torch.Tensor]:
    """i2v: SigLIP's states and the VAE latents of the image fitted to the canvas (and with SR,
    to the SR canvas)."""
    fitted = ic.resize_center_crop(image, s.canvas["height"], s.canvas["width"])
    tensors = {"vision_states": ic.encode_siglip(encoders.vision, fitted, run=encoders.vision_run),
               "image_cond_latents": encode_image(encoders.vae, ic.to_pixels(fitted))}
    if s.sr_resolution:
        (hr_h, hr_w), (crop_h, crop_w) = s.sr_canvas(image)
        crop = ic.resize_center_crop(image, crop_h, crop_w)
        tensors["sr_vision_states"] = ic.encode_siglip(encoders.vision, crop, run=encoders.vision_run)
        hr_pixels = ic.to_pixels(ic.resize_center_crop(image, hr_h, hr_w))
        tensors["sr_image_cond_latents"] = encode_image(encoders.vae, hr_pixels)
    return tensors


def encode(s: Settings, encoders: Encoders, image: Image.Image | None, note: Note
           ) -> tuple[dict[str, torch.Tensor], dict]:
    """The hand-off tensors (text, and the image for i2v) and what the record says of them."""
    tensors, positive, glyphs = encode_prompt(encoders, s.prompt)
    negative = te.encode_llm(encoders.llm, s.negative_prompt, run=encoders.llm_run)
    _warn_truncated("prompt", positive, te.LLM_MAX_LENGTH, note)
    _warn_truncated("negative prompt", negative, te.LLM_MAX_LENGTH, note)
    _warn_truncated("quoted text", glyphs, te.BYT5_MAX_LENGTH, note)
    # the reference gives the negative side no glyphs
    no_glyphs = te.encode_byt5(encoders.byt5, "", run=encoders.byt5_run)
    tensors.update({
        "negative_prompt_embeds": negative.states, "negative_prompt_mask": negative.mask,
        "negative_prompt_embeds_2": no_glyphs.states, "negative_prompt_mask_2": no_glyphs.mask,
    })
    if s.task == "i2v":
        tensors.update(_image_tensors(s, encoders, image))
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise InputError(f"the encoders produced non-finite values in {', '.join(bad)} "
                         "(try float32: {text_encoder_dtype}, {byt5_dtype}, {vision_encoder_dtype})")
    record = {
        "prompt_tokens": int(positive.mask.sum()), "negative_prompt_tokens": int(negative.mask.sum()),
        "glyph_texts": te.glyph_texts(s.prompt), "glyph_tokens": int(glyphs.mask.sum()),
        "truncated_tokens": positive.dropped_tokens,
    }
    return {k: v.contiguous() for k, v in tensors.items()}, record


def record(s: Settings, encoders: Encoders, counts: dict, load_s: float, encode_s: float, total_s: float) -> dict:
    """Stage 1's entry in config.json."""
    return {
        "text_encoder": encoders.llm.source, "byt5": encoders.byt5.source,
        "vision_encoder": encoders.vision.source if encoders.vision and s.task == "i2v" else None,
        **{setting: dtype_name(dtype) for setting, dtype in s.encoder_dtypes.items()},
        "encoder_backend": s.backend, **counts,
        "load_s": round(load_s, 3), "encode_s": round(encode_s, 3), "total_s": round(total_s, 3),
    }


def summary(config: Mapping[str, Any], destination: Any) -> str:
    """The one line stage 1 ends with (``config``: the run's config.json)."""
    rec = config["stage1"]
    return (f"stage 1: {config['task']}, {rec['prompt_tokens']} prompt tokens, {len(rec['glyph_texts'])} quoted "
            f"text(s) | load {rec['load_s']:.2f} s, encode {rec['encode_s']:.2f} s | total {rec['total_s']:.2f} s "
            f"-> {destination}")
