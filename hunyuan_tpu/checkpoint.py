"""Transformer checkpoints: safetensors in and out, official or diffusers naming.

Accepted layouts: one ``.safetensors`` file; a folder with a ``*.safetensors.index.json``
and its shards; a folder with a single ``.safetensors`` file. Nothing is ever unpickled.
Every failure is a ``CheckpointError`` whose message names the file or the tensors at fault.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

from .config import PRESETS, DiTConfig
from .files import InputError, read_safetensors, save_safetensors, write_json
from .model import HunyuanVideo15DiT
from .naming import diffusers_to_official, is_diffusers_naming, official_to_diffusers

__all__ = [
    "CheckpointError", "checkpoint_config", "checkpoint_files", "check_state_dict", "diffusers_to_official",
    "infer_config", "load_transformer", "official_to_diffusers", "parameter_count", "read_tensors",
    "save_transformer",
]

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"


class CheckpointError(InputError):
    """A checkpoint that cannot be read or does not fit the model."""


def _pickle_error(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: pickled checkpoints are not loaded (they can run arbitrary code); convert it to "
        "safetensors first, e.g. safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')"
    )


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files that make up the checkpoint at ``path``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix in _PICKLE_SUFFIXES:
            raise _pickle_error(path)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: not a .safetensors file")
        return [path]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{path}: several index files ({', '.join(p.name for p in indexes)}); keep one")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{indexes[0]}: not a safetensors index (needs a 'weight_map'): {e}") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{indexes[0]}: shard file(s) missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files
    if len(files) > 1:
        raise CheckpointError(f"{path}: {len(files)} .safetensors files and no *.safetensors.index.json")
    pickled = [p for p in sorted(path.iterdir()) if p.suffix in _PICKLE_SUFFIXES]
    if pickled:
        raise _pickle_error(pickled[0])
    raise CheckpointError(f"{path}: no .safetensors file in this folder")


def read_tensors(files: list[Path], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the given safetensors files, cast to ``dtype`` one at a time."""
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        shard, _ = read_safetensors(file, dtype, error=CheckpointError)
        duplicated = [name for name in shard if name in tensors]
        if duplicated:
            raise CheckpointError(f"{file}: tensor {duplicated[0]} also appears in another shard")
        tensors.update(shard)
    return tensors


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{len(names)} ({shown}{', ...' if len(names) > limit else ''})"


@functools.cache
def _expected_shapes(config: DiTConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in HunyuanVideo15DiT(config).state_dict().items()}


def check_state_dict(state: dict[str, torch.Tensor], config: DiTConfig, source: str) -> None:
    """Raise one CheckpointError listing missing, unexpected and mis-shaped tensors, if any."""
    expected = _expected_shapes(config)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(state[k].shape)} != {tuple(shape)}"
        for k, shape in expected.items() if k in state and state[k].shape != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listing(unexpected)}")
    if misshaped:
        problems.append(f"wrong shape {_listing(misshaped, 3)}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not fit the model: " + "; ".join(problems))


def infer_config(shapes: dict[str, torch.Size], hint: str = "") -> DiTConfig:
    """The preset whose parameter shapes equal ``shapes``; ties (t2v/i2v, 480p/720p share
    shapes) go to the preset named in ``hint`` (usually the path), else the first listed."""
    matches = [name for name, cfg in PRESETS.items() if _expected_shapes(cfg) == shapes]
    if not matches:
        raise CheckpointError(
            f"{hint or 'checkpoint'}: tensor shapes match no preset ({', '.join(PRESETS)}); "
            "pass a config or put the transformer config.json beside the weights"
        )
    named = [name for name in matches if name in hint]
    return PRESETS[max(named, key=len) if named else matches[0]]


def _config_beside(path: Path) -> Path | None:
    folder = path if path.is_dir() else path.parent
    candidate = folder / "config.json"
    return candidate if candidate.is_file() else None


def _header_shapes(files: list[Path]) -> dict[str, torch.Size]:
    """Official-named tensor shapes from safetensors headers alone (no tensor data is read)."""
    from safetensors import safe_open

    shapes: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes.update({name: torch.empty(f.get_slice(name).get_shape(), device="meta") for name in f.keys()})
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read safetensors header (truncated or corrupt?): {e}") from None
    if is_diffusers_naming(shapes):
        shapes = diffusers_to_official(shapes)
    return {k: v.shape for k, v in shapes.items()}


def checkpoint_config(path: str | Path) -> DiTConfig:
    """The configuration of the checkpoint at ``path`` without loading its weights: the
    ``config.json`` beside the weights if there is one, else the preset matching its shapes."""
    path = Path(path)
    files = checkpoint_files(path)
    beside = _config_beside(path)
    if beside:
        try:
            return DiTConfig.from_json(beside)
        except ValueError as e:
            raise CheckpointError(f"transformer config beside the weights: {e}") from None
    return infer_config(_header_shapes(files), hint=str(path.resolve()))


def load_transformer(
    path: str | Path, config: DiTConfig | None = None, dtype: torch.dtype = torch.bfloat16
) -> HunyuanVideo15DiT:
    """Load a transformer checkpoint (official or diffusers names) into ``HunyuanVideo15DiT``.

    Without ``config``: the ``config.json`` beside the weights if there is one, otherwise the
    preset whose shapes match. The model is built on the meta device and takes the loaded
    tensors as its parameters, so the weights are held in memory once.
    """
    path = Path(path)
    config = config or checkpoint_config(path)
    state = read_tensors(checkpoint_files(path), dtype)
    if is_diffusers_naming(state):
        state = diffusers_to_official(state)
    check_state_dict(state, config, str(path))
    with torch.device("meta"):
        model = HunyuanVideo15DiT(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def save_transformer(model: HunyuanVideo15DiT, path: str | Path, max_shard_bytes: int | None = None) -> Path:
    """Save official-named weights: a ``.safetensors`` path writes that one file; any other
    path is a folder that receives ``config.json`` and the weights, sharded with an index
    when they exceed ``max_shard_bytes``. Every file is written under a temporary name first."""
    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(state, path)
        return path
    path.mkdir(parents=True, exist_ok=True)
    total = sum(t.numel() * t.element_size() for t in state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_safetensors(state, path / WEIGHTS_NAME)
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in state.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        stem = WEIGHTS_NAME.removesuffix(".safetensors")
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, path / file)
            weight_map.update(dict.fromkeys(shard, file))
        write_json(path / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(path / "config.json", model.config.to_official_dict())
    return path


def parameter_count(config: DiTConfig) -> int:
    """Number of parameters of the model for ``config`` (computed on the meta device)."""
    return sum(math.prod(s) for s in _expected_shapes(config).values())
