import dataclasses
import json

import pytest

from hunyuan_tpu.config import DiTConfig

# The released transformer/480p_t2v/config.json (official key names).
OFFICIAL_480P_T2V = {
    "_class_name": "HunyuanVideo_1_5_DiffusionTransformer",
    "attn_mode": "flash",
    "attn_param": None,
    "concat_condition": True,
    "glyph_byT5_v2": True,
    "guidance_embed": False,
    "heads_num": 16,
    "hidden_size": 2048,
    "ideal_resolution": "480p",
    "ideal_task": "t2v",
    "in_channels": 32,
    "is_reshape_temporal_channels": False,
    "mlp_act_type": "gelu_tanh",
    "mlp_width_ratio": 4,
    "mm_double_blocks_depth": 54,
    "mm_single_blocks_depth": 0,
    "out_channels": 32,
    "patch_size": [1, 1, 1],
    "qk_norm": True,
    "qk_norm_type": "rms",
    "qkv_bias": True,
    "rope_dim_list": [16, 56, 56],
    "rope_theta": 256,
    "text_pool_type": None,
    "text_projection": "single_refiner",
    "text_states_dim": 3584,
    "text_states_dim_2": None,
    "use_attention_mask": True,
    "use_cond_type_embedding": True,
    "use_meanflow": False,
    "vision_projection": "linear",
    "vision_states_dim": 1152,
}


def test_presets():
    names = DiTConfig.preset_names()
    for name in ("480p_t2v", "480p_i2v", "720p_t2v", "720p_i2v", "480p_i2v_step_distilled", "tiny"):
        assert name in names
    released = DiTConfig.preset("720p_i2v")
    assert (released.hidden_size, released.heads_num, released.mm_double_blocks_depth) == (2048, 16, 54)
    assert released.img_in_channels == 65 and released.head_dim == 128 and released.mlp_hidden_dim == 8192
    assert (released.ideal_resolution, released.ideal_task) == ("720p", "i2v")
    assert DiTConfig.preset("480p_i2v_step_distilled").use_meanflow
    assert not DiTConfig.preset("480p_i2v").use_meanflow
    tiny = DiTConfig.preset("tiny")
    assert tiny.heads_num == 8 and tiny.hidden_size % 8 == 0


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*480p_t2v.*tiny"):
        DiTConfig.preset("huge")


def test_from_json_reads_official_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(OFFICIAL_480P_T2V))
    assert DiTConfig.from_json(path) == DiTConfig.preset("480p_t2v")
    path.write_text(json.dumps({**OFFICIAL_480P_T2V, "ideal_resolution": "720p"}))
    assert DiTConfig.from_json(path) == DiTConfig.preset("720p_t2v")


def test_official_dict_round_trip(tmp_path):
    for name in DiTConfig.preset_names():
        cfg = DiTConfig.preset(name)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg.to_official_dict()))
        assert DiTConfig.from_json(path) == cfg


def test_from_json_reads_diffusers_config(tmp_path):
    diffusers_cfg = {
        "_class_name": "HunyuanVideo15Transformer3DModel", "_diffusers_version": "0.42.1",
        "in_channels": 65, "out_channels": 32, "num_attention_heads": 16, "attention_head_dim": 128,
        "num_layers": 54, "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 1, "patch_size_t": 1,
        "qk_norm": "rms_norm", "text_embed_dim": 3584, "text_embed_2_dim": 1472, "image_embed_dim": 1152,
        "rope_theta": 256.0, "rope_axes_dim": [16, 56, 56], "target_size": 960, "task_type": "i2v",
        "use_meanflow": False,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(diffusers_cfg))
    assert DiTConfig.from_json(path) == DiTConfig.preset("720p_i2v")


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**OFFICIAL_480P_T2V, "hiden_size": 3}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) hiden_size; valid keys: .*hidden_size"):
        DiTConfig.from_json(path)


def test_unsupported_architecture_is_rejected(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**OFFICIAL_480P_T2V, "mm_single_blocks_depth": 40}))
    with pytest.raises(ValueError, match="unsupported mm_single_blocks_depth=40"):
        DiTConfig.from_json(path)


def test_bad_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        DiTConfig.from_json(path)
    with pytest.raises(ValueError, match="no such config file"):
        DiTConfig.from_json(tmp_path / "absent.json")


def test_replace_derives_and_validates():
    tiny = DiTConfig.preset("tiny")
    deeper = dataclasses.replace(tiny, mm_double_blocks_depth=4)
    assert deeper.mm_double_blocks_depth == 4 and deeper.hidden_size == tiny.hidden_size
    with pytest.raises(ValueError, match="rope_dim_list"):
        dataclasses.replace(tiny, heads_num=4)  # head_dim 32 no longer matches rope dims summing to 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.hidden_size = 1


# ---- attention: dense modes and SSTA -------------------------------------------------------------

def _sparse_official(**attn_param) -> dict:
    return {**OFFICIAL_480P_T2V, "ideal_resolution": "720p", "attn_mode": "flex-block-attn",
            "attn_param": attn_param or None}


def test_sparse_config_reads_with_official_defaults(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_sparse_official()))
    assert DiTConfig.from_json(path) == DiTConfig.preset("720p_t2v_distilled_sparse")
    sparse = DiTConfig.from_dict(_sparse_official(ssta_topk=16, win_size=[[3, 5, 5]], win_type="hybrid",
                                                  attn_use_text_mask=0, thw=[31, 45, 80])).attn_param
    assert (sparse.ssta_topk, sparse.win_size, sparse.win_type) == (16, (3, 5, 5), "hybrid")
    assert not sparse.attn_use_text_mask
    assert sparse.tile_size == (6, 8, 8) and sparse.ssta_lambda == 0.7 and not sparse.attn_mask_share_within_head
    for mode in ("flash", "flash2", "flash3", "torch", "sageattn"):  # dense: any attn_param is unused
        cfg = DiTConfig.from_dict({**OFFICIAL_480P_T2V, "attn_mode": mode, "attn_param": {"ssta_topk": 3}})
        assert cfg.sparse is None and cfg.attn_mode == mode


@pytest.mark.parametrize("key,value", [
    ("attn_sparse_type", "sta"), ("ssta_sampling_type", "similarity"), ("ssta_threshold", 0.5),
    ("ssta_adaptive_pool", [2, 2, 2]), ("attn_pad_type", "repeat"), ("win_type", "sliding"),
])
def test_unimplemented_sparse_settings_are_refused(key, value):
    with pytest.raises(ValueError, match=f"cfg.json: .*{key}"):
        DiTConfig.from_dict(_sparse_official(**{key: value}), source="cfg.json")


def test_bad_attention_keys_are_named():
    with pytest.raises(ValueError, match="unknown attn_param key.*ssta_top_k"):
        DiTConfig.from_dict(_sparse_official(ssta_top_k=3))
    with pytest.raises(ValueError, match="attn_mode 'flex' is not one of"):
        DiTConfig.from_dict({**OFFICIAL_480P_T2V, "attn_mode": "flex"})
    with pytest.raises(ValueError, match="attn_param must be an object"):
        DiTConfig.from_dict({**_sparse_official(), "attn_param": [6, 8, 8]})
    with pytest.raises(ValueError, match="tile_size must be 3 positive integers"):
        DiTConfig.from_dict(_sparse_official(tile_size=[6, 8]))


def test_sparse_config_round_trip_and_dense_view():
    cfg = DiTConfig.preset("720p_i2v_distilled_sparse")
    official = cfg.to_official_dict()
    assert official["attn_mode"] == "flex-block-attn" and official["attn_param"]["win_size"] == [[3, 3, 3]]
    assert official["attn_param"]["attn_use_text_mask"] == 1
    assert official["attn_param"]["ssta_sampling_type"] == "importance"
    assert DiTConfig.from_dict(official) == cfg
    assert cfg.dense() == DiTConfig.preset("720p_i2v_distilled")
    assert cfg.dense().to_official_dict()["attn_param"] is None
    for name in ("480p_t2v_distilled", "480p_i2v_distilled", "720p_t2v_distilled", "720p_i2v_distilled"):
        assert DiTConfig.preset(name).sparse is None
