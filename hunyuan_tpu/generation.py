"""The Python API: a pipeline that loads the models once and generates many videos.

    from hunyuan_tpu import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline.from_pretrained("ckpts", "720p_t2v", dtype="bfloat16")
    video = pipe("A cat walks on the grass, realistic", video_length=121, seed=1)
    video.save("cat.mp4")

A call runs the stages' own functions in memory (``stage_encode``, ``stage_denoise``,
``stage_sr``, ``stage_decode``); ``run/generate.py`` is a thin layer over this class, so the
command and a call give the same tensors for the same settings. Each model is loaded and placed
on its devices once, and each compiled program is kept (the DiT step per shape, the VAE's tile
shapes, the upsampler, the jitted encoders): a second call of the same shapes compiles nothing.
Text slots are kept in multiples of ``pipeline.TEXT_BUCKET``, so prompts of similar length share
a shape.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import torch
from PIL import Image

from . import handoff
from . import stage_decode as sd
from . import stage_encode as se
from . import stage_sr
from .cache import MagCacheCalibration, write_calibration
from .config import PRESETS, DiTConfig
from .files import InputError, Note, render_settings
from .pipeline import LATENT_CHANNELS, build_conditions, denoise, initial_noise
from .settings import model_config
from .stage_denoise import (
    CACHE_DEFAULTS, DenoiseSettings, DiT, calibration_target, check_finite, record, resolve_settings, warm_up,
)
from .super_resolution import prepare_lq, sr_conditions
from .upsampler import upsampler_function
from .vae import Tiling, vae_config_latent_channels
from .video import write_mp4, write_png

# what loads and places the models: given once, to the constructor (None: the default)
LOAD_SETTINGS = (
    "model", "dtype", "lora", "lora_scale", "sharding", "mesh", "attention", "sparse_attention", "dense_attention",
    "splash_block_q", "splash_block_kv", "splash_block_kv_compute",
    "text_encoder", "byt5", "vision_encoder", "encoder_backend", "text_encoder_dtype", "byt5_dtype",
    "vision_encoder_dtype", "vae", "vae_dtype", "backend", "sr_model", "upsampler",
)
# what each call may set besides the prompt (None: the default; stage 2's names, the SR stage's prefixed sr_)
CALL_SETTINGS = (
    "negative_prompt", "image", "video_length", "resolution", "aspect_ratio", "height", "width",
    "num_inference_steps", "guidance_scale", "flow_shift", "seed", "warmup_steps", *CACHE_DEFAULTS,
    "magcache_calibrate", "sr", "sr_num_inference_steps", "sr_guidance_scale", "sr_flow_shift", "lq_noise_seed",
    "tile_size", "tile_overlap", "no_tiling", "fps",
)
# the SR stage's settings of the same name as stage 2's, under which a call gives them
SR_RENAMED = {"sr_model": "model", "sr_num_inference_steps": "num_inference_steps",
              "sr_guidance_scale": "guidance_scale", "sr_flow_shift": "flow_shift"}
# taken for the SR stage from what the call gives (the rest from stage 2's record, or the SR defaults)
SR_SHARED = ("dtype", "seed", "attention", "sparse_attention", "dense_attention", "splash_block_q",
             "splash_block_kv", "splash_block_kv_compute", "warmup_steps", "upsampler", "lq_noise_seed")
STAGES = ("stage1", "stage2", "sr", "stage3")
# the folders of the official checkpoint root (tencent/HunyuanVideo-1.5's ckpts/)
OFFICIAL_LAYOUT = {"vae": "vae", "text_encoder": "text_encoder/llm", "byt5": "text_encoder/Glyph-SDXL-v2",
                   "vision_encoder": "vision_encoder/siglip"}


def _silent(template: str) -> None:
    pass


def stderr_note(template: str) -> None:
    """What the pipeline says on the way (tiny models, truncated prompts), on stderr."""
    print(render_settings(template, lambda name: name), file=sys.stderr)


def official_paths(root: str | Path, version: str | None) -> dict[str, str | None]:
    """The models of an official checkpoint root for ``transformer/<version>``; a preset name
    (``tiny``) gives that preset with tiny encoders and VAE, all seeded random weights."""
    if str(root) in PRESETS:
        if version is not None:
            raise InputError(f"{{transformer_version}} {version}: a preset ({root}) has no versions")
        return {"model": str(root)}
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{{root}} {root}: no such folder, and not a preset ({', '.join(PRESETS)})")
    versions = sorted(p.name for p in (root / "transformer").glob("*") if (p / "config.json").is_file())
    if version is None and len(versions) != 1:
        raise InputError(f"{{transformer_version}} is needed: {root / 'transformer'} holds "
                         f"{', '.join(versions) or 'no transformer'}")
    version = version or versions[0]
    if version not in versions:
        raise InputError(f"{{transformer_version}} {version}: no {root / 'transformer' / version}/config.json "
                         f"(found: {', '.join(versions) or 'none'})")
    paths: dict[str, str | None] = {"model": str(root / "transformer" / version)}
    for setting, folder in OFFICIAL_LAYOUT.items():
        path = root / folder
        if not path.is_dir() and (setting != "vision_encoder" or "i2v" in version):
            raise InputError(f"{{root}} {root}: no {folder}/ (the official layout has the {setting} there)")
        paths[setting] = str(path) if path.is_dir() else None
    return paths


def has_record(config: Mapping[str, Any], stage: str) -> bool:
    """Whether config.json holds ``stage``'s record ("sr" is also the run's setting, a bool, until
    the SR stage's record replaces it)."""
    return isinstance(config.get(stage), dict)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A call's settings for every stage, checked before any model runs."""

    given: Mapping[str, Any]
    encode: se.Settings
    image: Image.Image | None
    denoise: DenoiseSettings
    config: DiTConfig
    decode: sd.Settings
    tiling: Tiling | None


@dataclasses.dataclass(frozen=True)
class Generation:
    """What a call made: the frames, and all that the stage commands write to their folder."""

    frames: np.ndarray  # (F, H, W, 3) uint8
    fps: int
    latents: np.ndarray  # the latents decoded: the SR stage's with sr, else stage 2's
    base_latents: np.ndarray  # stage 2's
    embeddings: Mapping[str, torch.Tensor]  # stage 1's
    config: Mapping[str, Any]  # config.json's content: the run's settings and each stage's record

    @property
    def super_resolved(self) -> bool:
        return has_record(self.config, stage_sr.KEY)

    @property
    def timings(self) -> dict[str, dict[str, float]]:
        """Each stage's seconds (``load_s``, ``compile_s``, ``total_s``, ...), as config.json records them."""
        return {stage: {k: v for k, v in self.config[stage].items() if k.endswith("_s")}
                for stage in STAGES if has_record(self.config, stage)}

    def save(self, path: str | Path) -> Path:
        """The video as an H.264 mp4 at ``fps``, written atomically."""
        path = Path(path)
        if path.suffix.lower() != ".mp4":
            raise InputError(f"{{path}} {path}: the video is written as .mp4")
        write_mp4(path, self.frames, fps=self.fps)
        return path

    def save_outputs(self, folder: str | Path) -> None:
        """The files of the stage hand-off folder, as the stage commands write them; config.json last."""
        folder = Path(folder)
        begin = time.perf_counter()
        handoff.write_embeddings(folder, dict(self.embeddings))
        handoff.write_latents(folder, self.base_latents)
        if self.super_resolved:
            handoff.write_latents(folder, self.latents, handoff.SR_LATENTS_NAME)
        write_mp4(folder / handoff.VIDEO_NAME, self.frames, fps=self.fps)
        write_png(folder / handoff.FIRST_FRAME_NAME, self.frames[0])
        config = {**self.config}
        config["stage3"] = {**config["stage3"], "write_s": round(time.perf_counter() - begin, 3)}
        handoff.write_config(folder, config)


class HunyuanVideoPipeline:
    """HunyuanVideo-1.5 from prompt (and image) to video, its models loaded once.

    ``from_pretrained`` reads the official checkpoint folder; the constructor takes each model's
    path (None: a tiny one with seeded random weights) and how it runs (``LOAD_SETTINGS``, the
    command line's names). Models load on ``load()`` or, those not loaded yet, on first use.
    Bad settings raise ``InputError`` naming them.
    """

    def __init__(self, *, devices: Sequence[jax.Device] | None = None, note: Note = stderr_note,
                 source: str = "the pipeline's settings", progress: bool = True, **settings: Any):
        unknown = sorted(set(settings) - set(LOAD_SETTINGS))
        if unknown:
            raise InputError(f"unknown setting(s) {', '.join(unknown)}: a pipeline takes {', '.join(LOAD_SETTINGS)}")
        self.settings = dict(settings)
        self.devices = list(jax.devices() if devices is None else devices)
        self.note, self.source, self.progress = note, source, progress
        self.load_seconds: dict[str, float] = {}  # what loading each model took
        self._encoders: se.Encoders | None = None
        self._dit: DiT | None = None
        self._sr: tuple[DiT, Callable[[np.ndarray], np.ndarray]] | None = None
        self._decoder: sd.Decoder | None = None

    @classmethod
    def from_pretrained(cls, root: str | Path, transformer_version: str | None = None, *, sr: bool = False,
                        devices: Sequence[jax.Device] | None = None, **settings: Any) -> HunyuanVideoPipeline:
        """The pipeline of an official checkpoint root (``transformer/<version>``, ``vae``,
        ``text_encoder/llm``, ``text_encoder/Glyph-SDXL-v2``, ``vision_encoder/siglip``; with ``sr``
        also ``transformer/<sr version>`` and ``upsampler/<sr version>``), or of a preset name
        (``"tiny"``: every model tiny, seeded random weights), every model loaded. ``settings``
        (``LOAD_SETTINGS``) override: ``dtype``, ``sharding``, ``mesh``, a path, ...; ``note``,
        ``progress`` and ``source`` are the constructor's."""
        paths = official_paths(root, transformer_version)
        pipe = cls(devices=devices, **{**paths, **settings})
        pipe.load(sr=sr)
        return pipe

    # ---- settings ----------------------------------------------------------------------------

    def plan(self, prompt: str, *, quiet: bool = False, **options: Any) -> Plan:
        """A call's settings for every stage, checked (the SR stage's against the stage-2 run planned);
        ``quiet``: no warnings (the prompt's)."""
        unknown = sorted(set(options) - set(CALL_SETTINGS))
        if unknown:
            raise InputError(f"unknown setting(s) {', '.join(unknown)}: a call takes {', '.join(CALL_SETTINGS)}")
        given = {**self.settings, **options, "prompt": prompt}
        s1, image = se.resolve_settings(given, _silent if quiet else self.note)
        handed = s1.handoff()
        s2, config = resolve_settings(given, handed, self.source)
        calibration_target(given.get("magcache_calibrate"), s2)
        # a batch or canvas a loaded model's placement cannot take (DiT.load checks a model it loads)
        if self._dit is not None:
            self._dit.check_run(s2, s2.latent_shape, self.devices[0])
        s3, tiling = sd.resolve_settings(given, {**handed, "stage2": {}}, self.source)
        if s3.vae and self._decoder is None:  # its config only, so that a bad folder is refused before anything runs
            vae_config_latent_channels(s3.vae)
        if given.get("sr"):
            sr, _ = self._sr_settings(given, {**handed, "stage2": dataclasses.asdict(s2)}, s2.latent_shape, quiet=True)
            if self._sr is not None:
                self._sr[0].check_run(sr, sr.latent_shape, self.devices[0])
        return Plan(given, s1, image, s2, config, s3, tiling)

    def _sr_settings(self, given: Mapping[str, Any], stage_config: Mapping[str, Any], lr_shape: tuple[int, ...],
                     quiet: bool = False) -> tuple[stage_sr.Settings, DiTConfig]:
        own = {name: given.get(key) for key, name in SR_RENAMED.items()}
        own.update({key: given.get(key) for key in SR_SHARED})
        # no feature cache (the base run's schedule is for its steps); the mesh is stage 2's, which the
        # SR settings adapt to a batch without CFG
        return stage_sr.resolve_settings(own, stage_config, (1, LATENT_CHANNELS, *lr_shape), self.source,
                                         _silent if quiet else self.note)

    # ---- models ------------------------------------------------------------------------------

    def load(self, *, sr: bool = False) -> HunyuanVideoPipeline:
        """Load and place every model a default call uses (with ``sr`` the SR models too; SigLIP
        for a model trained for i2v, planned on a 16:9 image)."""
        i2v = model_config(self.settings.get("model") or "tiny").ideal_task == "i2v"
        plan = self.plan("", quiet=True, sr=sr or None, image=Image.new("RGB", (1280, 720)) if i2v else None)
        self._encoders_for(plan.encode)
        self._dit_for(plan.denoise, plan.config)
        self._decoder_for(plan.decode)
        if sr:
            handed = {**plan.encode.handoff(), "stage2": dataclasses.asdict(self._dit.settled(plan.denoise))}
            self._sr_for(*self._sr_settings(plan.given, handed, plan.denoise.latent_shape))
        return self

    def _timed_load(self, what: str, load: Callable[[], Any]) -> Any:
        begin = time.perf_counter()
        value = load()
        self.load_seconds[what] = self.load_seconds.get(what, 0.0) + time.perf_counter() - begin
        return value

    def _encoders_for(self, s: se.Settings) -> se.Encoders:
        if self._encoders is None:
            self._encoders = self._timed_load("encoders", lambda: se.load_encoders(
                self.settings, s.config, s.encoder_dtypes, s.backend, self.note, vision=False))
        if s.task == "i2v" and self._encoders.vision is None:
            vision = self._timed_load("vision_encoder", lambda: se.load_vision(
                self.settings.get("vision_encoder"), s.config, s.encoder_dtypes["vision_encoder_dtype"], self.note))
            self._encoders = self._encoders.with_vision(vision, s.backend)
        return self._encoders

    def _dit_for(self, s: DenoiseSettings, config: DiTConfig) -> DiT:
        if self._dit is None:
            self._dit = self._timed_load("transformer", lambda: DiT.load(s, config, self.devices, s.latent_shape,
                                                                         self.note))
        return self._dit

    def _sr_for(self, s: stage_sr.Settings, config: DiTConfig) -> tuple[DiT, Callable[[np.ndarray], np.ndarray]]:
        if self._sr is None:
            dit = self._timed_load("sr_transformer", lambda: DiT.load(s, config, self.devices, s.latent_shape,
                                                                      self.note))
            upsampler = self._timed_load("upsampler", lambda: stage_sr.upsampler_of(s.upsampler, self.note))
            self._sr = dit, upsampler_function(upsampler)
        return self._sr

    def _decoder_for(self, s: sd.Settings) -> sd.Decoder:
        if self._decoder is None:
            local = [d for d in self.devices if d.process_index == jax.process_index()]
            self._decoder = self._timed_load("vae", lambda: sd.Decoder(sd.load(s, LATENT_CHANNELS, self.note), local))
        return self._decoder

    # ---- a call ------------------------------------------------------------------------------

    def __call__(self, prompt: str, *, profile: tuple[str, int] | None = None, **options: Any) -> Generation:
        """A video of ``prompt``; ``options`` are ``CALL_SETTINGS`` (``image``: a path, a PIL image or
        an (H, W, 3) uint8 array for i2v; ``sr``: the super-resolution stage too). Every setting is
        checked before any model runs; a bad one raises ``InputError``. ``profile`` (folder, steps):
        that many more stage-2 steps after the warm-up, traced by the JAX profiler."""
        options.setdefault("warmup_steps", 0)  # warm-up steps only steady a benchmark's step times
        plan = self.plan(prompt, **options)
        tensors, config = self._encode(plan)
        del config[stage_sr.KEY]  # the setting; the SR stage's record takes the key, as in the stage folder
        latents, config["stage2"] = self._denoise(plan, tensors, profile)
        decoded = latents
        if plan.given.get("sr"):
            decoded, config["sr"] = self._super_resolve(plan, tensors, latents, config)
        frames, config["stage3"] = self._decode(plan, decoded, has_record(config, stage_sr.KEY))
        return Generation(frames, plan.decode.fps, decoded, latents, tensors, config)

    def _encode(self, plan: Plan) -> tuple[dict[str, torch.Tensor], dict]:
        started = time.perf_counter()
        encoders = self._encoders_for(plan.encode)
        if plan.encode.task == "i2v":
            encoders = dataclasses.replace(encoders, vae=self._decoder_for(plan.decode).vae)
        load_s = time.perf_counter() - started
        tensors, counts = se.encode(plan.encode, encoders, plan.image, self.note)
        encode_s = time.perf_counter() - started - load_s
        rec = se.record(plan.encode, encoders, counts, load_s, encode_s, time.perf_counter() - started)
        return tensors, {**plan.encode.handoff(), "stage1": rec}

    def _denoise(self, plan: Plan, tensors: dict[str, torch.Tensor], profile: tuple[str, int] | None
                 ) -> tuple[np.ndarray, dict]:
        started = time.perf_counter()
        dit = self._dit_for(plan.denoise, plan.config)
        s = dit.settled(plan.denoise)
        embeddings = handoff.checked_embeddings(tensors, "stage 1", task=s.task, model=plan.config,
                                                latent_hw=s.latent_shape[1:])
        conditions = build_conditions(embeddings, task=s.task, shape=s.latent_shape, cfg=s.sampling.cfg,
                                      model=plan.config)
        return self._run(dit, s, conditions, plan.given.get("magcache_calibrate"), "stage2", started, profile=profile)

    def _super_resolve(self, plan: Plan, tensors: dict[str, torch.Tensor], lr: np.ndarray, config: dict
                       ) -> tuple[np.ndarray, dict]:
        started = time.perf_counter()
        s, sr_config = self._sr_settings(plan.given, config, lr.shape[2:])
        dit, upsample = self._sr_for(s, sr_config)
        s = dit.settled(s)
        embeddings = handoff.checked_embeddings(tensors, "stage 1", task=s.task, model=sr_config,
                                                latent_hw=s.latent_shape[1:], sr=True)
        begin = time.perf_counter()
        lq = prepare_lq(lr, s.latent_shape, upsample, s.lq_noise_seed)
        upsample_s = time.perf_counter() - begin
        conditions = sr_conditions(embeddings, lq, task=s.task, cfg=s.sampling.cfg, model=sr_config)
        return self._run(dit, s, conditions, None, stage_sr.KEY, started, {"upsample_s": round(upsample_s, 3)})

    def _run(self, dit: DiT, s: DenoiseSettings, conditions: dict[str, np.ndarray], calibrate: str | None, key: str,
             started: float, extra: Mapping[str, Any] = {}, profile: tuple[str, int] | None = None
             ) -> tuple[np.ndarray, dict]:
        """A denoising stage on ``dit``: compile (once per signature), warm up, denoise, check, record.
        Whether ``dit`` can take the run was checked by the plan or by loading it."""
        cache = MagCacheCalibration() if calibrate else s.cache(dit.config)
        denoiser = dit.denoiser(conditions, s, cache)
        compile_s = denoiser.compile((1, LATENT_CHANNELS, *s.latent_shape))
        latents = initial_noise(s.seed, s.latent_shape)
        warmup_s = warm_up(denoiser, latents, s.warmup_steps, self.note, profile)
        ratios: list[float] = []
        on_step = (lambda step, x, state: ratios.append(float(state["ratio"]))) if calibrate else None
        result = denoise(denoiser, latents, on_step=on_step, progress=self.progress)
        check_finite(result.latents, key, "no video made")
        extra = dict(extra)
        if calibrate:
            write_calibration(s.calibration(dit.config, ratios), Path(calibrate))
            extra["magcache_calibrate"] = str(calibrate)
        rec = record(s, s.latent_shape, result, 0, compile_s, warmup_s, time.perf_counter() - started, self.devices,
                     extra)
        return result.latents, rec

    def _decode(self, plan: Plan, latents: np.ndarray, sr: bool) -> tuple[np.ndarray, dict]:
        started = time.perf_counter()
        decoder = self._decoder_for(plan.decode)
        load_s = time.perf_counter() - started
        frames = decoder.frames(latents, plan.decode.backend, plan.tiling)
        seconds = {"load_s": load_s, "decode_s": time.perf_counter() - started - load_s,
                   "total_s": time.perf_counter() - started}
        name = handoff.SR_LATENTS_NAME if sr else handoff.LATENTS_NAME
        return frames, sd.record(plan.decode, decoder, plan.tiling, frames, name, seconds)

