"""Full-size models built on the meta device (no memory) against the released checkpoint's list."""

import json
from pathlib import Path

import torch

from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.model import HunyuanVideo15DiT

OFFICIAL = json.loads((Path(__file__).parent / "data" / "hunyuanvideo15_official_params.json").read_text())


def _shapes(preset: str) -> dict[str, list[int]]:
    with torch.device("meta"):
        model = HunyuanVideo15DiT(DiTConfig.preset(preset))
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def test_720p_matches_official_names_and_shapes():
    shapes = _shapes("720p_t2v")
    assert len(shapes) == 1793 == len(OFFICIAL["params"])
    assert shapes == OFFICIAL["params"]
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 8_326_608_160 == OFFICIAL["total_parameters"]


def test_all_released_presets_share_the_architecture():
    reference = _shapes("720p_t2v")
    for preset in ("480p_t2v", "480p_i2v", "720p_i2v"):
        assert _shapes(preset) == reference


def test_step_distilled_adds_time_r_in():
    shapes = _shapes("480p_i2v_step_distilled")
    extra = {k: v for k, v in shapes.items() if k not in OFFICIAL["params"]}
    assert extra == {
        k.replace("time_in", "time_r_in"): OFFICIAL["params"][k]
        for k in ("time_in.mlp.0.weight", "time_in.mlp.0.bias", "time_in.mlp.2.weight", "time_in.mlp.2.bias")
    }
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 8_331_330_848
