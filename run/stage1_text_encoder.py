"""Stage 1: encode the prompt (and, for i2v, the image) into the stage hand-off folder.

    python run/stage1_text_encoder.py --prompt "A cat walks on the grass" --output_dir ./stage_outputs
    python run/stage1_text_encoder.py --prompt "..." --image first_frame.png \\
        --text_encoder ckpts/text_encoder/llm --byt5 ckpts/text_encoder/Glyph-SDXL-v2 \\
        --vision_encoder ckpts/vision_encoder/siglip --vae ckpts/vae --model ckpts/transformer/480p_i2v

Without an encoder path, that encoder is a small one built from a config with seeded random
weights, as wide as --model's DiT expects (the tiny DiT by default); each such choice is said
on stderr. Writes embeddings.safetensors and a fresh config.json (run settings + "stage1").
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import torch

from hunyuan_tpu import encoder_runtime as er
from hunyuan_tpu import handoff
from hunyuan_tpu import image_condition as ic
from hunyuan_tpu import text_encoding as te
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.files import InputError, locked_folder
from hunyuan_tpu.pipeline import bucket_size, latent_shape
from hunyuan_tpu.super_resolution import hr_bucket, sr_version
from hunyuan_tpu.vae import encode_image, load_vae, tiny_vae, vae_config_latent_channels
from stage_cli import DTYPES, Parser, add_model_flag, add_vae_group, add_video_group, dtype_of, model_config, run_main


def add_prompt_group(p: argparse.ArgumentParser) -> None:
    prompt = p.add_argument_group("prompt")
    prompt.add_argument("--prompt", metavar="TEXT", help="what the video shows (required); text in \"quotes\" "
                        "is also read by the glyph encoder")
    prompt.add_argument("--negative_prompt", metavar="TEXT", help="what it should not show (default: empty)")
    prompt.add_argument("--image", metavar="FILE", help="first frame for image-to-video (i2v); without it, t2v")


def add_sr_flag(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--sr", action="store_true", default=None,
                       help="super-resolution after the base run (480p -> 720p, 720p -> 1080p): stage 1 also encodes "
                       "the i2v image at the SR canvas, stage 3 decodes the SR latents")


BACKENDS = ("auto", "jax", "torch")
# (flag, what it sets, default): the official pipeline runs the LLM and SigLIP in float16, ByT5 in float32
ENCODER_DTYPES = (("text_encoder_dtype", "Qwen2.5-VL", "float16"), ("byt5_dtype", "ByT5", "float32"),
                  ("vision_encoder_dtype", "SigLIP", "float16"))


def add_encoder_group(p: argparse.ArgumentParser) -> None:
    enc = p.add_argument_group("encoders (default for each: a tiny one with seeded random weights)")
    enc.add_argument("--text_encoder", metavar="DIR", help="Qwen2.5-VL-7B-Instruct folder (ckpts/text_encoder/llm)")
    enc.add_argument("--byt5", metavar="DIR", help="Glyph-SDXL-v2 folder, with google/byt5-small beside it as "
                     "byt5-small/ (ckpts/text_encoder/Glyph-SDXL-v2)")
    enc.add_argument("--vision_encoder", metavar="DIR", help="SigLIP folder from FLUX.1-Redux-dev, i2v only "
                     "(ckpts/vision_encoder/siglip)")
    enc.add_argument("--encoder_backend", choices=BACKENDS,
                     help="jax: each encoder jitted through torchax on the accelerator (compiled once: every "
                     "input has a fixed shape); torch: eager PyTorch on the host (default: auto, jax on TPU and "
                     "GPU, torch on a CPU-only machine)")
    for flag, what, default in ENCODER_DTYPES:
        enc.add_argument(f"--{flag}", choices=sorted(DTYPES),
                         help=f"{what} dtype (default: {default}, as the official pipeline; bfloat16 is TPU's "
                         "native type, its drift is in BENCHMARKS.md)")


def build_parser() -> Parser:
    p = Parser(description="Stage 1: encode the prompt (and the i2v image) for the DiT "
               "(-> embeddings.safetensors, config.json).")
    io = p.add_argument_group("input and output")
    io.add_argument("--output_dir", default="./stage_outputs", metavar="DIR", help="hand-off folder (default: %(default)s)")
    add_prompt_group(p)
    model = p.add_argument_group("model")
    add_model_flag(model)
    add_sr_flag(model)
    add_encoder_group(p)
    add_vae_group(p)
    add_video_group(p)
    return p


def _check_width(flag: str, path: str | None, width_of, expected: int, model: str) -> None:
    if path is not None and (width := width_of(Path(path))) != expected:
        raise InputError(f"{flag} {path}: gives {width}-wide states, but --model {model} takes {expected} "
                         "(pick the --model these encoders belong to)")


def check_widths(args: argparse.Namespace, config: DiTConfig, model_name: str, *, vision: bool, vae: bool) -> None:
    """The encoders and VAE the flags name give what ``config``'s DiT takes (read from their configs)."""
    _check_width("--text_encoder", args.text_encoder, te.llm_width, config.text_states_dim, model_name)
    _check_width("--byt5", args.byt5, te.byt5_width, config.byt5_states_dim, model_name)
    if vision:
        _check_width("--vision_encoder", args.vision_encoder, ic.siglip_width, config.vision_states_dim, model_name)
    if vae and args.vae and (channels := vae_config_latent_channels(args.vae)) != config.latent_channels:
        raise InputError(f"--vae {args.vae}: has {channels} latent channels, --model {model_name} takes "
                         f"{config.latent_channels}")


def _note_tiny(what: str, flag: str, size: str) -> None:
    print(f"note: no {flag}: {what} is a tiny one with seeded random weights ({size})", file=sys.stderr)


def _warn_truncated(what: str, encoded: te.Encoded, limit: int) -> None:
    if encoded.dropped_tokens:
        print(f"warning: the {what} is {limit + encoded.dropped_tokens} tokens with the template, the encoder reads "
              f"{limit}: the last {encoded.dropped_tokens} are cut off (as the reference does)", file=sys.stderr)


def _canvas(args: argparse.Namespace, config: DiTConfig, image) -> dict:
    """The run's video settings: what is given, and the bucket (recorded for i2v, whose latents depend on it)."""
    resolution = args.resolution or config.ideal_resolution or "480p"
    settings: dict = {"resolution": resolution}
    if image is not None:
        if args.aspect_ratio is not None:
            raise InputError("--aspect_ratio does not apply to i2v: the image's aspect ratio picks the bucket")
        height, width = ic.image_bucket(image, resolution)
        settings["height"], settings["width"] = args.height or height, args.width or width
    else:
        settings["aspect_ratio"] = args.aspect_ratio or "16:9"
        height, width = bucket_size(resolution, settings["aspect_ratio"])
        settings.update({k: getattr(args, k) for k in ("height", "width") if getattr(args, k) is not None})
    if args.video_length is not None:
        settings["video_length"] = args.video_length
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
    encoder_dtypes: dict[str, torch.dtype]  # by ENCODER_DTYPES flag
    backend: str  # jax or torch
    vae_dtype: torch.dtype
    canvas: dict
    out_dir: Path
    sr_resolution: str | None  # with --sr: the family of the SR canvas

    def sr_canvas(self, image) -> tuple[tuple[int, int], tuple[int, int]]:
        """(height, width) of the SR canvas (the image latents) and of SigLIP's crop there: the
        SR pipeline maps the canvas to its HR bucket, and crops the image for SigLIP at the HR
        family's bucket closest to the image itself."""
        hr = hr_bucket(self.canvas["height"], self.canvas["width"], self.sr_resolution)
        return hr, ic.image_bucket(image, self.sr_resolution)


def resolve_settings(args: argparse.Namespace) -> tuple[Settings, object]:
    """The settings, and the i2v image (None for t2v), each value checked."""
    if args.prompt is None:
        raise InputError("--prompt is missing: describe the video")
    for flag, text in (("--prompt", args.prompt), ("--negative_prompt", args.negative_prompt or "")):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # undecodable bytes on the command line arrive as lone surrogates
            raise InputError(f"{flag} is not valid UTF-8 text (at character {e.start}): pass it in UTF-8") from None
    if not args.prompt.strip():  # the official pipeline encodes it (an empty one as " "): so does this
        print("warning: --prompt is only whitespace: the video follows no description", file=sys.stderr)
    model_name = args.model or "tiny"
    config = model_config(model_name)
    task = "i2v" if args.image else "t2v"
    if config.ideal_task not in (None, task):
        raise InputError(f"--model {model_name} is trained for {config.ideal_task}, but the run is {task}")
    encoder_dtypes = {flag: dtype_of(f"--{flag}", getattr(args, flag) or default)
                      for flag, _, default in ENCODER_DTYPES}
    vae_dtype = dtype_of("--vae_dtype", args.vae_dtype or "float32")
    if task == "t2v" and args.vision_encoder:
        raise InputError("--vision_encoder is for i2v: give --image too")
    image = ic.read_image(args.image) if task == "i2v" else None
    canvas = _canvas(args, config, image)
    check_widths(args, config, model_name, vision=task == "i2v", vae=task == "i2v")
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--output_dir {out_dir}: exists and is not a folder")
    sr_resolution = DiTConfig.preset(sr_version(config, canvas["resolution"])).ideal_resolution if args.sr else None
    backend = args.encoder_backend or "auto"
    if backend not in BACKENDS:
        raise InputError(f"--encoder_backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "torch" if jax.default_backend() == "cpu" else "jax"
    settings = Settings(args.prompt, args.negative_prompt or "", task, model_name, config, encoder_dtypes, backend,
                        vae_dtype, canvas, out_dir, sr_resolution)
    return settings, image


def handoff_settings(s: Settings, vae: str | None) -> dict[str, Any]:
    """The run's settings as config.json hands them to the later stages."""
    return {"prompt": s.prompt, "negative_prompt": s.negative_prompt, "task": s.task, **s.canvas, "model": s.model,
            "sr": bool(s.sr_resolution), "vae": vae, "vae_dtype": str(s.vae_dtype).removeprefix("torch.")}


@dataclasses.dataclass(frozen=True)
class Encoders:
    llm: te.Encoder
    byt5: te.Encoder
    vision: ic.VisionEncoder | None = None
    vae: object | None = None
    # how each model runs: eagerly, or jitted (``on_device``)
    llm_run: te.ModelCall = te.eager_llm
    byt5_run: te.ModelCall = te.eager_byt5
    vision_run: ic.SiglipCall = ic.eager_siglip

    def on_device(self) -> Encoders:
        """The same encoders, each model jitted on the default device (weights copied there once)."""
        return dataclasses.replace(
            self, llm_run=er.llm_call(er.jax_llm(self.llm.model)), byt5_run=er.byt5_call(er.jax_byt5(self.byt5.model)),
            vision_run=er.siglip_call(er.jax_siglip(self.vision.model)) if self.vision else ic.eager_siglip)


def _model(path: str | None, load: Callable[[], object], tiny: Callable[[], object], what: str, flag: str,
           size: str) -> object:
    """The model at ``path`` (``load``), else a tiny one with seeded random weights, said on stderr."""
    if path:
        return load()
    _note_tiny(what, flag, size)
    return tiny()


def load_vae_flag(args: argparse.Namespace, config: DiTConfig, dtype: torch.dtype):
    """The VAE --vae names, or a tiny one with seeded random weights."""
    return _model(args.vae, lambda: load_vae(args.vae, dtype), lambda: tiny_vae(config.latent_channels, dtype),
                  "the VAE", "--vae", f"{config.latent_channels} latent channels")


def encoders_from(args: argparse.Namespace, config: DiTConfig, dtypes: dict[str, torch.dtype], backend: str, *,
                  vision: bool, vae=None) -> Encoders:
    """The text encoders the flags name (and SigLIP with ``vision``), or tiny ones with seeded
    random weights as wide as ``config`` takes; jitted on the device with the jax ``backend``."""
    dtype = dtypes["text_encoder_dtype"]
    llm = _model(args.text_encoder, lambda: te.load_llm(Path(args.text_encoder), dtype),
                 lambda: te.tiny_llm(config.text_states_dim, dtype),
                 "the text encoder (Qwen2.5-VL language model)", "--text_encoder", f"{config.text_states_dim} wide")
    byt5 = _model(args.byt5, lambda: te.load_byt5(Path(args.byt5), dtypes["byt5_dtype"]),
                  lambda: te.tiny_byt5(config.byt5_states_dim, dtypes["byt5_dtype"]),
                  "the glyph encoder (ByT5)", "--byt5", f"{config.byt5_states_dim} wide")
    vision_encoder = None
    if vision:
        dtype = dtypes["vision_encoder_dtype"]
        vision_encoder = _model(args.vision_encoder, lambda: ic.load_siglip(Path(args.vision_encoder), dtype),
                                lambda: ic.tiny_siglip(config.vision_states_dim, dtype),
                                "the vision encoder (SigLIP)", "--vision_encoder", f"{config.vision_states_dim} wide")
    encoders = Encoders(llm, byt5, vision_encoder, vae)
    return encoders.on_device() if backend == "jax" else encoders


def load_encoders(args: argparse.Namespace, s: Settings) -> Encoders:
    """The encoders the flags name, or tiny ones with seeded random weights."""
    encoders = encoders_from(args, s.config, s.encoder_dtypes, s.backend, vision=s.task == "i2v")
    if s.task != "i2v":
        return encoders
    return dataclasses.replace(encoders, vae=load_vae_flag(args, s.config, s.vae_dtype))


def encode_prompt(encoders: Encoders, prompt: str) -> tuple[dict[str, torch.Tensor], te.Encoded, te.Encoded]:
    """The four text tensors of ``prompt`` (the LLM's states and the glyph encoder's of its quoted
    text, each with its mask), and the two encodings they come from."""
    states = te.encode_llm(encoders.llm, prompt, run=encoders.llm_run)
    glyphs = te.encode_byt5(encoders.byt5, prompt, run=encoders.byt5_run)
    tensors = {"prompt_embeds": states.states, "prompt_mask": states.mask,
               "prompt_embeds_2": glyphs.states, "prompt_mask_2": glyphs.mask}
    return tensors, states, glyphs


def encode(s: Settings, encoders: Encoders, image) -> tuple[dict[str, torch.Tensor], dict]:
    """The hand-off tensors (text, and the image for i2v) and what the record says of them."""
    tensors, positive, glyphs = encode_prompt(encoders, s.prompt)
    negative = te.encode_llm(encoders.llm, s.negative_prompt, run=encoders.llm_run)
    _warn_truncated("prompt", positive, te.LLM_MAX_LENGTH)
    _warn_truncated("negative prompt", negative, te.LLM_MAX_LENGTH)
    _warn_truncated("quoted text", glyphs, te.BYT5_MAX_LENGTH)
    # the reference gives the negative side no glyphs
    no_glyphs = te.encode_byt5(encoders.byt5, "", run=encoders.byt5_run)
    tensors.update({
        "negative_prompt_embeds": negative.states, "negative_prompt_mask": negative.mask,
        "negative_prompt_embeds_2": no_glyphs.states, "negative_prompt_mask_2": no_glyphs.mask,
    })
    if s.task == "i2v":
        fitted = ic.resize_center_crop(image, s.canvas["height"], s.canvas["width"])
        tensors["vision_states"] = ic.encode_siglip(encoders.vision, fitted, run=encoders.vision_run)
        tensors["image_cond_latents"] = encode_image(encoders.vae, ic.to_pixels(fitted))
        if s.sr_resolution:
            (hr_h, hr_w), (crop_h, crop_w) = s.sr_canvas(image)
            crop = ic.resize_center_crop(image, crop_h, crop_w)
            tensors["sr_vision_states"] = ic.encode_siglip(encoders.vision, crop, run=encoders.vision_run)
            tensors["sr_image_cond_latents"] = encode_image(
                encoders.vae, ic.to_pixels(ic.resize_center_crop(image, hr_h, hr_w)))
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise InputError(f"the encoders produced non-finite values in {', '.join(bad)} "
                         "(try float32: --text_encoder_dtype, --byt5_dtype, --vision_encoder_dtype)")
    record = {
        "prompt_tokens": int(positive.mask.sum()), "negative_prompt_tokens": int(negative.mask.sum()),
        "glyph_texts": te.glyph_texts(s.prompt), "glyph_tokens": int(glyphs.mask.sum()),
        "truncated_tokens": positive.dropped_tokens,
    }
    return tensors, record


def run(args: argparse.Namespace) -> int:
    """Stage 1: check the settings, load the encoders, encode, write embeddings and config.json."""
    started = time.perf_counter()
    s, image = resolve_settings(args)
    load_begin = time.perf_counter()
    encoders = load_encoders(args, s)
    load_s = time.perf_counter() - load_begin
    encode_begin = time.perf_counter()
    tensors, counts = encode(s, encoders, image)
    encode_s = time.perf_counter() - encode_begin
    with locked_folder(s.out_dir):  # another run writing here is refused; a killed run's temporaries go
        handoff.write_embeddings(s.out_dir, {k: v.contiguous() for k, v in tensors.items()})
        total_s = time.perf_counter() - started
        record = {
            "text_encoder": encoders.llm.source, "byt5": encoders.byt5.source,
            "vision_encoder": encoders.vision.source if encoders.vision else None,
            **{flag: str(dtype).removeprefix("torch.") for flag, dtype in s.encoder_dtypes.items()},
            "encoder_backend": s.backend, **counts,
            "load_s": round(load_s, 3), "encode_s": round(encode_s, 3), "total_s": round(total_s, 3),
        }
        handoff.write_config(s.out_dir, {**handoff_settings(s, args.vae), "stage1": record})
    print(f"stage 1: {s.task}, {record['prompt_tokens']} prompt tokens, {len(record['glyph_texts'])} quoted text(s) | "
          f"load {load_s:.2f} s, encode {encode_s:.2f} s | total {total_s:.2f} s -> {s.out_dir / handoff.EMBEDDINGS_NAME}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line, in this process: returns the exit code (2 and one line for bad input)."""
    return run_main(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
