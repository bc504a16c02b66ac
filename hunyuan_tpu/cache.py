"""The feature caches: which steps run the whole DiT, and what the other steps reuse.

A cache splits the steps into full steps, which run every block, and cached steps, which run
at most a few blocks and the final layer (with their own timestep embedding) from what the
last full step left on device. Every schedule here is fixed before the run starts (MagCache's
comes from a calibration file), so a run compiles exactly two step functions, full and cached,
and no step reads a value back to decide anything.

- ``DeepCache`` (AngelSlim ``DeepCacheHelper``): a full step saves the streams entering the
  first kept block; a cached step runs the kept blocks from them.
- ``TeaCache`` (AngelSlim ``TeaCacheHelper``): a full step saves the image stream entering
  the first block and the residual the blocks add to it; a cached step feeds their sum to the
  final layer. The official helper has no threshold: it follows the same fixed schedule.
- ``TaylorCache`` (AngelSlim ``TaylorCacheHelper``): full steps keep finite-difference
  derivatives of the last block's image output, split into low and high frequencies along the
  tokens; a cached step extrapolates them (a Taylor series in steps since the last full step).
- ``MagCache`` (Ma et al. 2025): a cached step adds the last full step's residual to this step's
  embedded image stream; which steps are cached follows from the checkpoint's calibrated
  per-step residual magnitude ratios (``MagCacheCalibration``, ``read_calibration``).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sharding import IMG, TXT

from .files import InputError, read_json, write_json

# forward(save=(k, ...), start=k, streams=(img, txt), residual=img) -> velocity, or with ``save``
# (velocity, [(img, txt) entering each saved block]): the DiT's forward for this step, cut
# between blocks (``HunyuanVideo15DiT.forward``; block ``depth`` is the final layer).
Forward = Callable[..., Any]
State = dict[str, jax.Array]
# how a state entry is laid out between steps: like the named activation (the image or text stream
# between blocks, ``sharding.IMG`` / ``TXT``), or on every device
REPLICATED = None


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The official fixed schedule: full steps ``[0, start) + range(start, end, interval) +
    [end, total)``; the defaults give 25 full steps of 50."""

    start: int = 11
    end: int = 45
    interval: int = 4

    def check(self, total_steps: int) -> None:
        """Raise an InputError naming the setting that makes this schedule invalid for the run."""
        if self.start < 0:
            raise InputError(f"{{cache_start_step}} {self.start} must be >= 0")
        if self.interval < 1:
            raise InputError(f"{{cache_step_interval}} {self.interval} must be >= 1")
        if self.start > self.end:
            raise InputError(f"{{cache_start_step}} {self.start} is after {{cache_end_step}} {self.end}")
        if self.end > total_steps:
            raise InputError(f"{{cache_end_step}} {self.end} is past the last step "
                             f"({{num_inference_steps}} {total_steps})")

    def is_full(self, step: int) -> bool:
        return step < self.start or step >= self.end or (step - self.start) % self.interval == 0


class FeatureCache(abc.ABC):
    """One cache: its schedule, and its full and cached step around the model's forward.

    ``full(forward, carried, i)`` and ``cached(forward, state, i)`` run inside the jitted step
    and return ``(velocity, state)``; ``state`` holds device arrays only, laid out as ``layout``
    says. A full step takes only the ``carried`` entries (those that outlive a full step, which
    a resumable checkpoint saves); a cached step takes and returns the whole state unchanged in
    shape, so each kind of step is one executable.
    """

    name: ClassVar[str]
    layout: ClassVar[Mapping[str, str | None]]  # every state entry: IMG, TXT or REPLICATED
    carried: ClassVar[Mapping[str, str | None]] = {}

    def check(self, total_steps: int, depth: int) -> None:
        """Raise an InputError naming the setting that does not fit a run of ``total_steps``."""

    @abc.abstractmethod
    def is_full(self, step: int) -> bool: ...

    @abc.abstractmethod
    def full(self, forward: Forward, carried: State, i: jax.Array, *, depth: int, tokens: int
             ) -> tuple[jax.Array, State]: ...

    @abc.abstractmethod
    def cached(self, forward: Forward, state: State, i: jax.Array, *, depth: int, tokens: int
               ) -> tuple[jax.Array, State]: ...

    def initial(self, img: jax.ShapeDtypeStruct) -> dict[str, np.ndarray]:
        """The carried state before the first step (``img``: the image stream's shape and dtype)."""
        return {}

    def full_steps(self, total_steps: int) -> list[int]:
        return [i for i in range(total_steps) if self.is_full(i)]


@dataclasses.dataclass(frozen=True)
class NoCache(FeatureCache):
    """Every step runs every block."""

    name: ClassVar[str] = "none"
    layout: ClassVar[Mapping[str, str | None]] = {}

    def is_full(self, step: int) -> bool:
        return True

    def full(self, forward, carried, i, *, depth, tokens):
        return forward(), {}

    def cached(self, forward, state, i, *, depth, tokens):
        raise AssertionError("without a cache every step is full")


@dataclasses.dataclass(frozen=True)
class ScheduledCache(FeatureCache, abc.ABC):
    """A cache on the official fixed schedule (``--cache_start_step`` and the rest)."""

    schedule: Schedule = Schedule()

    def check(self, total_steps: int, depth: int) -> None:
        self.schedule.check(total_steps)

    def is_full(self, step: int) -> bool:
        return self.schedule.is_full(step)


@dataclasses.dataclass(frozen=True)
class DeepCache(ScheduledCache):
    """The official default (``no_cache_block_id`` 53): only the last ``keep_blocks`` run on a cached step."""

    keep_blocks: int = 1
    name: ClassVar[str] = "deepcache"
    layout: ClassVar[Mapping[str, str | None]] = {"img": IMG, "txt": TXT}

    def check(self, total_steps: int, depth: int) -> None:
        super().check(total_steps, depth)
        if not 1 <= self.keep_blocks <= depth:
            raise InputError(f"{{cache_keep_blocks}} {self.keep_blocks} must be between 1 and the model's "
                             f"{depth} blocks")

    def full(self, forward, carried, i, *, depth, tokens):
        velocity, [(img, txt)] = forward(save=(depth - self.keep_blocks,))
        return velocity, {"img": img, "txt": txt}

    def cached(self, forward, state, i, *, depth, tokens):
        return forward(start=depth - self.keep_blocks, streams=(state["img"], state["txt"])), state


@dataclasses.dataclass(frozen=True)
class TeaCache(ScheduledCache):
    """AngelSlim's TeaCache: the image stream entering the first block and the residual the
    blocks add, both from the last full step; a cached step runs only the final layer on their sum."""

    name: ClassVar[str] = "teacache"
    layout: ClassVar[Mapping[str, str | None]] = {"input": IMG, "residual": IMG, "txt": TXT}

    def full(self, forward, carried, i, *, depth, tokens):
        velocity, [(entering, _), (leaving, txt)] = forward(save=(0, depth))
        return velocity, {"input": entering, "residual": leaving - entering, "txt": txt}

    def cached(self, forward, state, i, *, depth, tokens):
        return forward(start=depth, streams=(state["input"] + state["residual"], state["txt"])), state


def split_frequencies(x: jax.Array, tokens: int, cutoff_ratio: float) -> tuple[jax.Array, jax.Array]:
    """``x`` (B, L, C) as low + high frequencies along its first ``tokens`` tokens (the rest, padding,
    is zero in both), computed in float32 and returned in ``x``'s dtype (AngelSlim ``decomposition_FFT``:
    the low band is every frequency within ``cutoff_ratio`` of the highest)."""
    valid = x[:, :tokens].astype(jnp.float32)
    freqs = np.abs(np.fft.rfftfreq(tokens))
    low_band = freqs <= cutoff_ratio * np.abs(np.fft.fftfreq(tokens)).max()
    # the band is symmetric in frequency, so the real transform gives the complex one's real part
    low = jnp.fft.irfft(jnp.fft.rfft(valid, axis=1) * low_band[None, :, None], n=tokens, axis=1)
    pad = ((0, 0), (0, x.shape[1] - tokens), (0, 0))
    return jnp.pad(low, pad).astype(x.dtype), jnp.pad(valid - low, pad).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class TaylorCache(ScheduledCache):
    """AngelSlim's TaylorCache (official defaults: order 2 for both bands, cutoff 0.1).

    Each full step after the first splits the last block's image output into frequency bands and
    updates each band's derivatives by finite differences over the steps since the last full
    step: ``d0 = x``, ``d(k+1) = (new dk - old dk) / distance`` where an old ``dk`` exists. A cached
    step ``n`` steps after a full one feeds ``sum_k dk n^k / k!`` (both bands) to the final layer.
    The derivatives outlive full steps: they are the carried state a checkpoint saves.
    """

    max_order: int = 2
    low_freqs_order: int = 2
    high_freqs_order: int = 2
    cutoff_ratio: float = 0.1
    name: ClassVar[str] = "taylorcache"

    @property
    def orders(self) -> dict[str, int]:
        """Each band's highest derivative (AngelSlim keeps none above ``max_order``)."""
        return {"low": min(self.low_freqs_order, self.max_order), "high": min(self.high_freqs_order, self.max_order)}

    @property
    def carried(self) -> dict[str, str | None]:  # type: ignore[override]
        derivatives = {f"{band}{k}": IMG for band, order in self.orders.items() for k in range(order + 1)}
        # updates: full steps whose derivatives were computed; last_full: the last full step (-1: none yet)
        return {**derivatives, "updates": REPLICATED, "last_full": REPLICATED}

    @property
    def layout(self) -> dict[str, str | None]:  # type: ignore[override]
        return {**self.carried, "txt": TXT}

    def check(self, total_steps: int, depth: int) -> None:
        super().check(total_steps, depth)
        for name in ("max_order", "low_freqs_order", "high_freqs_order"):
            if getattr(self, name) < 0:
                raise InputError(f"{{taylor_{name}}} {getattr(self, name)} must be >= 0")
        if not 0 <= self.cutoff_ratio <= 1:
            raise InputError(f"{{taylor_cutoff_ratio}} {self.cutoff_ratio} must be between 0 and 1")
        cached = [i for i in range(total_steps) if not self.is_full(i)]
        if cached and len([i for i in range(cached[0]) if self.is_full(i)]) < 2:
            raise InputError(f"{{cache_start_step}} {self.schedule.start}: TaylorCache needs two full steps before "
                             f"the first cached step (step {cached[0]}) to have a derivative")

    def initial(self, img: jax.ShapeDtypeStruct) -> dict[str, np.ndarray]:
        zeros = {name: np.zeros(img.shape, img.dtype) for name, kind in self.carried.items() if kind == IMG}
        return {**zeros, "updates": np.int32(0), "last_full": np.int32(-1)}

    def full(self, forward, carried, i, *, depth, tokens):
        velocity, [(img, txt)] = forward(save=(depth,))
        started = carried["last_full"] >= 0  # the first full step only records when it ran (AngelSlim)
        distance = (i - carried["last_full"]).astype(img.dtype)
        state = {"updates": carried["updates"] + started.astype(jnp.int32), "last_full": jnp.asarray(i, jnp.int32),
                 "txt": txt}
        for band, new in zip(("low", "high"), split_frequencies(img, tokens, self.cutoff_ratio)):
            state[f"{band}0"] = jnp.where(started, new, carried[f"{band}0"])
            for k in range(self.orders[band]):
                old = carried[f"{band}{k}"]
                has_old = started & (carried["updates"] > k)  # dk existed before this step
                new = jnp.where(has_old, (new - old) / distance, carried[f"{band}{k + 1}"])
                state[f"{band}{k + 1}"] = new
        return velocity, state

    def cached(self, forward, state, i, *, depth, tokens):
        distance = i - state["last_full"]
        img = 0
        for band, order in self.orders.items():
            for k in range(order + 1):
                weight = (distance.astype(jnp.float32) ** k / math.factorial(k)) * (state["updates"] > k)
                img = img + state[f"{band}{k}"] * weight.astype(state[f"{band}{k}"].dtype)
        return forward(start=depth, streams=(img, state["txt"])), state


# ---- MagCache ------------------------------------------------------------------------------------

CALIBRATION_FORMAT = "hunyuan-tpu magcache calibration"
CALIBRATION_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Per-step magnitude ratios of one checkpoint's residual (the blocks' output minus their
    input, image stream): ``ratios[i]`` is the mean over tokens of ``|r_i| / |r_(i-1)|`` (1 at step 0).
    They hold for the run they were measured on: its model, LoRA, steps, shift and guidance."""

    ratios: tuple[float, ...]
    model: str  # the checkpoint folder's name (the released variant) or the preset
    lora: str | None  # the adapter's file name
    config_digest: str
    flow_shift: float
    guidance_scale: float

    def to_json(self) -> dict[str, Any]:
        return {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "model": self.model, "lora": self.lora,
                "config_digest": self.config_digest, "num_inference_steps": len(self.ratios),
                "flow_shift": self.flow_shift, "guidance_scale": self.guidance_scale, "ratios": list(self.ratios)}

    def check_run(self, run: Calibration, path: Path) -> None:
        """Refuse a run other than the calibrated one (``run``: its calibration's fields, no ratios)."""
        for key in ("model", "lora", "config_digest", "flow_shift", "guidance_scale"):
            if getattr(self, key) != getattr(run, key):
                raise InputError(f"{path}: calibrated with {key}={getattr(self, key)!r}, the run has "
                                 f"{getattr(run, key)!r}: calibrate this run with {{magcache_calibrate}}")


def write_calibration(calibration: Calibration, path: Path) -> None:
    """Write ``path`` whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, calibration.to_json())


def read_calibration(path: Path) -> Calibration:
    """A calibration file, checked: format, version, and every ratio finite and positive."""
    if not Path(path).is_file():
        raise InputError(f"{path}: no such MagCache calibration file (write one with {{magcache_calibrate}})")
    data = read_json(path)
    if data.get("format") != CALIBRATION_FORMAT:
        raise InputError(f"{path}: not a MagCache calibration file (format is not {CALIBRATION_FORMAT!r})")
    if data.get("version") != CALIBRATION_VERSION:
        raise InputError(f"{path}: calibration version {data.get('version')!r}; this release reads version "
                         f"{CALIBRATION_VERSION}: calibrate again with {{magcache_calibrate}}")
    try:
        ratios = tuple(float(r) for r in data["ratios"])
        lora = None if data["lora"] is None else str(data["lora"])
        calibration = Calibration(ratios, str(data["model"]), lora, str(data["config_digest"]),
                                  float(data["flow_shift"]), float(data["guidance_scale"]))
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: calibration entry missing or malformed ({e})") from None
    if not ratios or not all(math.isfinite(r) and r > 0 for r in ratios):
        raise InputError(f"{path}: ratios must be finite and > 0, one per step")
    return calibration


def magcache_schedule(ratios: tuple[float, ...], threshold: float, max_skips: int, retention_ratio: float
                      ) -> tuple[bool, ...]:
    """Which steps run in full (True), decided before the run from the calibrated ratios.

    The first ``retention_ratio`` of the steps run in full (the first step always: there is no
    residual to reuse yet). After that, each step multiplies
    the ratio accumulated since the last full step by its own and adds ``|1 - accumulated|`` to
    the error; while the error stays under ``threshold`` and at most ``max_skips`` steps were
    skipped in a row, the step reuses the residual, else it runs in full and resets the three.
    """
    full, ratio, error, skipped = [], 1.0, 0.0, 0
    for i, r in enumerate(ratios):
        if i < max(1, int(len(ratios) * retention_ratio)):
            full.append(True)
            continue
        ratio *= r
        skipped += 1
        error += abs(1 - ratio)
        if error < threshold and skipped <= max_skips:
            full.append(False)
        else:
            full.append(True)
            ratio, error, skipped = 1.0, 0.0, 0
    return tuple(full)


@dataclasses.dataclass(frozen=True)
class MagCache(FeatureCache):
    """MagCache with a calibrated, deterministic schedule (defaults: ComfyUI-MagCache's node:
    threshold 0.24, at most 4 skips in a row, the first 20% of steps in full). A threshold of 0
    caches no step."""

    calibration: Calibration
    threshold: float = 0.24
    max_skips: int = 4
    retention_ratio: float = 0.2
    name: ClassVar[str] = "magcache"
    layout: ClassVar[Mapping[str, str | None]] = {"residual": IMG}

    @functools.cached_property
    def full_schedule(self) -> tuple[bool, ...]:
        return magcache_schedule(self.calibration.ratios, self.threshold, self.max_skips, self.retention_ratio)

    def check(self, total_steps: int, depth: int) -> None:
        if self.threshold < 0 or not math.isfinite(self.threshold):
            raise InputError(f"{{magcache_threshold}} {self.threshold} must be a finite number >= 0")
        if self.max_skips < 0:
            raise InputError(f"{{magcache_max_skips}} {self.max_skips} must be >= 0")
        if not 0 <= self.retention_ratio <= 1:
            raise InputError(f"{{magcache_retention_ratio}} {self.retention_ratio} must be between 0 and 1")
        if len(self.calibration.ratios) != total_steps:
            raise InputError(f"{{magcache_calibration}} holds {len(self.calibration.ratios)} steps, the run has "
                             f"{{num_inference_steps}} {total_steps}: calibrate at the run's step count")

    def is_full(self, step: int) -> bool:
        return self.full_schedule[step]

    def full(self, forward, carried, i, *, depth, tokens):
        velocity, [(entering, _), (leaving, _)] = forward(save=(0, depth))
        return velocity, {"residual": leaving - entering}

    def cached(self, forward, state, i, *, depth, tokens):
        return forward(start=depth, residual=state["residual"]), state


@dataclasses.dataclass(frozen=True)
class MagCacheCalibration(FeatureCache):
    """The calibration run: every step in full, each leaving its residual's magnitude ratio to the
    previous step's (``ratio``, a scalar the caller reads after the run) and its per-token norms."""

    name: ClassVar[str] = "magcache_calibration"
    carried: ClassVar[Mapping[str, str | None]] = {"norms": REPLICATED}
    layout: ClassVar[Mapping[str, str | None]] = {**carried, "ratio": REPLICATED}

    def is_full(self, step: int) -> bool:
        return True

    def initial(self, img: jax.ShapeDtypeStruct) -> dict[str, np.ndarray]:
        return {"norms": np.zeros(img.shape[:2], np.float32)}

    def full(self, forward, carried, i, *, depth, tokens):
        velocity, [(entering, _), (leaving, _)] = forward(save=(0, depth))
        residual = (leaving - entering)[:, :tokens].astype(jnp.float32)
        norms = jnp.pad(jnp.linalg.norm(residual, axis=-1), ((0, 0), (0, carried["norms"].shape[1] - tokens)))
        ratio = jnp.mean(norms[:, :tokens] / carried["norms"][:, :tokens])
        return velocity, {"norms": norms, "ratio": jnp.where(i == 0, 1.0, ratio).astype(jnp.float32)}

    def cached(self, forward, state, i, *, depth, tokens):
        raise AssertionError("the calibration run caches no step")
