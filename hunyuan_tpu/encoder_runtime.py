"""Stage 1's encoders on the accelerator: a transformers encoder as one jitted JAX function.

The eager path (``text_encoding.encode_llm`` / ``encode_byt5``, ``image_condition.encode_siglip``)
runs the Qwen2.5-VL language model, the Glyph-ByT5 encoder and SigLIP in PyTorch on the host,
about 30 TFLOP for a prompt and its negative at the full 7B size (28 layers over 1108 tokens,
twice), while the accelerators idle.
Here the same modules run through torchax (``runtime.functional``), their weights placed on one
device once, compiled once per input shape: every input stage 1 builds has a fixed shape (the LLM
reads ``crop_start + 1000`` tokens, ByT5 256, SigLIP one 384 x 384 image), so each encoder compiles
once per process. The eager path stays the fallback; the caller picks one.

What tracing under ``jax.jit`` needs, found by running them:
- a twin of the module on the meta device is traced, not the module itself: its config may pick
  another attention implementation (below) without touching the model the eager path shares,
  and it holds no weights (``functional`` substitutes the device copies);
- every buffer travels with the parameters, non-persistent ones too (SigLIP's ``position_ids``,
  the LLM's rotary frequencies): a host tensor left in the module meets the device arrays and
  torchax refuses the mix; tied tensors (T5's ``shared`` = ``encoder.embed_tokens``) go once;
- T5 adds its relative position bias to the mask as a float bias, which the package's SDPA
  override (boolean masks only) does not take: T5 is traced with transformers' "eager" attention
  (256 tokens: the scores are small). The LLM and SigLIP keep "sdpa", i.e. the override;
- under ``jax.jit`` transformers builds the LLM's causal + padding mask as a boolean (B, 1, L, S)
  tensor (it never skips it by reading the mask's values: ``is_jax_jitting``), so no Python
  branch depends on the data and the override's reference attention takes it (it holds the
  (L, S) scores: 28 heads x 1108^2 per layer, small; the flash kernels take key masks only);
- the LLM returns every hidden state; the jitted function keeps only the one stage 1 reads, so
  XLA drops the others and the layers after it (2 of Qwen's 28) and only that one is copied back.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

from .files import InputError
from .runtime import JaxParams, functional, jax_dtype, to_host_array

# hidden_states[-(text_encoding.HIDDEN_STATE_SKIP_LAYER + 1)]; not imported, so that text_encoding
# may import this module to choose its backend
LLM_HIDDEN_STATE = -3
# model_type -> attention implementation of the traced twin (default: "sdpa", the package override)
_ATTENTION = {"t5": "eager"}

Output = Callable[[Any], jax.Array]  # the one array kept from the model's output (a ModelOutput of jax arrays)
Key = tuple[tuple[str, tuple[int, ...], str], ...]


def traceable(model: torch.nn.Module) -> torch.nn.Module:
    """The architecture of a transformers ``model`` on the meta device, in its dtype, with the
    attention implementation that traces (see the module docstring); ``model`` is not changed."""
    config = copy.deepcopy(model.config)
    config._attn_implementation = _ATTENTION.get(config.model_type, "sdpa")
    with torch.device("meta"):
        twin = type(model)(config)
    return twin.to(_dtype(model)).eval()


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (persistent or not), each tied tensor under its first name."""
    return dict(itertools.chain(model.named_parameters(), model.named_buffers()))


def _jax_value(t: torch.Tensor) -> np.ndarray:
    """A host tensor as the array JAX gets: int64 as int32 (JAX runs without 64-bit types)."""
    array = to_host_array(t)
    return array.astype(np.int32) if array.dtype == np.int64 else array


def device_params(model: torch.nn.Module, device: jax.Device | None = None) -> JaxParams:
    """``model``'s tensors (``_named_tensors``) on ``device`` (default: JAX's first), in their dtypes."""
    return {name: jax.device_put(_jax_value(t), device) for name, t in _named_tensors(model).items()}


def abstract_params(model: torch.nn.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of ``device_params(model)``, for a model on the meta device (no weights)."""
    def spec(t: torch.Tensor) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(t.shape), jax_dtype(torch.int32 if t.dtype == torch.int64 else t.dtype))
    return {name: spec(t) for name, t in _named_tensors(model).items()}


def encoder_function(model: torch.nn.Module, output: Output, **fixed: Any) -> Callable[..., jax.Array]:
    """``run(params, **inputs) -> array``: ``model`` (its meta twin) called with ``inputs`` and the
    ``fixed`` keyword arguments, ``output`` of the result in float32; pure, for ``jax.jit``."""
    apply = functional(traceable(model))

    def encode(params: JaxParams, **inputs: jax.Array) -> jax.Array:  # named for compile logs: jit(encode)
        return output(apply(params, **inputs, **fixed)).astype(jnp.float32)
    return encode


@dataclasses.dataclass
class JaxEncoder:
    """An encoder's jitted function and its weights on one device; ``__call__`` compiles once per
    input shape and dtype (``compiled_shapes`` counts them) and returns a float32 host tensor."""

    model: torch.nn.Module  # the eager model it was made from, whose weights ``params`` copies
    function: Callable[..., jax.Array]
    params: JaxParams
    device: jax.Device | None = None
    _compiled: dict[Key, Any] = dataclasses.field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return _dtype(self.model)

    @property
    def compiled_shapes(self) -> int:
        return len(self._compiled)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        arrays = {k: jax.device_put(_jax_value(v), self.device) for k, v in inputs.items()}
        key = tuple((k, a.shape, str(a.dtype)) for k, a in sorted(arrays.items()))
        if key not in self._compiled:
            self._compiled[key] = jax.jit(self.function).lower(self.params, **arrays).compile()
        out = self._compiled[key](self.params, **arrays)
        return torch.from_numpy(np.array(out))  # a writable host copy


def jax_encoder(model: torch.nn.Module, output: Output, device: jax.Device | None = None, **fixed: Any) -> JaxEncoder:
    """``model`` as a ``JaxEncoder`` on ``device`` (default: JAX's first) keeping ``output``."""
    return JaxEncoder(model, encoder_function(model, output, **fixed), device_params(model, device), device)


# ---- the three encoders of stage 1 --------------------------------------------------------------

def jax_llm(model: torch.nn.Module, device: jax.Device | None = None,
            hidden_state: int = LLM_HIDDEN_STATE) -> JaxEncoder:
    """The Qwen2.5-VL language model (``Qwen2_5_VLTextModel``) keeping ``hidden_states[hidden_state]``."""
    return jax_encoder(model, lambda out: out.hidden_states[hidden_state], device,
                       output_hidden_states=True, use_cache=False)


def jax_byt5(model: torch.nn.Module, device: jax.Device | None = None) -> JaxEncoder:
    """The Glyph-ByT5 encoder (``T5EncoderModel``) keeping ``last_hidden_state``."""
    return jax_encoder(model, lambda out: out.last_hidden_state, device)


def jax_siglip(model: torch.nn.Module, device: jax.Device | None = None) -> JaxEncoder:
    """SigLIP (``SiglipVisionModel``) keeping ``last_hidden_state`` (after its post-layernorm)."""
    return jax_encoder(model, lambda out: out.last_hidden_state, device)


def _check_tokens(what: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if input_ids.ndim != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InputError(f"{what}: input_ids {tuple(input_ids.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} must both be (batch, tokens)")


def encode_llm_jax(encoder: JaxEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, width) float32: ``model(input_ids, attention_mask, output_hidden_states=True)
    .hidden_states[-3]`` of ``jax_llm``'s model, whole length (crop ``[:, crop_start:]`` after)."""
    _check_tokens("the LLM's tokens", input_ids, attention_mask)
    return encoder(input_ids=input_ids, attention_mask=attention_mask)


def encode_byt5_jax(encoder: JaxEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, width) float32: ``model(input_ids, attention_mask)[0]`` of ``jax_byt5``'s model."""
    _check_tokens("the ByT5 tokens", input_ids, attention_mask)
    return encoder(input_ids=input_ids, attention_mask=attention_mask.float())


def encode_siglip_jax(encoder: JaxEncoder, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, patches, width) float32: ``model(pixel_values).last_hidden_state`` of ``jax_siglip``'s
    model; ``pixel_values`` as its processor gives them, cast to the model's dtype here."""
    if pixel_values.ndim != 4:
        raise InputError(f"SigLIP's pixel values have shape {tuple(pixel_values.shape)}, expected (batch, 3, H, W)")
    return encoder(pixel_values=pixel_values.to(encoder.dtype))


# ---- as the eager path's model calls ---------------------------------------------------------------

def _same_model(runner: JaxEncoder, encoder: Any) -> None:
    if encoder.model is not runner.model:
        raise InputError(f"the jitted encoder holds the weights of another model than the {encoder.source} "
                         "encoder it is asked to run")


def llm_call(runner: JaxEncoder) -> Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``runner`` (``jax_llm``) as a ``text_encoding.ModelCall``: ``encode_llm(llm, prompt,
    run=llm_call(runner))`` runs the model jitted instead of eagerly."""
    def run(encoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        _same_model(runner, encoder)
        return encode_llm_jax(runner, input_ids, attention_mask)
    return run


def byt5_call(runner: JaxEncoder) -> Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``runner`` (``jax_byt5``) as a ``text_encoding.ModelCall`` for ``encode_byt5``."""
    def run(encoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        _same_model(runner, encoder)
        return encode_byt5_jax(runner, input_ids, attention_mask)
    return run


def siglip_call(runner: JaxEncoder) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """``runner`` (``jax_siglip``) as ``(vision_encoder, pixel_values) -> states``."""
    def run(encoder: Any, pixel_values: torch.Tensor) -> torch.Tensor:
        _same_model(runner, encoder)
        return encode_siglip_jax(runner, pixel_values)
    return run
