"""Checkpoint loading and saving on small checkpoints with the official names."""

import errno
import json
import resource
import signal

import pytest
import torch
from safetensors.torch import save_file

from hunyuan_tpu.checkpoint import CheckpointError, infer_config, load_transformer, save_transformer
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.model import HunyuanVideo15DiT
from hunyuan_tpu.naming import official_to_diffusers
from hunyuan_tpu.random_init import randomize_like_trained_


@pytest.fixture(scope="module")
def model() -> HunyuanVideo15DiT:
    return randomize_like_trained_(HunyuanVideo15DiT(DiTConfig.preset("tiny")), seed=7)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


def test_folder_with_config_round_trip(model, tmp_path):
    save_transformer(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"
    ]
    loaded = load_transformer(tmp_path / "ckpt", dtype=torch.float32)
    assert loaded.config == model.config and _same_weights(model, loaded)


def test_single_file_infers_the_preset(model, tmp_path):
    path = save_transformer(model, tmp_path / "weights.safetensors")
    loaded = load_transformer(path, dtype=torch.float32)
    assert loaded.config == DiTConfig.preset("tiny") and _same_weights(model, loaded)


def test_dtype_is_applied(model, tmp_path):
    loaded = load_transformer(save_transformer(model, tmp_path / "w.safetensors"))
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_sharded_folder_with_index(model, tmp_path):
    save_transformer(model, tmp_path / "sharded", max_shard_bytes=200_000)
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert _same_weights(model, load_transformer(tmp_path / "sharded", dtype=torch.float32))


def test_diffusers_names_are_detected(model, tmp_path):
    folder = tmp_path / "diffusers"
    folder.mkdir()
    save_file(official_to_diffusers(model.state_dict()), str(folder / "model.safetensors"))
    assert _same_weights(model, load_transformer(folder, config=model.config, dtype=torch.float32))


def test_preset_hint_from_path(tmp_path):
    with torch.device("meta"):
        shapes_only = HunyuanVideo15DiT(DiTConfig.preset("720p_i2v"))
    shapes = {k: v.shape for k, v in shapes_only.state_dict().items()}
    assert infer_config(shapes, hint="/ckpts/transformer/720p_i2v/model.safetensors") == DiTConfig.preset("720p_i2v")
    assert infer_config(shapes, hint="/somewhere/else") == DiTConfig.preset("480p_t2v")


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_pickles_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickled checkpoints are not loaded.*convert it to safetensors"):
        load_transformer(path)
    with pytest.raises(CheckpointError, match=f"model{suffix}: pickled"):
        load_transformer(tmp_path)


def test_mismatched_tensors_are_listed_together(model, tmp_path):
    state = dict(model.state_dict())
    del state["final_layer.linear.bias"], state["double_blocks.1.img_mlp.fc2.weight"]
    state["double_blocks.0.img_attn_q.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        load_transformer(path, config=model.config)
    message = str(err.value)
    assert "bad.safetensors" in message
    assert "missing 2 (" in message and "final_layer.linear.bias" in message
    assert "unexpected 1 (extra.weight)" in message
    assert "wrong shape 1 (double_blocks.0.img_attn_q.weight (3, 3) != (128, 128))" in message


def test_no_preset_matches(model, tmp_path):
    state = dict(model.state_dict())
    del state["final_layer.linear.bias"]
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="odd.safetensors: tensor shapes match no preset"):
        load_transformer(path)


def test_truncated_file_is_named(model, tmp_path):
    path = save_transformer(model, tmp_path / "full.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors: cannot read safetensors"):
        load_transformer(cut)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="garbage.safetensors: cannot read"):
        load_transformer(garbage)


def test_index_with_missing_shard(model, tmp_path):
    folder = save_transformer(model, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (folder / victim).unlink()
    with pytest.raises(CheckpointError, match=f"shard file\\(s\\) missing: {victim}"):
        load_transformer(folder)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_transformer(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no .safetensors file"):
        load_transformer(tmp_path)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"x": torch.zeros(1)}, str(two / name))
    with pytest.raises(CheckpointError, match="2 .safetensors files and no"):
        load_transformer(two)


def test_save_leaves_no_temporary_files(model, tmp_path):
    save_transformer(model, tmp_path / "out", max_shard_bytes=200_000)
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]


def test_safetensors_written_a_tensor_at_a_time(tmp_path):
    """files.safetensors_writer: what safetensors reads back, bfloat16 and 0-d included; a tensor
    out of order or one never written leaves no file."""
    import ml_dtypes
    import numpy as np
    from safetensors import safe_open

    from hunyuan_tpu.files import safetensors_writer

    tensors = {"b.weight": np.arange(15, dtype=np.float32).reshape(3, 5),
               "a.bias": np.linspace(-1, 1, 7).astype(ml_dtypes.bfloat16), "count": np.array(3, np.int32)}
    layout = {k: (v.shape, v.dtype) for k, v in tensors.items()}
    path = tmp_path / "w.safetensors"
    with safetensors_writer(path, layout, {"note": "x"}) as write:
        for name, value in tensors.items():
            write(name, value)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"note": "x", "format": "pt"}
        read = {k: f.get_tensor(k) for k in f.keys()}
    assert read["b.weight"].numpy().tolist() == tensors["b.weight"].tolist()
    assert read["a.bias"].dtype == torch.bfloat16
    assert read["a.bias"].float().numpy().tolist() == tensors["a.bias"].astype(np.float32).tolist()
    assert read["count"].shape == () and int(read["count"]) == 3

    for bad in ("order", "missing"):
        target = tmp_path / f"{bad}.safetensors"
        with pytest.raises(ValueError, match="tensor count .* written where the layout has b.weight"
                           if bad == "order" else "tensors never written: count"):
            with safetensors_writer(target, layout) as write:
                if bad == "order":
                    write("count", tensors["count"])
                write("b.weight", tensors["b.weight"])
                write("a.bias", tensors["a.bias"])
        assert not target.exists() and not list(tmp_path.glob(f".{bad}*"))

    # a full disk (a file-size limit here, its signal ignored so that the write fails instead)
    target = tmp_path / "full.safetensors"
    previous, limits = signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
    try:
        with pytest.raises(OSError) as raised:
            with safetensors_writer(target, {"big": ((64, 64), np.float32)}) as write:
                write("big", np.zeros((64, 64), np.float32))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert raised.value.filename == str(target) and raised.value.errno == errno.EFBIG
    assert not target.exists() and not list(tmp_path.glob(".full*"))
