"""LoRA adapters on the DiT's linear layers: where they go, their weights, their files.

A target layer keeps its frozen weight W and bias b and learns A (r, in) and B (out, r):
``y = W x + b + (alpha / r) B A x``. Adapter tensors are named after the official modules,
``double_blocks.0.img_attn_q.lora_A.weight``, which is how the official trainer (PEFT, with
its LoraConfig as JSON under the safetensors metadata key ``lora_adapter_metadata``) saves
them; files in diffusers' module names (``transformer.transformer_blocks.0.attn.to_q...``)
are converted on load. At inference an adapter is merged, ``W + s (alpha / r) B A``, so a
LoRA costs nothing per step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import torch
import torch.nn as nn

from . import scan
from .config import DiTConfig
from .files import InputError, read_safetensors, save_safetensors
from .naming import official_module
from .params import meta_model

# The official trainer's default targets every nn.Linear ("all-linear"); this project's
# default is the double blocks' linear layers, where nearly all of the model's weights are.
TARGET_PRESETS = {
    "double_blocks": r"double_blocks\.\d+\.(img|txt)_(mod\.linear|attn_[qkv]|attn_proj|mlp\.fc[12])",
    "all-linear": r".*",
}
METADATA_KEY = "lora_adapter_metadata"
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.")
_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])\.weight")


class LoRAError(InputError):
    """An adapter file or setting that does not fit the model."""


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Rank, alpha and target layers (a preset name of TARGET_PRESETS or a regex over module names)."""

    rank: int = 8
    alpha: float = 16.0
    targets: str = "double_blocks"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise LoRAError(f"{{lora_rank}} {self.rank} must be >= 1")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise LoRAError(f"{{lora_targets}} {self.targets!r} is neither a preset ({', '.join(TARGET_PRESETS)}) "
                            f"nor a valid regex: {e}") from None

    @property
    def pattern(self) -> str:
        return TARGET_PRESETS.get(self.targets, self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update; ``weight`` and ``bias`` keep the wrapped layer's names."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, bias: bool = True, device=None):
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.scale = scale
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.scale * self.lora_B(self.lora_A(x))


def linear_layers(model: nn.Module, pattern: str) -> dict[str, tuple[int, int]]:
    """The nn.Linear layers whose whole module name matches ``pattern``: name -> (out, in)."""
    return {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and re.fullmatch(pattern, name)
    }


def with_lora(model: nn.Module, ranks: Mapping[str, int], scale: float) -> nn.Module:
    """Swap each named nn.Linear for a LoRALinear of that rank sharing its weight and bias (in place)."""
    for name, rank in ranks.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        layer = LoRALinear(base.in_features, base.out_features, rank, scale, bias=base.bias is not None,
                           device=base.weight.device)
        layer.weight, layer.bias = base.weight, base.bias
        setattr(parent, child, layer)
    return model


def target_layers(model: nn.Module, spec: LoRASpec) -> dict[str, tuple[int, int]]:
    """The layers ``spec`` adapts: name -> (out, in); at least one."""
    layers = linear_layers(model, spec.pattern)
    if not layers:
        raise LoRAError(f"{{lora_targets}} {spec.targets!r} matches no linear layer of the model")
    return layers


def adapter_shapes(model: nn.Module, spec: LoRASpec) -> dict[str, tuple[int, int]]:
    """Official names and shapes of the adapter: A (r, in) and B (out, r) per target layer."""
    shapes = {}
    for name, (out_features, in_features) in target_layers(model, spec).items():
        shapes[f"{name}.lora_A.weight"] = (spec.rank, in_features)
        shapes[f"{name}.lora_B.weight"] = (out_features, spec.rank)
    return shapes


def init_adapter(model: nn.Module, spec: LoRASpec, seed: int) -> dict[str, torch.Tensor]:
    """PEFT's initialisation: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt 5), B = 0,
    so the adapted model starts equal to the base model. float32, official names."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in adapter_shapes(model, spec).items():
        if ".lora_A." in name:
            weights[name] = (torch.rand(shape, generator=gen) * 2 - 1) * (1.0 / math.sqrt(shape[1]))
        else:
            weights[name] = torch.zeros(shape)
    return weights


@dataclasses.dataclass(frozen=True)
class Adapter:
    """LoRA weights in official names and the scale alpha / r they were trained with."""

    weights: dict[str, torch.Tensor]
    scale: float

    @property
    def ranks(self) -> dict[str, int]:
        return {m.group("module"): t.shape[0] for k, t in self.weights.items()
                if (m := _KEY.fullmatch(k)) and m.group("part") == "A"}


def save_adapter(path: str | Path, weights: Mapping[str, torch.Tensor], spec: LoRASpec) -> Path:
    """The official trainer's file: official-named lora_A/lora_B tensors and PEFT's config as metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(dict(weights), path, metadata=adapter_metadata(weights, spec))
    return path


def adapter_metadata(names: Iterable[str], spec: LoRASpec) -> dict[str, str]:
    """The adapter file's metadata: PEFT's config for the adapter with tensors ``names``."""
    config = {
        "peft_type": "LORA", "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted({_KEY.fullmatch(k).group("module") for k in names}),
        "task_type": "FEATURE_EXTRACTION",
    }
    return {METADATA_KEY: json.dumps(config)}


def _scale_from(metadata: Mapping[str, str], path: Path) -> float:
    """alpha / r from PEFT's config; without one, alpha = r (scale 1), as diffusers and PEFT assume."""
    if METADATA_KEY not in metadata:
        return 1.0
    try:
        config = json.loads(metadata[METADATA_KEY])
        return float(config["lora_alpha"]) / float(config["r"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, ZeroDivisionError):
        raise LoRAError(f"{path}: metadata {METADATA_KEY} has no usable 'r' and 'lora_alpha'") from None


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        key = key.removeprefix(prefix)
    return key.replace(".default.weight", ".weight")  # PEFT's in-memory names carry the adapter name


def _from_diffusers(pairs: dict[str, dict[str, torch.Tensor]], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers module -> official module; the refiner's separate q/k/v adapters become one
    block-diagonal adapter of rank r_q + r_k + r_v on the fused qkv, which is exact."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    fused: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for module, ab in pairs.items():
        mapped = official_module(module)
        if mapped is None:
            raise LoRAError(f"{path}: {module} is not a module of the HunyuanVideo-1.5 transformer")
        name, rows = mapped
        if rows in ("q", "k", "v"):
            fused.setdefault(name, {})[rows] = ab
        elif rows == "swapped":
            out[name] = {"A": ab["A"], "B": torch.cat(ab["B"].chunk(2, dim=0)[::-1])}
        else:
            out[name] = ab
    for name, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise LoRAError(f"{path}: the adapter of {name} needs to_q, to_k and to_v; found {sorted(parts)}")
        out[name] = {"A": torch.cat([parts[p]["A"] for p in "qkv"]),
                     "B": torch.block_diag(*(parts[p]["B"] for p in "qkv"))}
    return out


def load_adapter(path: str | Path) -> Adapter:
    """A LoRA file in official (PEFT) or diffusers names, as official-named float32 tensors."""
    path = Path(path)
    tensors, metadata = read_safetensors(path, torch.float32, error=LoRAError)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.fullmatch(_strip_prefix(key))
        if m is None:
            raise LoRAError(f"{path}: tensor {key} is not a LoRA weight (expected <module>.lora_A.weight or "
                            "<module>.lora_B.weight; kohya-style lora_down/lora_up files need converting)")
        if not bool(torch.isfinite(tensor).all()):
            raise LoRAError(f"{path}: tensor {key} holds NaN or inf")
        pairs.setdefault(m.group("module"), {})[m.group("part")] = tensor
    if not pairs:
        raise LoRAError(f"{path}: no LoRA tensors")
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].ndim != 2 or ab["B"].ndim != 2 or ab["A"].shape[0] != ab["B"].shape[1]:
            raise LoRAError(f"{path}: {module} needs a lora_A (r, in) and a lora_B (out, r) of the same rank")
    if any(module.startswith(("transformer_blocks.", "context_embedder.", "x_embedder.", "proj_out", "norm_out"))
           for module in pairs):
        pairs = _from_diffusers(pairs, path)
    weights = {f"{module}.lora_{part}.weight": t for module, ab in pairs.items() for part, t in ab.items()}
    return Adapter(weights, _scale_from(metadata, path))


def check_adapter(adapter: Adapter, config: DiTConfig, source: str) -> None:
    """Raise a LoRAError naming the first adapted module the model lacks or whose shape differs."""
    layers = linear_layers(meta_model(config), r".*")
    for module, rank in adapter.ranks.items():
        if module not in layers:
            raise LoRAError(f"{source}: {module} is not a linear layer of the model")
        out_features, in_features = layers[module]
        a, b = adapter.weights[f"{module}.lora_A.weight"], adapter.weights[f"{module}.lora_B.weight"]
        if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
            raise LoRAError(f"{source}: {module} adapter is A {tuple(a.shape)}, B {tuple(b.shape)}; the layer "
                            f"takes A (r, {in_features}) and B ({out_features}, r)")


def merge(params: Mapping[str, jax.Array], lora: Mapping[str, jax.Array], scale: float) -> dict[str, jax.Array]:
    """Params with each adapted weight replaced by ``W + scale B A`` (in W's dtype and placement).

    ``lora`` maps ``<module>.lora_A.weight`` / ``lora_B.weight`` to arrays; ``scale`` is
    alpha / r times any user multiplier. Traceable: the training step merges for validation.
    ``params`` may hold the double blocks stacked by layer (``hunyuan_tpu.scan``); an adapted
    layer then updates its row of the stack.
    """
    merged = dict(params)
    for key in lora:
        m = _KEY.fullmatch(key)
        if m.group("part") != "A":
            continue
        name = m.group("module") + ".weight"
        a, b = lora[key], lora[m.group("module") + ".lora_B.weight"]
        delta = scale * jnp.matmul(b.astype(jnp.float32), a.astype(jnp.float32))
        if name in merged:
            merged[name] = (merged[name].astype(jnp.float32) + delta).astype(merged[name].dtype)
        else:
            stacked, layer = scan.split_layer(name)
            w = merged[stacked]
            merged[stacked] = w.at[layer].set((w[layer].astype(jnp.float32) + delta).astype(w.dtype))
    return merged


def merge_adapter(params: Mapping[str, jax.Array], adapter: Adapter, multiplier: float = 1.0) -> dict[str, jax.Array]:
    """``params`` with ``adapter`` merged at ``multiplier`` times its trained strength (the
    ``--lora_scale`` of inference). Only the adapted weights are rewritten, each in place of
    the old one (donated) and placed as it was, so the model's memory does not grow."""
    targets = {f"{module}.weight" for module in adapter.ranks}
    old = {k: v for k, v in params.items() if k in targets}
    lora = {k: jnp.asarray(v.numpy()) for k, v in adapter.weights.items()}
    shardings = {k: v.sharding for k, v in old.items()}
    merged = jax.jit(lambda w, a: merge(w, a, adapter.scale * multiplier), donate_argnums=0,
                     out_shardings=shardings)(old, lora)
    return {**params, **merged}
