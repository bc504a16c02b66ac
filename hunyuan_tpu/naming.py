"""Official <-> diffusers parameter names for the HunyuanVideo-1.5 transformer.

The mapping is a table of module paths; two entries are not one-to-one renames and are
handled beside it: the refiner's fused ``self_attn_qkv`` (diffusers splits it into to_q/k/v)
and the final layer's modulation (diffusers stores [scale, shift], the official code
[shift, scale]). Names neither side knows are passed through unchanged, so that the
loader's key check reports them as unexpected.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch

_REFINER = ("txt_in.individual_token_refiner.blocks.{i}.", "context_embedder.token_refiner.refiner_blocks.{i}.")
_BLOCK = ("double_blocks.{i}.", "transformer_blocks.{i}.")

# (official module path, diffusers module path); {i} is a block index.
MODULE_NAMES: tuple[tuple[str, str], ...] = (
    ("img_in.proj", "x_embedder.proj"),
    ("time_in.mlp.0", "time_embed.timestep_embedder.linear_1"),
    ("time_in.mlp.2", "time_embed.timestep_embedder.linear_2"),
    ("time_r_in.mlp.0", "time_embed.timestep_embedder_r.linear_1"),
    ("time_r_in.mlp.2", "time_embed.timestep_embedder_r.linear_2"),
    ("txt_in.input_embedder", "context_embedder.proj_in"),
    ("txt_in.t_embedder.mlp.0", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
    ("txt_in.t_embedder.mlp.2", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
    ("txt_in.c_embedder.linear_1", "context_embedder.time_text_embed.text_embedder.linear_1"),
    ("txt_in.c_embedder.linear_2", "context_embedder.time_text_embed.text_embedder.linear_2"),
    *((_REFINER[0] + a, _REFINER[1] + b) for a, b in (
        ("norm1", "norm1"),
        ("norm2", "norm2"),
        ("self_attn_proj", "attn.to_out.0"),
        ("mlp.fc1", "ff.net.0.proj"),
        ("mlp.fc2", "ff.net.2"),
        ("adaLN_modulation.1", "norm_out.linear"),
    )),
    ("byt5_in.layernorm", "context_embedder_2.norm"),
    ("byt5_in.fc1", "context_embedder_2.linear_1"),
    ("byt5_in.fc2", "context_embedder_2.linear_2"),
    ("byt5_in.fc3", "context_embedder_2.linear_3"),
    ("vision_in.proj.0", "image_embedder.norm_in"),
    ("vision_in.proj.1", "image_embedder.linear_1"),
    ("vision_in.proj.3", "image_embedder.linear_2"),
    ("vision_in.proj.4", "image_embedder.norm_out"),
    ("cond_type_embedding", "cond_type_embed"),
    *((_BLOCK[0] + a, _BLOCK[1] + b) for a, b in (
        ("img_mod.linear", "norm1.linear"),
        ("txt_mod.linear", "norm1_context.linear"),
        ("img_attn_q", "attn.to_q"),
        ("img_attn_k", "attn.to_k"),
        ("img_attn_v", "attn.to_v"),
        ("img_attn_q_norm", "attn.norm_q"),
        ("img_attn_k_norm", "attn.norm_k"),
        ("img_attn_proj", "attn.to_out.0"),
        ("txt_attn_q", "attn.add_q_proj"),
        ("txt_attn_k", "attn.add_k_proj"),
        ("txt_attn_v", "attn.add_v_proj"),
        ("txt_attn_q_norm", "attn.norm_added_q"),
        ("txt_attn_k_norm", "attn.norm_added_k"),
        ("txt_attn_proj", "attn.to_add_out"),
        ("img_mlp.fc1", "ff.net.0.proj"),
        ("img_mlp.fc2", "ff.net.2"),
        ("txt_mlp.fc1", "ff_context.net.0.proj"),
        ("txt_mlp.fc2", "ff_context.net.2"),
    )),
    ("final_layer.linear", "proj_out"),
)
_FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")
_REFINER_QKV = re.compile(re.escape(_REFINER[0]).replace(r"\{i\}", r"(\d+)") + r"self_attn_qkv\.(weight|bias)")
_REFINER_QKV_PART = re.compile(re.escape(_REFINER[1]).replace(r"\{i\}", r"(\d+)") + r"attn\.to_([qkv])\.(weight|bias)")


def _compile(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


_OFFICIAL_TO_DIFFUSERS = [(_compile(o), d) for o, d in MODULE_NAMES]
_DIFFUSERS_TO_OFFICIAL = [(_compile(d), o) for o, d in MODULE_NAMES]


def _rename(name: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    module, _, leaf = name.rpartition(".")
    for pattern, target in rules:
        m = pattern.fullmatch(module)
        if m:
            return target.replace("{i}", m.groupdict().get("i") or "") + "." + leaf
    return None


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def is_diffusers_naming(names) -> bool:
    """True when the parameter names are diffusers' (HunyuanVideo15Transformer3DModel)."""
    return any(n.startswith(("transformer_blocks.", "x_embedder.", "context_embedder.")) for n in names)


def official_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official state dict to diffusers' names (split qkv, swap final modulation halves)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        qkv = _REFINER_QKV.fullmatch(name)
        if qkv:
            block, leaf = qkv.groups()
            prefix = _REFINER[1].replace("{i}", block)
            for part, chunk in zip("qkv", tensor.chunk(3, dim=0)):
                out[f"{prefix}attn.to_{part}.{leaf}"] = chunk.clone()
        elif name.rpartition(".")[0] == _FINAL_MOD[0]:
            out[_FINAL_MOD[1] + "." + name.rpartition(".")[2]] = _swap_halves(tensor)
        else:
            out[_rename(name, _OFFICIAL_TO_DIFFUSERS) or name] = tensor
    return out


def official_sources(names: Iterable[str]) -> dict[str, tuple[tuple[str, ...], Callable[..., torch.Tensor]]]:
    """For a diffusers checkpoint's tensor ``names``: each official name, the diffusers tensors it
    is made from and how (renamed as it is, the refiner's q/k/v concatenated, the final
    modulation's halves swapped), so that a loader can read one official tensor at a time."""
    plan: dict[str, tuple[tuple[str, ...], Callable[..., torch.Tensor]]] = {}
    qkv_parts: dict[tuple[str, str], dict[str, str]] = {}
    for name in names:
        part = _REFINER_QKV_PART.fullmatch(name)
        if part:
            block, which, leaf = part.groups()
            qkv_parts.setdefault((block, leaf), {})[which] = name
        elif name.rpartition(".")[0] == _FINAL_MOD[1]:
            plan[_FINAL_MOD[0] + "." + name.rpartition(".")[2]] = ((name,), _swap_halves)
        else:
            plan[_rename(name, _DIFFUSERS_TO_OFFICIAL) or name] = ((name,), _same)
    for (block, leaf), parts in qkv_parts.items():
        if len(parts) == 3:
            official = _REFINER[0].replace("{i}", block) + f"self_attn_qkv.{leaf}"
            plan[official] = (tuple(parts[p] for p in "qkv"), _concatenated)
        else:  # an incomplete triple cannot be fused; leave it for the key check to report
            plan.update({n: ((n,), _same) for n in parts.values()})
    return plan


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _concatenated(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts, dim=0)


def diffusers_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers state dict to the official names (fuse refiner qkv, swap final modulation)."""
    return {name: make(*(state_dict[s] for s in sources))
            for name, (sources, make) in official_sources(state_dict).items()}


def official_module(diffusers_module: str) -> tuple[str, str] | None:
    """The official module behind a diffusers module path, and how its output rows map.

    Returns (official path, rows): rows is "all" for a plain rename, "swapped" for the final
    modulation (diffusers stores [scale, shift]), or "q"/"k"/"v" for the third of the
    refiner's fused ``self_attn_qkv`` that diffusers keeps as ``attn.to_q`` etc.; None for a
    module neither side knows. For adapters (LoRA) whose output rows must follow the weight's.
    """
    if diffusers_module == _FINAL_MOD[1]:
        return _FINAL_MOD[0], "swapped"
    part = _REFINER_QKV_PART.fullmatch(diffusers_module + ".weight")
    if part:
        block, which, _ = part.groups()
        return _REFINER[0].replace("{i}", block) + "self_attn_qkv", which
    renamed = _rename(diffusers_module + ".weight", _DIFFUSERS_TO_OFFICIAL)
    return (renamed.removesuffix(".weight"), "all") if renamed else None

