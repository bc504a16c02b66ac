"""Transformer configuration: one frozen dataclass, named presets, official config.json I/O.

Field names are the keys of the official ``transformer/<variant>/config.json`` so that an
official file reads straight in and ``dataclasses.replace`` derives variants. Keys of the
official file that name a choice this port does not vary (they have one value in every
released checkpoint) are checked rather than stored: see ``_FIXED_OFFICIAL``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

# Official config keys whose value is the same in every released checkpoint and which the
# model implements only in that form. A config asking for anything else is rejected rather
# than silently run with the wrong architecture.
_FIXED_OFFICIAL: dict[str, Any] = {
    "mlp_act_type": "gelu_tanh",
    "mm_single_blocks_depth": 0,
    "qk_norm": True,
    "qk_norm_type": "rms",
    "qkv_bias": True,
    "guidance_embed": False,
    "text_projection": "single_refiner",
    "use_attention_mask": True,
    "text_pool_type": None,
    "glyph_byT5_v2": True,
    "vision_projection": "linear",
    "is_reshape_temporal_channels": False,
    "use_cond_type_embedding": True,
}
# Official keys unused by the released architecture.
_IGNORED_OFFICIAL = frozenset({"text_states_dim_2"})

# attn_mode values: the official dense kernels (all the same math), and SSTA's block-sparse kernel.
DENSE_ATTN_MODES = ("flash", "flash2", "flash3", "torch", "sageattn")
SPARSE_ATTN_MODE = "flex-block-attn"
# attn_param keys with one value in the official SSTA path that this port implements; any other
# value (a sampling, sparse type or padding this port has not written) is refused, never ignored.
_FIXED_ATTN_PARAM: dict[str, Any] = {
    "ssta_threshold": 0.0,
    "ssta_sampling_type": "importance",
    "ssta_adaptive_pool": None,
    "attn_sparse_type": "ssta",
    "attn_pad_type": "zero",
}
# Keys the official model writes into attn_param while it runs (the canvas and the layer name).
_RUNTIME_ATTN_PARAM = frozenset({"thw", "layer-name"})


@dataclasses.dataclass(frozen=True)
class SparseAttention:
    """SSTA, the official ``attn_param`` of the ``*_sparse`` checkpoints (defaults: the official
    constructor's). Each image tile of ``tile_size`` (t, h, w) latents is one attention block;
    its queries attend the ``win_size`` window of neighbouring tiles, the ``ssta_topk`` tiles of
    highest importance (``ssta_lambda`` weighs similarity against redundancy) and the text.
    ``win_type`` "hybrid" runs every ``win_ratio``-th block and the last one dense.
    ``attn_use_text_mask``: text blocks past the valid text are cut. ``attn_mask_share_within_head``:
    one block selection for all heads instead of one per head."""

    tile_size: tuple[int, int, int] = (6, 8, 8)
    win_size: tuple[int, int, int] = (3, 3, 3)  # official [[3, 3, 3]]: only the first is used
    win_type: str = "fixed"
    win_ratio: int = 10
    ssta_topk: int = 64
    ssta_lambda: float = 0.7
    attn_use_text_mask: bool = True
    attn_mask_share_within_head: bool = False

    def __post_init__(self) -> None:
        for key in ("tile_size", "win_size"):
            value = getattr(self, key)
            if len(value) != 3 or any(int(v) < 1 for v in value):
                raise ValueError(f"attn_param {key} must be 3 positive integers (t, h, w), got {list(value)}")
        if self.win_type not in ("fixed", "hybrid"):
            raise ValueError(f"attn_param win_type {self.win_type!r} is not 'fixed' or 'hybrid'")
        if self.ssta_topk < 1:
            raise ValueError(f"attn_param ssta_topk must be >= 1, got {self.ssta_topk}")

    @property
    def block_size(self) -> int:
        return math.prod(self.tile_size)

    def dense_at(self, index: int, depth: int) -> bool:
        """Whether double block ``index`` of ``depth`` runs dense (the official hybrid rule)."""
        return self.win_type == "hybrid" and self.win_ratio > 0 and (
            (index + 1) % self.win_ratio == 0 or index + 1 == depth)

    @classmethod
    def from_official(cls, raw: dict[str, Any], source: str = "config") -> SparseAttention:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names - set(_FIXED_ATTN_PARAM) - _RUNTIME_ATTN_PARAM)
        if unknown:
            raise ValueError(f"{source}: unknown attn_param key(s) {', '.join(unknown)}; valid keys: "
                             f"{', '.join(sorted(names | set(_FIXED_ATTN_PARAM)))}")
        for key, expected in _FIXED_ATTN_PARAM.items():
            value = raw.get(key, expected)
            if value != expected and not (key == "ssta_threshold" and value <= 0):
                raise ValueError(f"{source}: attn_param {key}={value!r} is not implemented by this port "
                                 f"(it implements {key}={expected!r})")
        kwargs = {k: v for k, v in raw.items() if k in names}
        if "win_size" in kwargs:
            win = kwargs["win_size"]
            kwargs["win_size"] = win[0] if win and isinstance(win[0], (list, tuple)) else win
        for key in ("tile_size", "win_size"):
            if key in kwargs:
                kwargs[key] = tuple(int(v) for v in kwargs[key])
        for key in ("attn_use_text_mask", "attn_mask_share_within_head"):
            if key in kwargs:
                kwargs[key] = bool(kwargs[key])
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_official(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(_FIXED_ATTN_PARAM)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["win_size"] = [out["win_size"]]
        out["attn_use_text_mask"] = int(self.attn_use_text_mask)
        out["attn_mask_share_within_head"] = int(self.attn_mask_share_within_head)
        return dict(sorted(out.items()))

# Keys of diffusers' HunyuanVideo15Transformer3DModel config (converted in _diffusers_to_official_config).
_DIFFUSERS_KEYS = frozenset({
    "in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers",
    "num_refiner_layers", "mlp_ratio", "patch_size", "patch_size_t", "qk_norm", "text_embed_dim",
    "text_embed_2_dim", "image_embed_dim", "rope_theta", "rope_axes_dim", "target_size",
    "task_type", "use_meanflow",
})
_TARGET_SIZE_TO_RESOLUTION = {640: "480p", 960: "720p"}


# Sizes that must be positive integers (a config.json with 0 or "2048" is refused by name, not met as a
# division by zero or a type error deep in the model)
_POSITIVE_INTS = ("in_channels", "out_channels", "hidden_size", "heads_num", "mm_double_blocks_depth",
                  "text_states_dim", "vision_states_dim", "byt5_states_dim", "byt5_hidden_dim", "refiner_depth")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Architecture of the HunyuanVideo-1.5 diffusion transformer (official key names)."""

    patch_size: tuple[int, int, int] = (1, 1, 1)
    in_channels: int = 32  # latent channels (concat_condition: the patch embedding sees 2 * in_channels + 1)
    out_channels: int = 32
    # True: the official multitask layout, the condition (image latents + mask) concatenated to the
    # noisy latents inside the model. False: in_channels is the whole input, as in the SR models
    # (98 = 32 noisy + 33 condition + 33 low-resolution condition).
    concat_condition: bool = True
    hidden_size: int = 2048
    heads_num: int = 16
    mlp_width_ratio: float = 4.0
    mm_double_blocks_depth: int = 54
    rope_dim_list: tuple[int, ...] = (16, 56, 56)
    rope_theta: float = 256.0
    use_meanflow: bool = False
    text_states_dim: int = 3584
    vision_states_dim: int = 1152
    ideal_resolution: str | None = "480p"
    ideal_task: str | None = "t2v"
    # Hard-coded in the official code (ByT5Mapper 1472 -> 2048 -> 2048, a 2-block refiner);
    # fields here so that small test models can shrink them.
    byt5_states_dim: int = 1472
    byt5_hidden_dim: int = 2048
    refiner_depth: int = 2
    # The attention: a dense mode, or "flex-block-attn" with its SSTA parameters (the sparse
    # checkpoints). A dense mode keeps no attn_param.
    attn_mode: str = "flash"
    attn_param: SparseAttention | None = None

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("mlp_width_ratio", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.attn_mode not in (*DENSE_ATTN_MODES, SPARSE_ATTN_MODE):
            modes = ", ".join((*DENSE_ATTN_MODES, SPARSE_ATTN_MODE))
            raise ValueError(f"attn_mode {self.attn_mode!r} is not one of {modes}")
        if self.attn_mode == SPARSE_ATTN_MODE and self.attn_param is None:
            object.__setattr__(self, "attn_param", SparseAttention())
        if self.attn_mode != SPARSE_ATTN_MODE:
            object.__setattr__(self, "attn_param", None)
        if self.hidden_size % self.heads_num:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads_num {self.heads_num}")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        if len(self.rope_dim_list) != 3 or any(d % 2 for d in self.rope_dim_list):
            raise ValueError(f"rope_dim_list must be 3 even widths (t, h, w), got {self.rope_dim_list}")
        if sum(self.rope_dim_list) != self.head_dim:
            raise ValueError(
                f"rope_dim_list {self.rope_dim_list} sums to {sum(self.rope_dim_list)}, "
                f"expected head_dim {self.head_dim}"
            )
        if self.ideal_task not in (None, "t2v", "i2v"):
            raise ValueError(f"ideal_task must be 't2v', 'i2v' or null, got {self.ideal_task!r}")
        if not self.concat_condition and self.in_channels != 3 * self.out_channels + 2:
            raise ValueError(
                f"in_channels {self.in_channels} with concat_condition false: the one such layout implemented is "
                f"the super-resolution input, 3 * out_channels + 2 = {3 * self.out_channels + 2}")

    @property
    def sparse(self) -> SparseAttention | None:
        """The SSTA parameters if the model attends sparsely, else None."""
        return self.attn_param

    def dense(self) -> DiTConfig:
        """This model with dense attention everywhere (the same weights; for comparisons)."""
        return dataclasses.replace(self, attn_mode="flash", attn_param=None)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads_num

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_width_ratio)

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latents the model denoises."""
        return self.out_channels

    @property
    def img_in_channels(self) -> int:
        """Channels of the model input: noisy latents, condition latents and a mask channel (and,
        for super-resolution, the low-resolution latents and theirs)."""
        return 2 * self.in_channels + 1 if self.concat_condition else self.in_channels

    @property
    def super_resolution(self) -> bool:
        """Whether the model is an SR DiT: its input also holds the upsampled low-resolution latents."""
        return not self.concat_condition

    # ---- presets -------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str) -> DiTConfig:
        """A named preset; ``preset_names()`` lists them."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None

    @staticmethod
    def preset_names() -> tuple[str, ...]:
        return tuple(PRESETS)

    # ---- official config.json ------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> DiTConfig:
        """Build from an official or a diffusers transformer config dict."""
        if _is_diffusers_config(raw):
            raw = _diffusers_to_official_config(raw)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(
            k for k in raw
            if k not in fields and k not in _FIXED_OFFICIAL and k not in _IGNORED_OFFICIAL
            and not k.startswith("_")
        )
        if unknown:
            valid = sorted(fields | set(_FIXED_OFFICIAL) | _IGNORED_OFFICIAL)
            raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
        for key, expected in _FIXED_OFFICIAL.items():
            if key in raw and raw[key] != expected:
                raise ValueError(
                    f"{source}: unsupported {key}={raw[key]!r}; this port implements the released "
                    f"HunyuanVideo-1.5 architecture ({key}={expected!r})"
                )
        kwargs = {k: v for k, v in raw.items() if k in fields}
        for key in ("patch_size", "rope_dim_list"):
            if key in kwargs:
                kwargs[key] = tuple(int(v) for v in kwargs[key])
        param = kwargs.pop("attn_param", None)  # a dense model has no use for it
        if kwargs.get("attn_mode") == SPARSE_ATTN_MODE and param is not None:
            if not isinstance(param, dict):
                raise ValueError(f"{source}: attn_param must be an object (or null for the defaults), got {param!r}")
            kwargs["attn_param"] = SparseAttention.from_official(param, source)
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> DiTConfig:
        """Read an official (or diffusers) transformer ``config.json``."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no such config file") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    def to_official_dict(self) -> dict[str, Any]:
        """The official config.json content for this configuration."""
        out: dict[str, Any] = {"_class_name": "HunyuanVideo_1_5_DiffusionTransformer"}
        out.update(_FIXED_OFFICIAL)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["attn_param"] = self.attn_param.to_official() if self.attn_param else None
        return dict(sorted(out.items()))


def _is_diffusers_config(raw: dict[str, Any]) -> bool:
    return raw.get("_class_name") == "HunyuanVideo15Transformer3DModel" or "num_attention_heads" in raw


def _diffusers_to_official_config(raw: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(k for k in raw if k not in _DIFFUSERS_KEYS and not k.startswith("_"))
    if unknown:
        raise ValueError(
            f"unknown diffusers config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(_DIFFUSERS_KEYS))}"
        )
    out: dict[str, Any] = {}
    if "in_channels" in raw:
        if (raw["in_channels"] - 1) % 2:
            raise ValueError(f"diffusers in_channels {raw['in_channels']} is not 2 * latent_channels + 1")
        out["in_channels"] = (raw["in_channels"] - 1) // 2
    heads = raw.get("num_attention_heads", 16)
    out["heads_num"] = heads
    out["hidden_size"] = heads * raw.get("attention_head_dim", 128)
    if "qk_norm" in raw and raw["qk_norm"] != "rms_norm":
        raise ValueError(f"unsupported diffusers qk_norm={raw['qk_norm']!r} (expected 'rms_norm')")
    if "target_size" in raw:
        if raw["target_size"] not in _TARGET_SIZE_TO_RESOLUTION:
            raise ValueError(f"unsupported diffusers target_size={raw['target_size']!r}")
        out["ideal_resolution"] = _TARGET_SIZE_TO_RESOLUTION[raw["target_size"]]
    renames = {
        "out_channels": "out_channels", "num_layers": "mm_double_blocks_depth",
        "num_refiner_layers": "refiner_depth", "mlp_ratio": "mlp_width_ratio",
        "text_embed_dim": "text_states_dim", "text_embed_2_dim": "byt5_states_dim",
        "image_embed_dim": "vision_states_dim", "rope_theta": "rope_theta",
        "rope_axes_dim": "rope_dim_list", "task_type": "ideal_task", "use_meanflow": "use_meanflow",
    }
    out.update({official: raw[key] for key, official in renames.items() if key in raw})
    if "patch_size" in raw or "patch_size_t" in raw:
        p, pt = raw.get("patch_size", 1), raw.get("patch_size_t", 1)
        out["patch_size"] = (pt, p, p)
    return out


_RELEASED = DiTConfig()
PRESETS: dict[str, DiTConfig] = {
    "480p_t2v": _RELEASED,
    "480p_i2v": dataclasses.replace(_RELEASED, ideal_task="i2v"),
    "720p_t2v": dataclasses.replace(_RELEASED, ideal_resolution="720p"),
    "720p_i2v": dataclasses.replace(_RELEASED, ideal_resolution="720p", ideal_task="i2v"),
    "480p_i2v_step_distilled": dataclasses.replace(_RELEASED, ideal_task="i2v", use_meanflow=True),
    # CFG-distilled: the same architecture (sampling defaults differ, pipeline.SAMPLING_DEFAULTS)
    "480p_t2v_distilled": _RELEASED,
    "480p_i2v_distilled": dataclasses.replace(_RELEASED, ideal_task="i2v"),
    "720p_t2v_distilled": dataclasses.replace(_RELEASED, ideal_resolution="720p"),
    "720p_i2v_distilled": dataclasses.replace(_RELEASED, ideal_resolution="720p", ideal_task="i2v"),
    # CFG-distilled and trained for SSTA
    "720p_t2v_distilled_sparse": dataclasses.replace(
        _RELEASED, ideal_resolution="720p", attn_mode=SPARSE_ATTN_MODE, attn_param=SparseAttention()),
    "720p_i2v_distilled_sparse": dataclasses.replace(
        _RELEASED, ideal_resolution="720p", ideal_task="i2v", attn_mode=SPARSE_ATTN_MODE,
        attn_param=SparseAttention()),
    # Super-resolution (official transformer/<version>/config.json): the base architecture with the
    # LR condition in its input, meanflow (it sees the next timestep too), dense attention, for t2v
    # and i2v alike. The 720p file is public; the 1080p one is the same model at 1080p (see
    # README.md, "Super-resolution").
    "720p_sr_distilled": dataclasses.replace(
        _RELEASED, in_channels=98, concat_condition=False, use_meanflow=True, ideal_resolution="720p",
        ideal_task=None),
    "1080p_sr_distilled": dataclasses.replace(
        _RELEASED, in_channels=98, concat_condition=False, use_meanflow=True, ideal_resolution="1080p",
        ideal_task=None),
    # Small enough that a forward runs in milliseconds on a laptop CPU, with 8 heads so that
    # every sharding strategy can split it over 8 devices; serves both t2v and i2v, at the
    # small "96p" buckets by default.
    "tiny": DiTConfig(
        ideal_task=None,
        ideal_resolution="96p",
        hidden_size=128,
        heads_num=8,
        rope_dim_list=(4, 6, 6),
        mm_double_blocks_depth=2,
        text_states_dim=64,
        vision_states_dim=48,
        byt5_states_dim=32,
        byt5_hidden_dim=64,
    ),
}
# The tiny model with SSTA at tiles small enough that its canvases have several per axis (a
# 3 x 3 x 3 window over a grid of at most 3 tiles per axis would attend every block).
PRESETS["tiny_sparse"] = dataclasses.replace(
    PRESETS["tiny"], attn_mode=SPARSE_ATTN_MODE, attn_param=SparseAttention(tile_size=(1, 2, 2), ssta_topk=4))


# The tiny model as an SR DiT, from the tiny preset's 96p canvases to "144p".
PRESETS["tiny_sr"] = dataclasses.replace(PRESETS["tiny"], in_channels=98, concat_condition=False,
                                         use_meanflow=True, ideal_resolution="144p")


def widened_tiny(hidden_size: int, depth: int) -> DiTConfig:
    """The tiny preset at another width and depth (8 heads; RoPE split like the released
    model's 16/56/56 of 128), for benchmarks that need the blocks to dominate."""
    head = hidden_size // PRESETS["tiny"].heads_num
    spatial = 3 * head // 8
    return dataclasses.replace(
        PRESETS["tiny"], hidden_size=hidden_size, mm_double_blocks_depth=depth,
        rope_dim_list=(head - 2 * spatial, spatial, spatial),
    )
