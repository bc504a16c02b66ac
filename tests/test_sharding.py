"""Every strategy on 8 virtual CPU devices: same latents as one device, and the collectives and
per-device memory that its tables imply."""

import dataclasses
import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P
from safetensors.torch import save_file

import sharding
from hunyuan_tpu import hlo, parallel, pipeline
from hunyuan_tpu.checkpoint import save_transformer
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.files import InputError
from hunyuan_tpu.metrics import rel_l2
from hunyuan_tpu.model import Execution, HunyuanVideo15DiT
from hunyuan_tpu.naming import official_to_diffusers
from hunyuan_tpu.params import checkpoint_params, random_params
from hunyuan_tpu.random_init import randomize_like_trained_
from hunyuan_tpu.synthetic import random_inputs, stage1_embeddings

SHAPE = (3, 4, 7)  # 84 image tokens: not a multiple of 8, so sp=8 and fsdp=8 pad and mask
STEPS = 3
MESHES = {  # strategy -> mesh spec over the 8 devices
    "replicated": "tp=8",
    "tp": "tp=8",
    "tp_fc2_replicated": "tp=8",
    "sp": "sp=8",
    "fsdp": "fsdp=8",
}
OFFICIAL = json.loads((Path(__file__).parent / "data" / "hunyuanvideo15_official_params.json").read_text())
COMBINED = [("tp", "dp=2,tp=4"), ("sp", "dp=2,sp=4"), ("tp_fc2_replicated", "dp=2,tp=4")]


def _config(depth: int) -> DiTConfig:
    return dataclasses.replace(DiTConfig.preset("tiny"), mm_double_blocks_depth=depth)


@dataclasses.dataclass
class Run:
    latents: np.ndarray
    collectives: dict
    argument_bytes: int
    param_shardings: dict


@functools.cache
def run(depth: int, strategy: str | None = None, mesh_spec: str | None = None) -> Run:
    cfg = _config(depth)
    emb = {k: v.numpy() for k, v in stage1_embeddings(cfg, latent_hw=SHAPE[1:], seed=1).items()}
    conditions = pipeline.build_conditions(emb, task="t2v", shape=SHAPE, cfg=True)
    settings = pipeline.SamplingSettings(num_inference_steps=STEPS, guidance_scale=5.0)
    placement = parallel.Placement()
    if strategy is not None:
        placement = parallel.placement(cfg, strategy, mesh_spec, batch=2)
    params = random_params(cfg, torch.float32, seed=3, shardings=placement.params)
    denoiser = pipeline.Denoiser(cfg, params, conditions, settings, placement=placement)
    denoiser.compile((1, 32, *SHAPE))
    compiled = denoiser.compiled
    latents = pipeline.denoise(denoiser, pipeline.initial_noise(0, SHAPE), progress=False).latents
    return Run(latents, hlo.summary(hlo.collectives(compiled.as_text())),
               compiled.memory_analysis().argument_size_in_bytes, placement.params)


@pytest.mark.parametrize("depth", [2, 4])
@pytest.mark.parametrize("strategy", list(MESHES))
def test_strategy_matches_one_device(strategy, depth):
    assert rel_l2(run(depth, strategy, MESHES[strategy]).latents, run(depth).latents) <= 1e-5


@pytest.mark.parametrize("strategy,mesh_spec", COMBINED)
def test_dp_splits_the_cfg_batch(strategy, mesh_spec):
    assert rel_l2(run(2, strategy, mesh_spec).latents, run(2).latents) <= 1e-5


def _per_block(strategy: str, kind: str, field: int = 0) -> float:
    """Growth of a collective's count (field 0) or bytes (field 1) per extra double block."""
    small, large = run(2, strategy, MESHES[strategy]), run(4, strategy, MESHES[strategy])
    return (large.collectives[kind][field] - small.collectives[kind][field]) / 2


def test_collectives_follow_from_the_tables():
    cfg = _config(2)
    batch, image, text = 2, math.prod(SHAPE), 48  # CFG pair; 84 tokens; 32 LLM + 16 ByT5 slots (under a TEXT_BUCKET)
    stream_bytes = 4 * batch * (image + text) * cfg.hidden_size  # one f32 (B, L+S, C) activation
    # An all-reduce exists only to sum partial products: after a matmul whose contraction
    # dimension is split across devices. tp splits it in the four row-parallel matmuls of a
    # block (img/txt attn_proj and fc2), whose outputs are summed once each: exactly two
    # (B, L+S, C) activations per block. The other strategies keep every contraction whole.
    assert _per_block("tp", "all-reduce", 1) == 2 * stream_bytes
    for name in ("replicated", "tp_fc2_replicated", "sp"):
        assert run(4, name, MESHES[name]).collectives["all-reduce"][0] == 0, name
    assert run(4, "tp_fc2_replicated", "tp=8").collectives["all-reduce"][0] < run(4, "tp", "tp=8").collectives["all-reduce"][0]
    # With every weight whole, a block of replicated moves only what attention's head split
    # forces: its (B, L+S, C) output is gathered back, once.
    moved = {name: {kind: _per_block(name, kind, 1) for kind in hlo.COLLECTIVES} for name in MESHES}
    assert moved["replicated"] == {**dict.fromkeys(hlo.COLLECTIVES, 0.0), "all-gather": stream_bytes}
    # sp and tp_fc2_replicated move activations between token, head and feature splits; fsdp has
    # sp's activation layout but holds 1/8 of each weight, so it moves strictly more per block.
    assert sum(moved["sp"].values()) > 0 and sum(moved["tp_fc2_replicated"].values()) > 0
    assert moved["fsdp"]["all-gather"] > 0 and sum(moved["fsdp"].values()) > sum(moved["sp"].values())


def test_per_device_weights_match_the_tables():
    shapes = parallel.param_shapes(_config(4))
    other = run(4, "replicated", "tp=8").argument_bytes - 4 * sum(math.prod(s) for s in shapes.values())
    weights = {}
    for name, mesh_spec in MESHES.items():
        r = run(4, name, mesh_spec)
        weights[name] = sum(4 * math.prod(r.param_shardings[k].shard_shape(s)) for k, s in shapes.items())
        assert r.argument_bytes == weights[name] + other, name
    assert weights["fsdp"] < weights["tp"] < weights["tp_fc2_replicated"] < weights["replicated"] == weights["sp"]
    assert weights["fsdp"] <= weights["replicated"] / 8 * 1.05  # all but a few tiny 1-D tensors split 8 ways


def test_checkpoint_loads_into_slices(tmp_path):
    cfg = DiTConfig.preset("tiny")
    model = randomize_like_trained_(HunyuanVideo15DiT(cfg), seed=4)
    save_transformer(model, tmp_path / "ckpt", max_shard_bytes=300_000)
    strat, mesh = sharding.get("tp"), parallel.make_mesh(parallel.parse_mesh_spec("tp=8"))
    shardings = parallel.param_shardings(strat, mesh, parallel.param_shapes(cfg))
    params = checkpoint_params(tmp_path / "ckpt", cfg, torch.float32, shardings)
    state = model.state_dict()
    name = "double_blocks.1.img_attn_q.weight"
    assert params[name].sharding == shardings[name]
    shards = params[name].addressable_shards
    assert len(shards) == 8 and shards[0].data.shape == (cfg.hidden_size // 8, cfg.hidden_size)
    for shard in shards:
        np.testing.assert_array_equal(np.asarray(shard.data), state[name].numpy()[shard.index])
    for k, v in params.items():
        np.testing.assert_array_equal(np.asarray(v), state[k].numpy())
    # diffusers' names: renamed, the refiner's q/k/v fused and the final modulation swapped, one
    # tensor at a time, and placed by the same table
    save_file(official_to_diffusers(state), str(tmp_path / "diffusers.safetensors"))
    renamed = checkpoint_params(tmp_path / "diffusers.safetensors", cfg, torch.float32, shardings)
    assert renamed.keys() == params.keys()
    for k, v in renamed.items():
        assert v.sharding == params[k].sharding, k
        np.testing.assert_array_equal(np.asarray(v), state[k].numpy())


def test_mesh_specs():
    assert parallel.parse_mesh_spec("dp=2,tp=4") == {"dp": 2, "fsdp": 1, "sp": 1, "tp": 4}
    assert parallel.parse_mesh_spec("fsdp=8") == {"dp": 1, "fsdp": 8, "sp": 1, "tp": 1}
    for bad, message in [("tp8", "is not AXIS=SIZE"), ("xp=8", "unknown axis 'xp'"), ("tp=4,tp=2", "given twice"),
                         ("", "empty")]:
        with pytest.raises(InputError, match=message):
            parallel.parse_mesh_spec(bad)
    with pytest.raises(InputError, match="uses 4 devices, but 8 are available"):
        parallel.make_mesh(parallel.parse_mesh_spec("tp=4"))
    mesh = parallel.make_mesh(parallel.parse_mesh_spec("dp=2,sp=4"))
    assert dict(mesh.shape) == {"dp": 2, "fsdp": 1, "sp": 4, "tp": 1}


def test_check_fit_explains_what_does_not_fit():
    cfg = _config(2)
    shapes = parallel.param_shapes(cfg)
    mesh = parallel.make_mesh(parallel.parse_mesh_spec("sp=2,tp=4"))
    with pytest.raises(InputError, match="axis sp=2 is not used by strategy tp"):
        parallel.check_fit(sharding.get("tp"), mesh, cfg, shapes, batch=2)
    four_heads = dataclasses.replace(cfg, heads_num=4, rope_dim_list=(8, 12, 12))
    with pytest.raises(InputError, match="4 heads over 8 devices"):
        parallel.check_fit(sharding.get("tp"), parallel.make_mesh(parallel.parse_mesh_spec("tp=8")), four_heads,
                           parallel.param_shapes(four_heads), batch=2)
    with pytest.raises(InputError, match=r"dp=2 splits the batch into equal parts, but the CFG batch .* has 1 sample"):
        parallel.check_fit(sharding.get("tp"), parallel.make_mesh(parallel.parse_mesh_spec("dp=2,tp=4")), cfg,
                           shapes, batch=1)


def test_multi_host_detection():
    assert not parallel.multi_host({})
    assert not parallel.multi_host({"TPU_WORKER_HOSTNAMES": "localhost"})
    assert parallel.multi_host({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})
    assert parallel.multi_host({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert parallel.multi_host({"SLURM_NTASKS": "4"}) and not parallel.multi_host({"SLURM_NTASKS": "1"})
    assert parallel.multi_host({"OMPI_COMM_WORLD_SIZE": "2"})


def test_every_strategy_is_registered_and_documented():
    assert set(MESHES) <= set(sharding.STRATEGIES)
    for s in sharding.STRATEGIES.values():
        assert s.description and set(s.activations) <= set(sharding.ACTIVATIONS)
    with pytest.raises(ValueError, match="unknown sharding strategy 'zz'"):
        sharding.get("zz")


def test_model_names_exactly_the_activations_the_tables_know():
    """The model and the strategies spell activation names with the same constants: the forward
    asks for every name in ``sharding.ACTIVATIONS`` and for no other."""
    seen = set()

    def record(x, name):
        seen.add(name)
        return x

    cfg = _config(1)
    model = HunyuanVideo15DiT(cfg, Execution(layout=record))
    inputs = {k: v for k, v in random_inputs(cfg, batch=1, latent=(1, 2, 2), text_len=4, byt5_len=4).items()}
    with torch.no_grad():
        model(**inputs)
    assert seen == set(sharding.ACTIVATIONS)
    with pytest.raises(ValueError, match="unknown activation name"):
        sharding.Strategy(name="x", description="x", params=(), activations={"image": P()}, axes=("dp",))


def test_every_rule_matches_and_whole_parameters_are_counted():
    """No strategy carries a rule that matches none of the released checkpoint's parameters
    (a misspelt regex would silently leave its layers whole)."""
    names = list(OFFICIAL["params"])
    whole = {}
    for strategy in sharding.STRATEGIES.values():
        coverage = parallel.coverage(strategy, names)
        assert coverage.unmatched_rules == (), (strategy.name, coverage.unmatched_rules)
        assert coverage.total == len(names)
        whole[strategy.name] = coverage.whole
    assert whole["replicated"] == whole["sp"] == len(names)
    assert whole["fsdp"] == sum(not n.endswith(".weight") for n in names)  # every weight is split, biases stay whole
    assert whole["tp"] < whole["tp_fc2_replicated"] < len(names)
    broken = dataclasses.replace(sharding.get("tp"), params=((r"double_blocks\.\d+\.img_attn_qq\.weight", P("tp")),))
    assert parallel.coverage(broken, names).unmatched_rules == (r"double_blocks\.\d+\.img_attn_qq\.weight",)
