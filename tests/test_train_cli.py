"""Training runs end to end (in-process): the NaN stop, bad input, and a trained LoRA file driving
stage 2. The kill -9 and resume test is in test_multiprocess.py, on 2 processes."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from safetensors.torch import load_file

import cli_runner
from hunyuan_tpu import train_loop
from hunyuan_tpu.checkpoint import save_transformer
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.dataset import DataOrder, write_dataset
from hunyuan_tpu.files import InputError
from hunyuan_tpu.lora import LoRASpec
from hunyuan_tpu.metrics import rel_l2
from hunyuan_tpu.model import HunyuanVideo15DiT
from hunyuan_tpu.random_init import randomize_like_trained_
from hunyuan_tpu.synthetic import training_samples
from hunyuan_tpu.train_loop import RunSettings
from hunyuan_tpu.training import OptimizerSettings
from hunyuan_tpu.training_checkpoint import Checkpoints

TRAIN = "train.py"
STAGE2 = "stage2_transformer.py"
CFG = DiTConfig.preset("tiny")
ONE_BLOCK = dataclasses.replace(CFG, mm_double_blocks_depth=1)
# Small and fast: AdamW (Muon's update compiles slower on CPU), float32, 2 samples per update.
BASE = ["--dtype", "float32", "--optimizer", "adamw", "--learning_rate", "1e-3", "--batch_size", "2",
        "--no-gradient_checkpointing"]


@pytest.fixture(scope="module")
def one_block(tmp_path_factory) -> Path:
    """A one-block checkpoint (config.json beside it): the CLI's --model, at half the compile."""
    model = randomize_like_trained_(HunyuanVideo15DiT(ONE_BLOCK), seed=0)
    return save_transformer(model, tmp_path_factory.mktemp("model") / "one_block")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    samples, empty = training_samples(CFG, count=8, latent=(3, 4, 6), seed=3)
    return write_dataset(tmp_path_factory.mktemp("data"), samples, shard_size=4, empty_prompt=empty)


def test_nan_loss_stops_with_the_last_checkpoint_intact(tmp_path):
    samples, _ = training_samples(CFG, count=8, latent=(3, 4, 6), seed=3)
    extreme = DataOrder((8,), 2, seed=0).indices(2)[0]  # drawn first by the third update
    samples["latents"][extreme] *= 1e30  # finite, but its loss overflows
    folder = write_dataset(tmp_path / "data", samples)
    out = tmp_path / "run"
    settings = RunSettings(data=folder, output_dir=out, dtype=torch.float32, batch_size=2, remat=False, seed=0,
                           optimizer=OptimizerSettings(name="adamw", total_steps=40), checkpoint_every=1)
    with pytest.raises(InputError, match=r"update 3: the loss is inf; stopping. The last checkpoint, .*step_000002, "
                                         r"is intact"):
        train_loop.train(settings, ONE_BLOCK, log=lambda m: None)
    with Checkpoints(out / "checkpoints", keep=3) as checkpoints:
        assert checkpoints.latest() == 2
        position = checkpoints.read_position(2)
    assert (position.step, position.data_position) == (2, 2)
    saved = ocp.StandardCheckpointer().restore((out / "checkpoints" / "step_000002" / "state").absolute())
    assert all(np.isfinite(np.asarray(t)).all() for t in jax.tree.leaves(saved))
    assert not (out / "final").exists()
    with pytest.raises(InputError, match="a checkpoint of an earlier run; pass resume to continue it"):
        train_loop.train(settings, ONE_BLOCK, log=lambda m: None)
    with pytest.raises(InputError, match=r"step_000002: saved by a run with other settings or data; drop resume"):
        train_loop.train(dataclasses.replace(settings, resume=True, seed=1), ONE_BLOCK, log=lambda m: None)
    # what a kill part-way through writing step 3 leaves is not a checkpoint (the next save removes it:
    # test_multiprocess's kill test)
    (out / "checkpoints" / "step_000003.orbax-checkpoint-tmp-1764650000000000" / "state").mkdir(parents=True)
    with Checkpoints(out / "checkpoints", keep=3) as checkpoints:
        assert checkpoints.latest() == 2


def test_checkpoint_of_an_older_version_is_refused_by_name(tmp_path):
    """This project's checkpoints before orbax (safetensors files and state.json)."""
    old = tmp_path / "checkpoints" / "step_000008"
    old.mkdir(parents=True)
    (old / "state.json").write_text(json.dumps({"step": 8, "data_position": 8, "seed": 0, "fingerprint": "x"}))
    (old / "trainable.safetensors").write_bytes(b"")
    with Checkpoints(tmp_path / "checkpoints", keep=3) as checkpoints:
        assert checkpoints.latest() == 8
        with pytest.raises(InputError, match=r"step_000008: not a training checkpoint of this version"):
            checkpoints.read_position(8)


def test_bad_input_is_one_line(data, one_block, tmp_path):
    cases = [
        (["--data", tmp_path / "none"], "no such dataset folder"),
        (["--data", data, "--lora", "--lora_targets", "nothing_matches"], "matches no linear layer"),
        (["--data", data, "--i2v_prob", "2"], "--i2v_prob 2.0 must be between 0 and 1"),
        (["--demo", "--batch_size", "0"], "--batch_size must be >= 1"),  # before the demo writes its data
        (["--demo"], "--warmup_steps 10 (--demo's) is more than --max_steps 1"),  # the demo's hidden default named
        (["--demo", "--warmup_steps", "0", "--batch_size", "100"], "--batch_size 100 is more than the --demo set's 16"),
        (["--data", data, "--max_grad_norm", "-1"], "--max_grad_norm -1.0 must be >= 0 (0: off)"),
        (["--data", data, "--learning_rate", "nan"], "argument --learning_rate: 'nan' is not a finite number"),
    ]
    for extra, message in cases:
        proc = cli_runner.call(TRAIN, *BASE, "--model", one_block, *extra, "--output_dir", tmp_path / "out",
                               "--max_steps", 1, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (extra, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def test_lora_file_drives_stage2(data, tmp_path):
    """A trained adapter file (the official trainer's format) changes stage 2's result exactly
    as merging it into the weights by hand does."""
    settings = RunSettings(data=data, output_dir=tmp_path / "lora_run", dtype=torch.float32, batch_size=2,
                           lora=LoRASpec(rank=4), optimizer=OptimizerSettings(learning_rate=5e-2, total_steps=4))
    adapter = train_loop.train(settings, CFG, log=lambda m: None).final
    assert adapter.name == "pytorch_lora_weights.safetensors"
    tensors = load_file(str(adapter))
    assert tensors and all(k.startswith("double_blocks.") and ".lora_" in k for k in tensors)
    assert tensors["double_blocks.0.img_attn_q.lora_B.weight"].abs().max() > 0  # trained away from B = 0

    demo = tmp_path / "with_lora"
    cli_runner.call(STAGE2, "--demo", "--output_dir", demo, "--lora", adapter, "--num_inference_steps", 3,
                    "--dtype", "float32")
    with_lora = load_file(str(demo / "latents.safetensors"))["latents"].numpy()
    record = json.loads((demo / "config.json").read_text())["stage2"]
    assert record["lora"] == str(adapter) and record["lora_scale"] == 1.0

    model = randomize_like_trained_(HunyuanVideo15DiT(CFG), seed=0)  # what --model tiny builds
    state = model.state_dict()
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." in key:
                module = key.removesuffix(".lora_A.weight")
                state[module + ".weight"] += (16.0 / 4) * tensors[module + ".lora_B.weight"] @ a
    model.load_state_dict(state)
    merged = save_transformer(model, tmp_path / "merged.safetensors")
    cli_runner.call(STAGE2, "--input_dir", demo, "--output_dir", tmp_path / "by_hand", "--model", merged,
                    "--num_inference_steps", 3, "--dtype", "float32")
    by_hand = load_file(str(tmp_path / "by_hand" / "latents.safetensors"))["latents"].numpy()
    assert rel_l2(with_lora, by_hand) <= 1e-5
