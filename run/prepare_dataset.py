"""Turn a folder of captioned clips into a training dataset for run/train.py: VAE latents and
stage-1 text embeddings, in shards grouped by bucket (one shape each).

    python run/prepare_dataset.py --videos clips/ --output_dir dataset/            # tiny models, CPU
    python run/prepare_dataset.py --videos clips/ --output_dir dataset/ --model ckpts/transformer/480p_t2v \\
        --text_encoder ckpts/text_encoder/llm --byt5 ckpts/text_encoder/Glyph-SDXL-v2 --vae ckpts/vae

Each clip's caption is the same-named .txt beside it, or its row in --captions (.jsonl or .csv);
what a clip is and how its frames are taken is in hunyuan_tpu/clips.py, the folder's layout in
hunyuan_tpu/dataset_builder.py. Running it again adds new clips and skips those already encoded
(by content). Exit 0: every clip is in the dataset; 3: some were skipped (report.jsonl says why);
2: bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from hunyuan_tpu import clips as cl
from hunyuan_tpu import image_condition as ic
from hunyuan_tpu.dataset import EMPTY_PROMPT, bucket_name
from hunyuan_tpu.dataset_builder import REPORT, DatasetBuilder, write_report
from hunyuan_tpu.files import InputError, locked_folder
from hunyuan_tpu.pipeline import RESOLUTION_BASE
from hunyuan_tpu.settings import check_seed, dtype_of, model_config
from hunyuan_tpu.stage_encode import ENCODER_DTYPES, Encoders, check_widths, encode_prompt, load_encoders, \
    load_vae_setting
from hunyuan_tpu.vae import BACKENDS, POSTERIORS, Tiling, posterior_latents, video_encoder
from stage1_text_encoder import add_encoder_group
from stage_cli import Parser, add_model_flag, add_vae_group, finite_float, note, run_main

EXIT_SKIPPED = 3


def build_parser() -> Parser:
    p = Parser(description="Encode a folder of captioned videos and images into a bucketed training dataset.",
               epilog=f"Exit status: 0 every clip encoded, {EXIT_SKIPPED} some skipped (see {REPORT}), 2 bad input.")
    io = p.add_argument_group("input and output")
    io.add_argument("--videos", metavar="DIR", help="folder of clips (searched recursively; required)")
    io.add_argument("--captions", metavar="FILE", help="captions.jsonl ({\"file\", \"caption\"} per line) or "
                    "captions.csv (file,caption), files relative to --videos (default: NAME.txt beside each clip)")
    io.add_argument("--output_dir", default="./dataset", metavar="DIR", help="dataset folder (default: %(default)s)")
    io.add_argument("--shard_size", type=int, default=16, metavar="N", help="samples per shard (default: %(default)s)")
    frames = p.add_argument_group("frames")
    frames.add_argument("--resolution", choices=list(RESOLUTION_BASE),
                        help="bucket family: each clip goes to the bucket of its aspect ratio (default: the model's; "
                        "96p for tiny, 480p without one)")
    rate = frames.add_mutually_exclusive_group()
    rate.add_argument("--fps", type=finite_float, metavar="F", help="frames taken per second of video (default: 24)")
    rate.add_argument("--frame_stride", type=int, metavar="K", help="take every K-th frame instead")
    frames.add_argument("--max_frames", type=int, default=121, metavar="N",
                        help="longest clip, in frames (default: %(default)s)")
    frames.add_argument("--frame_buckets", metavar="N,N,...", help="the clip lengths, each 4k+1: a clip is cut to "
                        "the longest it reaches (default: 25, 49, ... a second at 24 fps apart, up to --max_frames)")
    enc = p.add_argument_group("encoding")
    add_model_flag(enc)
    enc.add_argument("--i2v", action="store_true", help="also encode each clip's first frame with SigLIP "
                     "(vision_states), for i2v training")
    enc.add_argument("--posterior", choices=POSTERIORS, default="sample",
                     help="latents: a sample of the VAE posterior, as the official trainer, or its mode "
                     "(default: %(default)s)")
    enc.add_argument("--seed", type=int, default=0, metavar="N", help="for the posterior samples, drawn per clip "
                     "from its content and this (default: %(default)s)")
    add_encoder_group(p)
    add_vae_group(p)
    vae = p.add_argument_group("vae encode")
    vae.add_argument("--vae_backend", choices=BACKENDS, default="jax", help="jax: jitted per tile shape, the tiles "
                     "spread over this process's devices; torch: eager (default: %(default)s)")
    vae.add_argument("--tile_size", type=int, default=256, metavar="PX", help="spatial tile (default: %(default)s)")
    vae.add_argument("--tile_overlap", type=finite_float, default=0.125, metavar="F",
                     help="(default: %(default)s)")
    vae.add_argument("--no_tiling", action="store_true", help="encode each clip whole")
    return p


def frame_rule(args: argparse.Namespace) -> cl.FrameRule:
    if args.max_frames < 1:
        raise InputError(f"--max_frames {args.max_frames} must be >= 1")
    if args.frame_buckets is None:
        lengths = cl.default_lengths(args.max_frames)
    else:
        try:
            lengths = tuple(int(n) for n in args.frame_buckets.split(","))
        except ValueError:
            raise InputError(f"--frame_buckets {args.frame_buckets!r}: give lengths like 25,49,121") from None
        if max(lengths) > args.max_frames:
            raise InputError(f"--frame_buckets has {max(lengths)}, more than --max_frames {args.max_frames}")
    if args.frame_stride is not None:
        return cl.FrameRule(lengths, fps=None, stride=args.frame_stride)
    return cl.FrameRule(lengths, fps=24.0 if args.fps is None else args.fps)


def settings_of(args: argparse.Namespace, rule: cl.FrameRule, resolution: str, dtypes: dict[str, str]) -> dict:
    """What the dataset's tensors depend on: a folder is only ever added to with the same."""
    return {"model": args.model or "tiny", "resolution": resolution, "fps": rule.fps, "frame_stride": rule.stride,
            "frame_buckets": list(rule.lengths), "i2v": args.i2v, "posterior": args.posterior, "seed": args.seed,
            "text_encoder": args.text_encoder, "byt5": args.byt5,
            "vision_encoder": args.vision_encoder if args.i2v else None, "vae": args.vae,
            "tiling": None if args.no_tiling else [args.tile_size, args.tile_overlap], **dtypes}


def _stored(t: torch.Tensor) -> np.ndarray:
    """States as the encoder made them: float16 ones stay float16 (half the disk, no loss)."""
    return t.numpy() if t.dtype == torch.float16 else t.float().numpy()


def text_sample(encoders: Encoders, caption: str, dtypes: dict[str, torch.dtype]) -> dict[str, np.ndarray]:
    """The caption's four text tensors, as stage 1 encodes a prompt."""
    tensors, _, _ = encode_prompt(encoders, caption)
    out = {}
    for key, value in tensors.items():
        if "mask" in key:
            out[key] = value.to(torch.int32).numpy()
        else:
            encoder = "text_encoder_dtype" if key == "prompt_embeds" else "byt5_dtype"
            out[key] = _stored(value.to(dtypes[encoder]))
    return out


FLOAT32_HINT = "try float32: --vae_dtype, --text_encoder_dtype, --byt5_dtype, --vision_encoder_dtype"


def non_finite(tensors: dict[str, np.ndarray]) -> list[str]:
    """The floating-point tensors holding NaN or inf."""
    return [k for k, v in tensors.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]


class Preparation:
    """The models, and one clip at a time through them."""

    def __init__(self, args: argparse.Namespace, rule: cl.FrameRule, resolution: str,
                 dtypes: dict[str, torch.dtype]):
        config = model_config(args.model or "tiny")
        backend = args.encoder_backend or "auto"
        if backend == "auto":
            backend = "torch" if jax.default_backend() == "cpu" else "jax"
        vae_dtype = dtype_of("vae_dtype", args.vae_dtype or "float32")
        self.encoders = load_encoders(vars(args), config, dtypes, backend, note, vision=args.i2v)
        self.vae = load_vae_setting(args.vae, config, vae_dtype, note)
        tiling = None if args.no_tiling else Tiling(args.tile_size, args.tile_overlap)
        self.moments = video_encoder(self.vae, backend=args.vae_backend, tiling=tiling)
        self.args, self.rule, self.resolution, self.dtypes = args, rule, resolution, dtypes

    def encode(self, clip: cl.Clip, key: str) -> dict[str, np.ndarray]:
        """The clip's sample (each tensor with a leading axis of 1); ``ClipError`` when unusable."""
        frames = cl.read_frames(clip, self.rule, self.resolution)
        latents = posterior_latents(self.moments(cl.to_pixels(frames)), self.vae.scaling_factor,
                                    self.args.posterior, cl.clip_seed(key, self.args.seed))
        sample = {"latents": latents, **text_sample(self.encoders, clip.caption, self.dtypes)}
        if self.args.i2v:
            first = ic.encode_siglip(self.encoders.vision, Image.fromarray(frames[0]), run=self.encoders.vision_run)
            sample["vision_states"] = _stored(first.to(self.dtypes["vision_encoder_dtype"]))
        bad = non_finite(sample)
        if bad:
            raise cl.ClipError(f"the models gave non-finite values in {', '.join(bad)} ({FLOAT32_HINT})")
        return sample

    def empty_prompt(self) -> dict[str, np.ndarray]:
        tensors = text_sample(self.encoders, "", self.dtypes)
        bad = non_finite(tensors)
        if bad:
            raise InputError(f"the text encoders gave non-finite values in {', '.join(bad)} for the empty prompt "
                             f"({FLOAT32_HINT})")
        return tensors


def _check(args: argparse.Namespace) -> tuple[cl.FrameRule, str, dict[str, torch.dtype], list[cl.Clip]]:
    """The flags, each checked, and the clips, before any model is loaded."""
    if args.videos is None:
        raise InputError("--videos DIR is required: the folder of clips")
    rule = frame_rule(args)
    config = model_config(args.model or "tiny")
    resolution = args.resolution or config.ideal_resolution or "480p"
    check_seed("seed", args.seed)
    if args.shard_size < 1:
        raise InputError(f"--shard_size {args.shard_size} must be >= 1")
    dtypes = {flag: dtype_of(flag, getattr(args, flag) or default) for flag, _, default in ENCODER_DTYPES}
    if not args.no_tiling:
        Tiling(args.tile_size, args.tile_overlap)
    check_widths(vars(args), config, args.model or "tiny", vision=args.i2v, vae=True)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output_dir {out}: exists and is not a folder")
    found = cl.find_clips(Path(args.videos), Path(args.captions) if args.captions else None, skip=out)
    if not found:
        raise InputError(f"--videos {args.videos}: no videos ({', '.join(cl.VIDEO_SUFFIXES)}) or images in it")
    return rule, resolution, dtypes, found


def _missing_caption(clip: cl.Clip, args: argparse.Namespace) -> str:
    if clip.caption is None:
        return f"no caption (not in {args.captions})" if args.captions else \
            f"no caption ({clip.path.with_suffix('.txt').name} is missing or unreadable)"
    return "the caption is empty"


def prepare(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    rule, resolution, dtypes, found = _check(args)
    out = Path(args.output_dir)
    settings = settings_of(args, rule, resolution, {k: str(v).removeprefix("torch.") for k, v in dtypes.items()})
    skipped: list[tuple[str, str]] = []
    with locked_folder(out):
        builder = DatasetBuilder(out, settings, args.shard_size)
        before = builder.samples
        todo, seen = [], set(builder.done)
        for clip in found:
            if not clip.caption:
                skipped.append((clip.name, _missing_caption(clip, args)))
                continue
            key = cl.content_key(clip.path)
            if key not in seen:  # not encoded yet, and not a copy of a clip earlier in the folder
                todo.append((clip, key))
                seen.add(key)
        need_models = todo or not (out / EMPTY_PROMPT).exists()
        preparation = Preparation(args, rule, resolution, dtypes) if need_models else None
        begin = time.perf_counter()
        with tqdm(todo, desc="prepare", unit="clip") as bar:
            for clip, key in bar:
                try:
                    sample = preparation.encode(clip, key)
                except cl.ClipError as e:
                    skipped.append((clip.name, str(e)))
                    continue
                builder.add(bucket_name(sample["latents"].shape[1:]), key, clip.name, sample)
                bar.set_postfix(skipped=len(skipped))
        encode_s = time.perf_counter() - begin
        buckets = builder.finish(preparation.empty_prompt() if preparation else {})
        write_report(out, skipped)
    encoded = builder.samples - before
    rate = f", {encoded / encode_s:.2f} clips/s" if encoded else ""
    mix = ", ".join(f"{b.name} {b.samples}" for b in buckets) or "none"
    print(f"prepare: {encoded} clip(s) encoded{rate}, {len(found) - encoded - len(skipped)} already in the dataset, "
          f"{len(skipped)} skipped{f' (see {out / REPORT})' if skipped else ''} | buckets: {mix} | total "
          f"{time.perf_counter() - started:.1f} s -> {out}")
    return EXIT_SKIPPED if skipped else 0


def main(argv: list[str] | None = None) -> int:
    """The command line, in this process: returns the exit code."""
    return run_main(lambda: prepare(build_parser().parse_args(argv)),
                    interrupted="interrupted: the shards already written stay; run the same command again to go on "
                    "(the clips not yet in a shard are encoded again)")


if __name__ == "__main__":
    sys.exit(main())
