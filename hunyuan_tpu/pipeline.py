"""The denoising loop: one jitted step (CFG batch, DiT forward, guidance, Euler update).

The step is traced and compiled once per run: the step index is a traced argument that
picks sigma and sigma_next from a device array, so step 2 reuses step 1's executable.
Latents stay float32 on device between steps; the model sees them in its own dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch
from tqdm import tqdm

from . import scheduler
from .attention import Kernel, SparseKernel, block_sparse_xla, xla_attention
from .cache import FeatureCache, NoCache, State
from .config import DiTConfig
from .files import InputError
from .model import BlockRunner
from .parallel import Placement
from .params import meta_model
from .runtime import JaxParams, functional, tracing
from .scan import scanned_blocks, stack_blocks

LATENT_CHANNELS = 32
VAE_TEMPORAL, VAE_SPATIAL = 4, 16
# Bucket base size per resolution (official target_size_config): buckets hold about
# (base / 16)^2 latent pixels at aspect ratios up to 4:1. "96p" is not an official family but
# uses a base the official bucket code accepts (128); it is the tiny preset's, so that a
# weight-free run has a canvas of about 8 x 8 latent pixels at any aspect ratio (160x96 at 16:9);
# "144p" (base 192, about 12 x 12) is its super-resolution target, 1.5x like 480p -> 720p.
RESOLUTION_BASE = {"96p": 128, "144p": 192, "360p": 480, "480p": 640, "720p": 960, "1080p": 1440}
# Super-resolution: the LR latents are noised at this strength, and the model sees them until the
# timestep falls below 1000 times it (official ``noise_scale``).
LQ_NOISE_STRENGTH = 0.7
# The SigLIP tokens of an image (27 x 27); the official t2v pipeline passes as many zeros, masked.
T2V_VISION_TOKENS = 729
# Text slots are kept in multiples of this many (each text stream), so that a new prompt recompiles
# the step only when its length crosses a multiple: 8 shapes for the LLM's 1000 slots, 2 for
# ByT5's 256. At 480p x 121 frames the image stream is 49k tokens: up to 127 padded slots cost
# under 0.3% of them.
TEXT_BUCKET = 128
_MODEL_DTYPE_KEYS = frozenset({"prompt_embeds", "prompt_embeds_2", "vision_states", "cond_latents", "lr_latents"})


# ---- per-run settings ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    num_inference_steps: int = 50
    guidance_scale: float = 6.0
    flow_shift: float = 5.0

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance runs only when it changes the result (official: scale > 1)."""
        return self.guidance_scale > 1.0


# The official sampling defaults per released transformer (PIPELINE_CONFIGS of the reference):
# CFG-distilled checkpoints (and the sparse ones, which are distilled) sample without CFG.
SAMPLING_DEFAULTS: dict[str, SamplingSettings] = {
    "480p_t2v": SamplingSettings(50, 6.0, 5.0),
    "480p_i2v": SamplingSettings(50, 6.0, 5.0),
    "720p_t2v": SamplingSettings(50, 6.0, 9.0),
    "720p_i2v": SamplingSettings(50, 6.0, 7.0),
    "480p_t2v_distilled": SamplingSettings(50, 1.0, 5.0),
    "480p_i2v_distilled": SamplingSettings(50, 1.0, 5.0),
    "720p_t2v_distilled": SamplingSettings(50, 1.0, 9.0),
    "720p_i2v_distilled": SamplingSettings(50, 1.0, 7.0),
    "720p_t2v_distilled_sparse": SamplingSettings(50, 1.0, 9.0),
    "720p_i2v_distilled_sparse": SamplingSettings(50, 1.0, 7.0),
    "480p_i2v_step_distilled": SamplingSettings(12, 1.0, 7.0),
}


def released_variant(model: str) -> str | None:
    """The released transformer a ``--model`` value names: a preset name, or a checkpoint path
    with the variant's folder in it (``ckpts/transformer/720p_t2v_distilled``); else None."""
    if model in SAMPLING_DEFAULTS or not Path(model).exists():
        return model if model in SAMPLING_DEFAULTS else None
    return next((part for part in reversed(Path(model).absolute().parts) if part in SAMPLING_DEFAULTS), None)


def default_sampling(config: DiTConfig, variant: str | None = None) -> SamplingSettings:
    """The official defaults of the released ``variant`` (``released_variant``); for another
    model, those of the base checkpoint its configuration matches."""
    if variant in SAMPLING_DEFAULTS:
        return SAMPLING_DEFAULTS[variant]
    if config.use_meanflow:
        return SAMPLING_DEFAULTS["480p_i2v_step_distilled"]
    shift = {("720p", "t2v"): 9.0, ("720p", "i2v"): 7.0}.get((config.ideal_resolution, config.ideal_task), 5.0)
    guidance = 1.0 if config.sparse else 6.0  # every sparse checkpoint is CFG-distilled
    return SamplingSettings(guidance_scale=guidance, flow_shift=shift)


def buckets(resolution: str) -> list[tuple[int, int]]:
    """Every (height, width) bucket of a resolution family (the official generate_crop_size_list
    walk: about (base / 16)^2 patches of 16 pixels, aspect ratios up to 4:1)."""
    if resolution not in RESOLUTION_BASE:
        raise InputError(f"resolution {resolution!r} is not one of {', '.join(RESOLUTION_BASE)}")
    patches = round((RESOLUTION_BASE[resolution] / 16) ** 2)
    found, wp, hp = [], patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= 4.0:
            found.append((wp * 16, hp * 16))
        if (hp + 1) * wp <= patches:
            hp += 1
        else:
            wp -= 1
    return found


def bucket_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) of the official resolution bucket closest to ``aspect_ratio`` ("W:H")."""
    family = buckets(resolution)
    try:
        w, h = (int(v) for v in aspect_ratio.split(":"))
        assert w > 0 and h > 0
    except (ValueError, AssertionError):
        raise InputError(f"aspect_ratio {aspect_ratio!r} must be two positive integers W:H, e.g. 16:9") from None
    ratios = np.array([round(bh / bw, 5) for bh, bw in family])
    return family[int(np.abs(ratios - h / w).argmin())]


def latent_shape(video_length: int, height: int, width: int) -> tuple[int, int, int]:
    """Latent (T, H, W) for a video of ``video_length`` frames of ``height`` x ``width`` pixels."""
    if video_length < 1 or (video_length - 1) % VAE_TEMPORAL:
        raise InputError(f"{{video_length}} {video_length} must be of the form 4k+1 (e.g. 33, 49, 121)")
    for name, size in (("height", height), ("width", width)):
        if size < VAE_SPATIAL or size % VAE_SPATIAL:
            raise InputError(f"{{{name}}} {size} must be a positive multiple of {VAE_SPATIAL}")
    return (video_length - 1) // VAE_TEMPORAL + 1, height // VAE_SPATIAL, width // VAE_SPATIAL


def initial_noise(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Seeded (1, 32, T, H, W) float32 noise from torch's CPU generator: the same on every platform."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, LATENT_CHANNELS, *shape, generator=g, dtype=torch.float32).numpy()


# ---- conditions ------------------------------------------------------------------------------

def _trim(states: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop trailing slots that are padding in every sample (they never change the image), all
    but those that round the length up to a multiple of ``TEXT_BUCKET``: prompts of similar
    length then share one shape, hence one compiled step."""
    valid = np.flatnonzero(mask.any(axis=0))
    used = int(valid[-1]) + 1 if valid.size else 1
    keep = min(mask.shape[1], -(-used // TEXT_BUCKET) * TEXT_BUCKET)
    return states[:, :keep], mask[:, :keep]


def _pad_to(a: np.ndarray, length: int) -> np.ndarray:
    pad = [(0, 0)] * a.ndim
    pad[1] = (0, length - a.shape[1])
    return np.pad(a, pad)


def build_conditions(
    embeddings: dict[str, np.ndarray],
    *,
    task: str,
    shape: tuple[int, int, int],
    cfg: bool,
    model: DiTConfig | None = None,
) -> dict[str, np.ndarray]:
    """Host arrays for the step: text conditions batched [negative, positive] when ``cfg``,
    and the (1, 33, T, H, W) condition latents + mask channel (i2v: first frame).

    Trailing text slots that are padding in every sample are dropped: a dense model's image
    never depends on them. A sparse ``model`` (SSTA) attends the padded slots that share a block
    with valid text, so it gets the official slots: none dropped, and in t2v the official
    pipeline's masked vision tokens (zeros, ``vision_mask`` 0) that come right after the text.
    """
    sparse = model is not None and model.sparse is not None
    out: dict[str, np.ndarray] = {}
    for states_key, mask_key in (("prompt_embeds", "prompt_mask"), ("prompt_embeds_2", "prompt_mask_2")):
        pairs = [(embeddings[states_key], embeddings[mask_key])]
        if cfg:
            pairs.insert(0, (embeddings["negative_" + states_key], embeddings["negative_" + mask_key]))
        length = max(s.shape[1] for s, _ in pairs)  # negative and positive may be padded differently
        states = np.concatenate([_pad_to(s, length) for s, _ in pairs])
        mask = np.concatenate([_pad_to(m, length) for _, m in pairs]).astype(np.int32)
        out[states_key], out[mask_key] = (states, mask) if sparse else _trim(states, mask)
    batch = 2 if cfg else 1
    cond = np.zeros((1, LATENT_CHANNELS + 1, *shape), np.float32)
    if task == "i2v":
        out["vision_states"] = np.repeat(embeddings["vision_states"], batch, axis=0)
        cond[:, :LATENT_CHANNELS, 0] = embeddings["image_cond_latents"][:, :, 0]
        cond[:, LATENT_CHANNELS, 0] = 1.0
    elif sparse:
        out["vision_states"] = np.zeros((batch, T2V_VISION_TOKENS, model.vision_states_dim), np.float32)
        out["vision_mask"] = np.zeros((batch, T2V_VISION_TOKENS), np.int32)
    out["cond_latents"] = cond
    return out


# ---- the step --------------------------------------------------------------------------------

def make_step(apply: Callable, *, cfg: bool, meanflow: bool, dtype, cache: FeatureCache | None = None,
              cached: bool = False, depth: int = 0, patch: tuple[int, int, int] = (1, 1, 1)) -> Callable:
    """``step(params, conditions, latents, i)`` for one Euler step with CFG: the new latents.

    ``conditions`` holds the device arrays from ``build_conditions`` plus ``sigmas`` (N+1,)
    and ``guidance_scale`` (scalar); ``i`` is the traced step index. With a ``cache`` (of a
    model of ``depth`` blocks and ``patch`` size) the step is that cache's full step, or its
    cached step if ``cached``: ``step(params, conditions, latents, i, state) -> (latents, state)``.
    """

    def step(params, conditions, latents, i, state=None):
        sigma, sigma_next = conditions["sigmas"][i], conditions["sigmas"][i + 1]
        parts = [latents, conditions["cond_latents"]]
        if "lr_latents" in conditions:  # super-resolution: the LR condition, all zeros (mask too) once t < 700
            live = sigma * 1000 >= 1000 * LQ_NOISE_STRENGTH
            parts.append(conditions["lr_latents"] * live.astype(conditions["lr_latents"].dtype))
        x = jnp.concatenate(parts, axis=1).astype(dtype)
        batch = 2 if cfg else 1
        x = jnp.concatenate([x] * batch)
        t = jnp.full((batch,), sigma * 1000)
        # meanflow: the model also sees the next timestep (0 on the last step, as sigmas end at 0)
        t_r = jnp.full((batch,), sigma_next * 1000) if meanflow else None

        def forward(**cut):
            return apply(
                params, x, t,
                conditions["prompt_embeds"], conditions["prompt_mask"],
                conditions["prompt_embeds_2"], conditions["prompt_mask_2"],
                conditions.get("vision_states"), t_r, vision_mask=conditions.get("vision_mask"), **cut,
            )

        with jax.named_scope("dit"):
            if cache is None:
                v = forward()
            else:
                tokens = math.prod(n // p for n, p in zip(latents.shape[2:], patch))
                run = cache.cached if cached else cache.full
                v, state = run(forward, state, i, depth=depth, tokens=tokens)
        with jax.named_scope("scheduler"):
            v = v.astype(jnp.float32)
            if cfg:
                v_uncond, v_cond = v[:1], v[1:]
                v = v_uncond + conditions["guidance_scale"] * (v_cond - v_uncond)
            latents = scheduler.euler_step(latents, v, sigma, sigma_next)
        return latents if cache is None else (latents, state)

    return step


def device_conditions(conditions: dict[str, np.ndarray], settings: SamplingSettings, dtype) -> dict[str, np.ndarray]:
    """``build_conditions`` output in the step's dtypes, plus the run's sigmas and guidance scale."""
    host = {k: v.astype(dtype) if k in _MODEL_DTYPE_KEYS else v for k, v in conditions.items()}
    host["sigmas"] = scheduler.sigmas(settings.num_inference_steps, settings.flow_shift)
    host["guidance_scale"] = np.float32(settings.guidance_scale)
    return host


def step_function(
    config: DiTConfig,
    settings: SamplingSettings,
    dtype,
    *,
    placement: Placement = Placement(),
    cache: FeatureCache | None = None,
    cached: bool = False,
    run_blocks: BlockRunner = scanned_blocks,
) -> Callable:
    """The jitted step for ``config``, laid out by ``placement``.

    Latents go in and come out replicated, so every step has the same signature and reuses
    one executable; the latents buffer is donated. With a ``cache`` it is that cache's full
    step (``cached`` False) or cached step, which also take and return the cache's state, laid
    out as the cache says (the image and text streams' layouts between blocks); the state
    going in is donated too.
    ``run_blocks``: the double blocks as one loop, weights stacked by layer (``scan``) or, at a
    copy per step, per layer; ``model.loop_blocks`` unrolls them (per-layer weights only).
    """
    # named scopes make the profiler trace read embed / blocks / double_blocks_<first>_to_<last> / final_layer
    execution = dataclasses.replace(placement.execution, scope=jax.named_scope, run_blocks=run_blocks)
    model = meta_model(config, execution)
    step = make_step(functional(model), cfg=settings.cfg, meanflow=config.use_meanflow, dtype=dtype, cache=cache,
                     cached=cached, depth=config.mm_double_blocks_depth, patch=config.patch_size)
    if cache is None:
        # keep_unused: every parameter stays an argument (e.g. vision_in in t2v), so the compiled
        # argument memory is exactly what the sharding tables imply
        return jax.jit(step, donate_argnums=2, out_shardings=placement.replicated, keep_unused=True)
    state = {name: state_sharding(placement, kind) for name, kind in cache.layout.items()}
    return jax.jit(step, donate_argnums=(2, 4), out_shardings=(placement.replicated, state), keep_unused=True)


def state_sharding(placement: Placement, kind: str | None):
    """Where a cache's state entry lives: like the activation ``kind`` names, or replicated (None)."""
    return placement.replicated if kind is None else placement.activation(kind)


def abstract_state(cache: FeatureCache, state: Mapping[str, Any], placement: Placement
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """``state`` (arrays, or the full step's output info) as the abstract step argument it is
    compiled for: each entry's shape and dtype, laid out as the cache says."""
    return {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=state_sharding(placement, cache.layout[k]))
            for k, v in state.items()}


def image_stream(config: DiTConfig, settings: SamplingSettings, placement: Placement,
                 latent_shape: tuple[int, int, int], dtype) -> jax.ShapeDtypeStruct:
    """The image stream between blocks: (batch, tokens padded for the layout, hidden)."""
    tokens = math.prod(n // p for n, p in zip(latent_shape, config.patch_size))
    padded = tokens + -tokens % placement.execution.token_multiple
    return jax.ShapeDtypeStruct((2 if settings.cfg else 1, padded, config.hidden_size), dtype)


class Denoiser:
    """One run's parameters and conditions on device, with its step function(s) compiled once.

    ``params`` (from ``hunyuan_tpu.params``, placed by ``placement.params``) fix the model
    dtype; the step's activations follow the placement's layouts.
    A ``cache`` (``hunyuan_tpu.cache``) with cached steps brings a second executable, its cached
    step; ``step`` picks by the step index, and the cache's state stays on device between steps.
    Per-layer weights are stacked by layer here, once (a copy: a caller done with its
    per-layer arrays passes ``scan.stack_blocks(params, donate=True)`` to keep one copy).
    ``compiled_steps``: the executables of earlier runs on the same weights and placement
    (``stage_denoise.DiT`` keeps one per loaded model), so that a run of a known signature
    compiles nothing.
    """

    def __init__(
        self,
        config: DiTConfig,
        params: JaxParams,
        conditions: dict[str, np.ndarray],
        settings: SamplingSettings,
        *,
        placement: Placement = Placement(),
        attention: Kernel = xla_attention,
        sparse_attention: SparseKernel = block_sparse_xla,
        cache: FeatureCache = NoCache(),
        compiled_steps: dict | None = None,
    ):
        self.config, self.settings, self.placement, self.cache = config, settings, placement, cache
        self.attention, self.sparse_attention = attention, sparse_attention
        self.params = stack_blocks(params)
        self.dtype = params["img_in.proj.weight"].dtype  # the model computes in its weights' dtype
        self.latents_sharding = placement.replicated
        self.conditions = jax.device_put(device_conditions(conditions, settings, self.dtype), self.latents_sharding)
        cache.check(settings.num_inference_steps, config.mm_double_blocks_depth)
        # the executables of every run that shares it (same config, placement and weights), by signature
        self.compiled_steps = {} if compiled_steps is None else compiled_steps
        self.compiled = self.compiled_cached = None

    def use_params(self, params: JaxParams) -> None:
        """Denoise with other weights of the same dtypes and placement (a trainer's validation
        after each round of updates); the compiled step(s) are reused."""
        self.params = stack_blocks(params)

    @property
    def num_steps(self) -> int:
        return self.settings.num_inference_steps

    def is_full(self, i: int) -> bool:
        """Whether step ``i`` runs every block."""
        return self.cache.is_full(i)

    def _initial(self, latents_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        return self.cache.initial(image_stream(self.config, self.settings, self.placement, latents_shape[2:],
                                               self.dtype))

    def carried(self, state: State) -> State:
        """The part of ``state`` a full step takes: what outlives it (the rest it replaces)."""
        return {k: state[k] for k in self.cache.carried}

    def initial_state(self, latents_shape: tuple[int, ...], saved: dict[str, np.ndarray] | None = None) -> State:
        """The cache's carried state on device: as before the first step, or ``saved`` (a checkpoint's)."""
        host = self._initial(latents_shape) if saved is None else saved
        expected = self.cache.carried
        if set(host) != set(expected):
            raise InputError(f"the checkpoint's cache state holds {sorted(host)}, {self.cache.name} needs "
                             f"{sorted(expected)}")
        return {k: jax.device_put(v, state_sharding(self.placement, expected[k])) for k, v in host.items()}

    def signature(self, latents_shape: tuple[int, ...]) -> tuple:
        """What the compiled step(s) depend on beyond the shared config, placement and weights:
        two runs of one signature run the same executables, whatever the prompt, seed or shift."""
        conditions = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in self.conditions.items()))
        return (tuple(latents_shape), conditions, self.settings.cfg, self.cache, self.attention,
                self.sparse_attention)

    def compile(self, latents_shape: tuple[int, ...]) -> float:
        """Trace and compile the step(s) ahead of time, unless a run of the same signature did;
        returns the seconds it took."""
        start = time.perf_counter()
        key = self.signature(latents_shape)
        if key not in self.compiled_steps:
            self.compiled_steps[key] = self._compile(latents_shape)
        self.compiled, self.compiled_cached = self.compiled_steps[key]
        return time.perf_counter() - start

    def _compile(self, latents_shape: tuple[int, ...]) -> tuple[Callable, Callable | None]:
        jitted = functools.partial(step_function, self.config, self.settings, self.dtype, placement=self.placement,
                                   cache=self.cache)
        latents = jax.ShapeDtypeStruct(latents_shape, jnp.float32, sharding=self.latents_sharding)
        carried = abstract_state(self.cache, self._initial(latents_shape), self.placement)
        with tracing(self.placement.mesh, self.attention, self.sparse_attention):
            lowered = jitted().lower(self.params, self.conditions, latents, 0, carried)
            compiled, compiled_cached = lowered.compile(), None
            if not all(map(self.cache.is_full, range(self.num_steps))):
                # the cached step takes the state as the full step leaves it
                state = abstract_state(self.cache, lowered.out_info[1], self.placement)
                compiled_cached = jitted(cached=True).lower(self.params, self.conditions, latents, 0, state).compile()
        return compiled, compiled_cached

    def place(self, latents: np.ndarray) -> jax.Array:
        return jax.device_put(np.asarray(latents, np.float32), self.latents_sharding)

    def step(self, latents: jax.Array, i: int, state: State) -> tuple[jax.Array, State]:
        """Step ``i``: the new latents and the cache's state. A full step takes the carried state
        (``initial_state``, or what the last step left: ``carried`` picks it); a cached step
        takes the whole state of the steps before it."""
        if self.compiled is None:
            self.compile(latents.shape)
        if self.cache.is_full(i):
            return self.compiled(self.params, self.conditions, latents, i, self.carried(state))
        if set(state) != set(self.cache.layout):
            raise ValueError(f"step {i} is a cached step, but no full step ran before it")
        return self.compiled_cached(self.params, self.conditions, latents, i, state)


@dataclasses.dataclass
class LoopResult:
    latents: np.ndarray
    step_seconds: list[float]
    full: list[bool]  # per step run: whether it ran every block (False: a cached step)


def denoise(
    denoiser: Denoiser,
    latents: np.ndarray,
    start_step: int = 0,
    *,
    state: dict[str, np.ndarray] | None = None,
    on_step: Callable[[int, jax.Array, State], None] | None = None,
    progress: bool = True,
) -> LoopResult:
    """Run steps ``start_step .. N-1`` from host ``latents``; ``on_step(i + 1, latents, state)`` after each.

    Each step is waited for, so that the per-step times are real; nothing else leaves the
    device unless ``on_step`` asks for it. ``start_step`` must be a full step; ``state`` is the
    cache's carried state there (a checkpoint's; default: as before step 0).
    """
    if start_step < denoiser.num_steps and not denoiser.is_full(start_step):
        raise ValueError(f"step {start_step} is a cached step: a run can start only at a full step")
    x = denoiser.place(latents)
    carried = denoiser.initial_state(x.shape, state)
    times, full = [], []
    for i in tqdm(range(start_step, denoiser.num_steps), desc="denoise", unit="step", disable=not progress,
                  initial=start_step, total=denoiser.num_steps):
        if denoiser.is_full(i):
            carried = denoiser.carried(carried)  # frees what the full step replaces before it allocates anew
        begin = time.perf_counter()
        x, carried = denoiser.step(x, i, carried)
        x.block_until_ready()
        times.append(time.perf_counter() - begin)
        full.append(denoiser.is_full(i))
        if on_step is not None:
            on_step(i + 1, x, carried)
    return LoopResult(np.array(x), times, full)  # a writable host copy
