"""The flow-matching training objective as the official trainer has it, as pure JAX functions.

With x0 the clean latents, x1 Gaussian noise and t in (0, 1): ``x_t = (1 - t) x0 + t x1``; the
model sees [x_t, condition latents, mask] at timestep ``1000 t`` and regresses the velocity
``x1 - x0``, a plain mean squared error over every element. t is drawn log-normally,
``sigmoid(N(0, 1))`` (or uniformly), squeezed into [1e-5, 1 - 1e-5], then shifted towards
noise with ``s t / (1 + (s - 1) t)`` (train shift 3). An i2v sample's condition is the first
latent frame of its own clean latents (the causal VAE encodes frame 0 alone, so this equals
the encoded first image) with the mask channel 1 there, as at sampling time.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .files import InputError
from .handoff import TEXT_KEYS

T_EPS = 1e-5
SAMPLINGS = ("lognorm", "uniform")


@dataclasses.dataclass(frozen=True)
class Objective:
    """The objective's settings; the defaults are the official trainer's."""

    shift: float = 3.0
    sampling: str = "lognorm"
    i2v_prob: float = 0.3
    text_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise InputError(f"{{timestep_sampling}} {self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if self.shift <= 0:
            raise InputError(f"{{train_shift}} {self.shift} must be > 0")
        for name, p in (("i2v_prob", self.i2v_prob), ("text_dropout", self.text_dropout)):
            if not 0.0 <= p <= 1.0:
                raise InputError(f"{{{name}}} {p} must be between 0 and 1")


class Draw(NamedTuple):
    """The random choices of one step, per sample: what the loss is a function of."""

    t: jax.Array  # (B,) shifted, in (0, 1)
    noise: jax.Array  # (B, 32, T, H, W)
    i2v: jax.Array  # (B,) bool
    drop_text: jax.Array  # (B,) bool


def sample_timesteps(key: jax.Array, batch: int, sampling: str) -> jax.Array:
    """(B,) float32 t in [1e-5, 1 - 1e-5]: sigmoid of a standard normal, or uniform."""
    if sampling == "lognorm":
        u = jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32))
    else:
        u = jax.random.uniform(key, (batch,), jnp.float32)
    return u * (1 - 2 * T_EPS) + T_EPS


def shift_timesteps(t: jax.Array, shift: float) -> jax.Array:
    """``s t / (1 + (s - 1) t)``: the same shift as the sampling schedule's."""
    return shift * t / (1 + (shift - 1) * t)


def draw(key: jax.Array, objective: Objective, latents_shape: tuple[int, ...], *, i2v_capable: bool) -> Draw:
    """Timesteps, noise, and which samples are i2v (only when the data has vision states) or
    lose their text, for a batch of latents of ``latents_shape``."""
    k_t, k_noise, k_task, k_drop = jax.random.split(key, 4)
    batch = latents_shape[0]
    t = shift_timesteps(sample_timesteps(k_t, batch, objective.sampling), objective.shift)
    i2v = jax.random.uniform(k_task, (batch,)) < objective.i2v_prob
    return Draw(
        t=t,
        noise=jax.random.normal(k_noise, latents_shape, jnp.float32),
        i2v=i2v if i2v_capable else jnp.zeros((batch,), bool),
        drop_text=jax.random.uniform(k_drop, (batch,)) < objective.text_dropout,
    )


def condition_latents(latents: jax.Array, i2v: jax.Array) -> jax.Array:
    """(B, 33, T, H, W): i2v samples carry their first clean latent frame and a mask of 1 on
    frame 0; t2v samples are all zero."""
    b, _, frames, h, w = latents.shape
    first = jnp.where(i2v[:, None, None, None], latents[:, :, 0], 0.0)
    mask = jnp.broadcast_to(i2v[:, None, None, None].astype(latents.dtype), (b, 1, h, w))
    frame0 = jnp.concatenate([first, mask], axis=1)[:, :, None]
    return jnp.concatenate([frame0, jnp.zeros((b, frame0.shape[1], frames - 1, h, w), latents.dtype)], axis=2)


def model_inputs(batch: dict[str, jax.Array], d: Draw, empty_prompt: dict[str, jax.Array] | None, dtype) -> dict:
    """Keyword arguments of the DiT forward for one training batch (see ``HunyuanVideo15DiT.forward``).

    ``batch`` holds ``latents`` and the text tensors (plus ``vision_states`` for i2v-capable
    data); ``empty_prompt`` the stage-1 encoding of "" (1, S, ...), which replaces the text of
    samples in ``d.drop_text``.
    """
    x0 = batch["latents"].astype(jnp.float32)
    t = d.t[:, None, None, None, None]
    x_t = (1 - t) * x0 + t * d.noise
    text = {k: batch[k] for k in TEXT_KEYS}
    if empty_prompt is not None:
        def pick(k):
            where = d.drop_text.reshape((-1,) + (1,) * (text[k].ndim - 1))
            return jnp.where(where, empty_prompt[k].astype(text[k].dtype), text[k])
        text = {k: pick(k) for k in TEXT_KEYS}
    inputs = {
        "x": jnp.concatenate([x_t, condition_latents(x0, d.i2v)], axis=1).astype(dtype),
        "t": d.t * 1000,
        "text_states": text["prompt_embeds"].astype(dtype),
        "text_mask": text["prompt_mask"],
        "byt5_states": text["prompt_embeds_2"].astype(dtype),
        "byt5_mask": text["prompt_mask_2"],
    }
    if "vision_states" in batch:
        inputs["vision_states"] = batch["vision_states"].astype(dtype)
        inputs["vision_mask"] = jnp.broadcast_to(d.i2v[:, None], batch["vision_states"].shape[:2])
    return inputs


def velocity_loss(prediction: jax.Array, latents: jax.Array, d: Draw) -> jax.Array:
    """Mean squared error against the velocity ``noise - latents``, in float32."""
    target = d.noise - latents.astype(jnp.float32)
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target))
