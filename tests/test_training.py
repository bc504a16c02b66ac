"""Training: the objective, gradients against eager PyTorch autograd, remat, overfitting, the
sharded step against one device, and the data reader."""

import contextlib
import dataclasses
import functools
import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.ad_checkpoint import print_saved_residuals

from hunyuan_tpu import lora as lora_lib
from hunyuan_tpu import objective as obj
from hunyuan_tpu import parallel
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.dataset import DataError, DataOrder, TrainingData, write_dataset
from hunyuan_tpu.metrics import rel_l2
from hunyuan_tpu.model import HunyuanVideo15DiT
from hunyuan_tpu.params import meta_model, random_params
from hunyuan_tpu.random_init import randomize_like_trained_
from hunyuan_tpu.synthetic import training_samples
from hunyuan_tpu.training import OptimizerSettings, Trainer, accumulate, make_optimizer, step_key

CFG = DiTConfig.preset("tiny")
LATENT = (3, 4, 6)


@functools.cache
def samples(count: int = 8):
    return training_samples(CFG, count=count, latent=LATENT, seed=1)


def trainer(**kw) -> Trainer:
    defaults = dict(compute_dtype=jnp.float32, micro_batch=4)
    optimizer = kw.pop("optimizer", OptimizerSettings(name="adamw", learning_rate=1e-3, total_steps=100))
    return Trainer(CFG, kw.pop("objective", obj.Objective(i2v_prob=0.5)), optimizer, **{**defaults, **kw})


def batch(n: int = 4) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in samples()[0].items()}


# ---- the objective ---------------------------------------------------------------------------

def test_timesteps_are_squeezed_and_shifted():
    t = obj.sample_timesteps(jax.random.key(0), 10_000, "lognorm")
    assert float(t.min()) >= obj.T_EPS and float(t.max()) <= 1 - obj.T_EPS
    assert abs(float(jnp.median(t)) - 0.5) < 0.02  # sigmoid of a standard normal has median 1/2
    u = obj.sample_timesteps(jax.random.key(0), 10_000, "uniform")
    assert abs(float(u.mean()) - 0.5) < 0.02 and float(jnp.std(u)) > float(jnp.std(t))
    shifted = obj.shift_timesteps(jnp.array([0.0, 0.25, 0.5, 1.0]), 3.0)
    np.testing.assert_allclose(shifted, [0.0, 0.5, 0.75, 1.0], rtol=1e-6)


def test_i2v_condition_is_the_first_clean_frame():
    latents = jnp.asarray(batch(2)["latents"])
    cond = obj.condition_latents(latents, jnp.array([True, False]))
    assert cond.shape == (2, 33, *LATENT)
    np.testing.assert_array_equal(cond[0, :32, 0], latents[0, :, 0])
    assert float(jnp.abs(cond[0, :, 1:]).max()) == 0 and float(cond[0, 32, 0].min()) == 1.0
    assert float(jnp.abs(cond[1]).max()) == 0


def test_text_dropout_swaps_in_the_empty_prompt():
    data, empty = samples()
    b = {k: jnp.asarray(v) for k, v in batch(2).items()}
    d = obj.draw(jax.random.key(3), obj.Objective(), b["latents"].shape, i2v_capable=True)
    d = d._replace(drop_text=jnp.array([True, False]))
    inputs = obj.model_inputs(b, d, {k: jnp.asarray(v) for k, v in empty.items()}, jnp.float32)
    np.testing.assert_array_equal(inputs["text_states"][0], empty["prompt_embeds"][0])
    np.testing.assert_array_equal(inputs["text_states"][1], data["prompt_embeds"][1])
    np.testing.assert_array_equal(inputs["byt5_mask"][0], empty["prompt_mask_2"][0])


def test_masked_vision_tokens_equal_t2v():
    """A t2v sample in a mixed batch (vision_mask False) gives the image output of a t2v run."""
    model = randomize_like_trained_(HunyuanVideo15DiT(CFG), seed=2).eval()
    b = {k: torch.from_numpy(v) for k, v in batch(2).items()}
    x = torch.randn(2, 65, *LATENT, generator=torch.Generator().manual_seed(0))
    text = dict(t=torch.tensor([300.0, 700.0]), text_states=b["prompt_embeds"], text_mask=b["prompt_mask"],
                byt5_states=b["prompt_embeds_2"], byt5_mask=b["prompt_mask_2"])
    with torch.no_grad():
        t2v = model(x, **text)
        mask = torch.tensor([[False], [True]]).expand(2, 8)
        mixed = model(x, **text, vision_states=b["vision_states"], vision_mask=mask)
        i2v = model(x, **text, vision_states=b["vision_states"])
    assert rel_l2(mixed[0], t2v[0]) <= 1e-6 and rel_l2(mixed[1], i2v[1]) <= 1e-6
    assert rel_l2(i2v[0], t2v[0]) > 1e-3  # the vision tokens do matter when they count


# ---- gradients and the step ------------------------------------------------------------------

def _eager_loss_and_grads(params: dict, inputs: dict, d: obj.Draw, latents: np.ndarray):
    model = HunyuanVideo15DiT(CFG)
    model.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in params.items()})
    prediction = model(**{k: torch.tensor(np.asarray(v)) for k, v in inputs.items()})
    loss = ((prediction - (torch.tensor(np.asarray(d.noise)) - torch.from_numpy(latents))) ** 2).mean()
    loss.backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy() for k, p in model.named_parameters()}
    return loss.item(), grads


def test_gradients_match_eager_pytorch_autograd():
    """The step's jitted loss and gradients (remat on, a batch mixing t2v and i2v samples) equal
    eager PyTorch autograd on the same draw, parameter by parameter."""
    tr = trainer(remat=True)
    params = random_params(CFG, torch.float32, seed=5)
    b = {k: jnp.asarray(v) for k, v in batch().items()}
    key = step_key(0, 0)
    d = obj.draw(key, tr.objective, b["latents"].shape, i2v_capable=True)
    assert 0 < int(d.i2v.sum()) < 4
    eager_loss, eager_grads = _eager_loss_and_grads(params, obj.model_inputs(b, d, None, jnp.float32), d,
                                                    batch()["latents"])
    loss, grads = jax.jit(tr.gradients)(params, {}, b, None, key)
    assert abs(float(loss) - eager_loss) <= 1e-5 * eager_loss
    for name, g in eager_grads.items():
        if np.any(g):
            assert rel_l2(grads[name], g) <= 1e-4, name
        else:  # e.g. time_r_in of a model without meanflow
            assert not np.any(np.asarray(grads[name])), name


def test_remat_keeps_only_the_blocks_inputs():
    """Without remat the backward pass keeps each block's (B, L, F) MLP activations; with it,
    nothing of the MLP's width is kept. (The blocks run as a scan: what a block keeps is kept
    stacked over the blocks, with a leading layer axis.)"""
    params = random_params(CFG, torch.float32, seed=5)
    b = {k: jnp.asarray(v) for k, v in batch().items()}
    depth, width = CFG.mm_double_blocks_depth, CFG.mlp_hidden_dim
    mlp_hidden = {(depth, 4, 72, width), (depth, 4 * 72, width)}  # 72 = 3 x 4 x 6 image tokens

    def kept(remat: bool) -> set:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # one "f32[4,72,512] ..." line per residual
            print_saved_residuals(trainer(remat=remat).loss, params, {}, b, None, step_key(0, 0))
        return {tuple(int(n) for n in m.split(",") if n) for m in re.findall(r"^\w+\[([\d,]*)\]", out.getvalue(), re.M)}

    assert mlp_hidden & kept(False) and not mlp_hidden & kept(True)


def test_accumulation_averages_micro_batches():
    """Accumulating 3 micro-batches gives the mean loss and gradients of the three, each with
    its own key (a least-squares loss whose gradient is known)."""
    def value_and_grad(w, part, key):
        noise = jax.random.normal(key, ())
        residual = part["x"] @ w - part["y"] + noise
        return jnp.mean(residual ** 2), 2 * part["x"].T @ residual / len(residual)

    g = np.random.default_rng(0)
    b = {"x": jnp.asarray(g.normal(size=(6, 3)), jnp.float32), "y": jnp.asarray(g.normal(size=6), jnp.float32)}
    w, key = jnp.asarray([0.5, -1.0, 2.0]), jax.random.key(4)
    loss, grad = jax.jit(accumulate, static_argnums=(0, 4))(value_and_grad, w, b, key, 3)
    parts = [value_and_grad(w, {k: v[2 * i:2 * i + 2] for k, v in b.items()}, k)
             for i, k in enumerate(jax.random.split(key, 3))]
    np.testing.assert_allclose(loss, np.mean([p[0] for p in parts]), rtol=1e-6)
    np.testing.assert_allclose(grad, np.mean([p[1] for p in parts], axis=0), rtol=1e-5)
    assert accumulate(value_and_grad, w, b, key, 1)[0] == value_and_grad(w, b, key)[0]


def test_muon_as_the_official_optimizer():
    """Matrices (and the patch kernel) take Muon: the first update is the orthogonalised
    gradient scaled by 0.2 sqrt(max(out, in)) plus decoupled weight decay; vectors take AdamW."""
    rate, decay = 0.01, 0.1
    tx = make_optimizer(OptimizerSettings(name="muon", learning_rate=rate, weight_decay=decay, schedule="constant",
                                          max_grad_norm=0))
    g = np.random.default_rng(0)
    params = {"w": jnp.asarray(g.normal(size=(64, 16)), jnp.float32), "k": jnp.ones((8, 4, 1, 2, 2)),
              "b": jnp.ones((64,))}
    grads = {k: jnp.asarray(g.normal(size=v.shape), jnp.float32) for k, v in params.items()}
    updates, _ = tx.update(grads, tx.init(params), params)
    step = -(np.asarray(updates["w"]) + rate * decay * np.asarray(params["w"])) / (rate * 0.2 * 8.0)
    singular = np.linalg.svd(step, compute_uv=False)
    assert singular.min() > 0.6 and singular.max() < 1.25  # Newton-Schulz: all near 1
    assert np.sum(step * np.asarray(grads["w"])) > 0  # a descent direction
    kernel = -(np.asarray(updates["k"]) + rate * decay).reshape(8, 16) / (rate * 0.2 * 4.0)  # (out, in * 1 * 2 * 2)
    singular = np.linalg.svd(kernel, compute_uv=False)
    assert singular.min() > 0.6 and singular.max() < 1.25
    # AdamW (betas 0.95, 0.95) for vectors; optax applies Muon's Nesterov flag to it too, so the
    # first step is (1 + 0.95 * 0.05 / (1 - 0.95^2)) times the gradient's sign, plus decay
    nesterov = 1 + 0.95 * 0.05 / (1 - 0.95 ** 2)
    np.testing.assert_allclose(updates["b"], -rate * (nesterov * np.sign(grads["b"]) + decay), rtol=1e-3)


# ---- on a mesh -------------------------------------------------------------------------------

CFG1 = dataclasses.replace(CFG, mm_double_blocks_depth=1)  # one block: the same layouts, half the compile
# enough updates for one block to overfit four samples (test_overfits_four_samples)
ONE_BLOCK_OPTIMIZER = OptimizerSettings(name="adamw", learning_rate=5e-3, schedule="constant", total_steps=80)


@functools.cache
def one_step(layout: tuple[str, str] | None):
    """One update of the one-block model on ``layout`` (one device: None); the trainer is
    returned too, so that the overfitting test reuses its compiled one-device step."""
    placement = parallel.Placement()
    if layout is not None:
        placement = parallel.placement(CFG1, layout[0], layout[1], batch=4)
    tr = Trainer(CFG1, obj.Objective(i2v_prob=0.5), ONE_BLOCK_OPTIMIZER, compute_dtype=jnp.float32, micro_batch=4,
                 placement=placement)
    state = tr.init_state(random_params(CFG1, torch.float32, seed=5, shardings=tr.base_shardings))
    new_state, metrics = tr.step(state, {}, tr.place_batch(batch()), None, step_key(0, 0))
    return float(metrics["loss"]), {k: np.asarray(v) for k, v in new_state.trainable.items()}, new_state, tr


def test_overfits_four_samples():
    tr = one_step(None)[3]  # the sharded tests' one-device reference: its step compiles once for both
    state = tr.init_state(random_params(CFG1, torch.float32, seed=5))
    b = tr.place_batch(batch())
    losses = []
    for step in range(ONE_BLOCK_OPTIMIZER.total_steps):
        state, metrics = tr.step(state, {}, b, None, step_key(0, step))
        losses.append(float(metrics["loss"]))
    start, end = np.mean(losses[:5]), np.mean(losses[-5:])
    assert end < 0.3 * start, (start, end)


@pytest.mark.parametrize("layout", [("fsdp", "fsdp=8"), ("sp", "dp=2,sp=4")])
def test_sharded_step_matches_one_device(layout):
    loss, weights, state, tr = one_step(layout)
    ref_loss, ref_weights, _, _ = one_step(None)
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss
    for name, w in ref_weights.items():
        assert rel_l2(weights[name], w) <= 1e-5, name
    # the weights and their AdamW moments stay where the strategy's table puts them
    for name in ("double_blocks.0.img_attn_q.weight", "final_layer.linear.weight"):
        assert state.trainable[name].sharding == tr.base_shardings[name]
        assert state.opt_state[1][0].mu[name].sharding == tr.base_shardings[name]


def test_lora_optimizer_state_holds_the_adapter_only():
    spec = lora_lib.LoRASpec()
    tr = trainer(lora=spec, compute_dtype=jnp.bfloat16, optimizer=OptimizerSettings(name="muon"))
    adapter = lora_lib.init_adapter(meta_model(CFG), spec, seed=1)
    state = tr.init_state({k: v.numpy() for k, v in adapter.items()})
    names = {p.key for path, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
             for p in path if isinstance(p, jax.tree_util.DictKey) and "." in p.key}  # not "muon"/"adam"
    assert names == set(adapter) == set(state.trainable)
    assert len(adapter) == 2 * 14 * CFG.mm_double_blocks_depth  # A and B of 14 linears per double block
    assert tr.base_dtype == jnp.bfloat16  # the frozen base is held in the compute dtype, not as float32 masters


# ---- data ------------------------------------------------------------------------------------

@pytest.fixture
def dataset(tmp_path):
    data, empty = samples()
    return write_dataset(tmp_path / "data", data, shard_size=3, empty_prompt=empty)


def test_dataset_round_trip_and_order(dataset):
    data = TrainingData(dataset, CFG)
    assert data.num_samples == 8 and data.i2v_capable and len(data.buckets[0].shards) == 3
    got = data.read(np.array([7, 0, 4]))
    for key, value in samples()[0].items():
        np.testing.assert_array_equal(got[key], value[[7, 0, 4]])
    order = DataOrder((8,), 3, seed=1)
    epoch = np.concatenate([order.indices(n) for n in range(order.per_epoch)])
    assert len(set(epoch.tolist())) == 6  # no sample twice in an epoch; 2 left over
    assert not np.array_equal(order.indices(0), order.indices(order.per_epoch))  # a new permutation per epoch
    assert np.array_equal(order.indices(5), DataOrder((8,), 3, seed=1).indices(5))  # a resumed run reads the same


def test_buckets_are_read_and_ordered_one_bucket_per_batch(tmp_path):
    """Two shapes in one folder: samples numbered bucket after bucket, each batch from one
    bucket, each epoch every usable sample once, both buckets mixed; version-1 folders still read."""
    data, empty = samples()
    short = {k: v[:5] for k, v in data.items()}
    short["latents"] = short["latents"][:, :, :1]  # one latent frame: another bucket
    folder = write_dataset(tmp_path / "two", [short, data], shard_size=3, empty_prompt=empty)
    reader = TrainingData(folder, CFG)
    assert [(b.name, b.samples) for b in reader.buckets] == [("1x64x96", 5), ("9x64x96", 8)]
    assert reader.bucket_sizes == (5, 8) and reader.bucket_of(4).name == "1x64x96"
    np.testing.assert_array_equal(reader.read(np.array([6]))["latents"], data["latents"][[1]])
    with pytest.raises(DataError, match="several buckets; a batch takes one"):
        reader.read(np.array([4, 5]))
    order = DataOrder(reader.bucket_sizes, 2, seed=0)
    assert order.per_epoch == 2 + 4
    epoch = [order.indices(n) for n in range(order.per_epoch)]
    assert all(len({reader.bucket_of(int(i)).name for i in batch}) == 1 for batch in epoch)
    assert len(set(np.concatenate(epoch).tolist())) == 12  # one of the 5 left over
    assert [reader.bucket_of(int(b[0])).name for b in epoch] != sorted(reader.bucket_of(int(b[0])).name for b in epoch)
    with pytest.raises(DataError, match="a step takes 9 samples but the largest bucket has 8"):
        DataOrder(reader.bucket_sizes, 9, seed=0)
    manifest = json.loads((folder / "dataset.json").read_text())
    bucket = manifest["buckets"][1]
    (folder / "dataset.json").write_text(json.dumps({"format": "hunyuan-tpu-training/1", "samples": 8,
                                                     "shards": bucket["shards"], "shapes": bucket["shapes"]}))
    assert [(b.name, b.samples) for b in TrainingData(folder, CFG).buckets] == [("9x64x96", 8)]


def test_bad_data_is_named(dataset, tmp_path):
    (dataset / "shard-00001.safetensors").unlink()
    with pytest.raises(DataError, match=r"shard-00001.safetensors: shard listed in dataset.json is missing"):
        TrainingData(dataset, CFG)
    data, empty = samples()
    wrong = dict(data, latents=data["latents"][:, :, :2])
    folder = write_dataset(tmp_path / "wrong", wrong)
    with pytest.raises(DataError, match=r"model needs|expected"):
        TrainingData(folder, dataclasses.replace(CFG, text_states_dim=32))
    manifest = json.loads((folder / "dataset.json").read_text())
    manifest["buckets"][0]["shapes"]["latents"] = [32, 3, 4, 6]
    (folder / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"shard-00000.safetensors: latents has shape \(8, 32, 2, 4, 6\), expected"):
        TrainingData(folder, CFG)
    nan = dict(data, latents=data["latents"].copy())
    nan["latents"][5, 0, 0, 0, 0] = np.nan
    folder = write_dataset(tmp_path / "nan", nan, shard_size=4)
    reader = TrainingData(folder, CFG)
    reader.read(np.array([0, 1]))
    with pytest.raises(DataError, match=r"shard-00001.safetensors: sample 1 has non-finite values .* in latents"):
        reader.read(np.array([5]))
