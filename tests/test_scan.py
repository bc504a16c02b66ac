"""The double blocks under one scan: the same numbers as the unrolled Python loop (plain
forward, the feature cache's full and cached steps, on a mesh, gradients with remat), one copy
of the block in the program, and weights stacked by layer where the tables put each layer.

On one device equality is exact on XLA:CPU: the scan's body is the block the loop unrolls,
compiled the same way, and picking a layer out of a stack moves no bits. On a mesh the
partitioner may order a sum differently inside a loop body: float32 rounding (rel L2 1e-7)."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

from hunyuan_tpu import hlo, lora, parallel, scan
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.metrics import rel_l2
from hunyuan_tpu.model import Execution, loop_blocks
from hunyuan_tpu.params import meta_model, random_params
from hunyuan_tpu.runtime import functional, rematerialized, tracing
from hunyuan_tpu.synthetic import random_inputs

DEPTH = 3
CFG = dataclasses.replace(DiTConfig.preset("tiny"), mm_double_blocks_depth=DEPTH)
LATENT = (3, 4, 7)  # 84 image tokens: fsdp=8 pads them


def inputs(batch: int = 2) -> dict[str, jax.Array]:
    raw = random_inputs(CFG, batch=batch, latent=LATENT, vision_len=5, seed=2)
    return {k: jnp.asarray(v.numpy()) for k, v in raw.items()}


def apply(run_blocks, execution: Execution = Execution(), cfg: DiTConfig = CFG, **model_kw):
    model = meta_model(cfg, dataclasses.replace(execution, run_blocks=run_blocks, scope=jax.named_scope))
    if model_kw.get("lora"):
        spec = model_kw["lora"]
        lora.with_lora(model, dict.fromkeys(lora.target_layers(model, spec), spec.rank), spec.scale)
    return functional(model)


@functools.cache
def params(seed: int = 3) -> dict[str, jax.Array]:
    return random_params(CFG, torch.float32, seed=seed)


@functools.cache
def compiled_forward(runner, depth: int = DEPTH) -> jax.stages.Compiled:
    """The one-device forward at ``depth`` blocks (per-layer weights for the loop, stacked ones
    for the scan), compiled once: several tests run it as their reference or read its program."""
    cfg = dataclasses.replace(CFG, mm_double_blocks_depth=depth)
    weights = random_params(cfg, torch.float32, seed=0)
    weights = scan.stack_blocks(weights) if runner is scan.scanned_blocks else weights
    return jax.jit(apply(runner, cfg=cfg)).lower(weights, **inputs()).compile()


def assert_same(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- the forward -----------------------------------------------------------------------------

def test_scanned_forward_equals_the_loop():
    """Bit-identical, from stacked weights and from per-layer ones (stacked inside the trace)."""
    x = inputs()
    expected = compiled_forward(loop_blocks)(params(), **x)
    assert_same(compiled_forward(scan.scanned_blocks)(scan.stack_blocks(params()), **x), expected)
    assert_same(jax.jit(apply(scan.scanned_blocks))(params(), **x), expected)


@pytest.mark.parametrize("split", [1, DEPTH - 1])
def test_cache_steps_equal_the_loop(split):
    """The full step's velocity and saved streams, and the cached step from them, bit for bit."""
    x = inputs()
    loop, scanned, stacked = apply(loop_blocks), apply(scan.scanned_blocks), scan.stack_blocks(params())
    full = jax.jit(lambda f, p: f(p, **x, save=(split,)), static_argnums=0)
    cached = jax.jit(lambda f, p, s: f(p, **{**x, "t": x["t"] * 0.5}, start=split, streams=s), static_argnums=0)
    velocity, [streams] = full(loop, params())
    assert_same(full(scanned, stacked), (velocity, [streams]))
    assert_same(cached(scanned, stacked, streams), cached(loop, params(), streams))


@pytest.mark.parametrize("strategy,mesh_spec", [("tp_fc2_replicated", "tp=8"), ("fsdp", "fsdp=8")])
def test_scan_on_a_mesh_equals_the_loop(strategy, mesh_spec):
    placement = parallel.placement(CFG, strategy, mesh_spec, batch=2)
    mesh, execution = placement.mesh, placement.execution
    placed = random_params(CFG, torch.float32, seed=3, shardings=placement.params)
    x = jax.device_put(inputs(), placement.replicated)
    with tracing(mesh):
        expected = jax.jit(apply(loop_blocks, execution))(placed, **x)
        got = jax.jit(apply(scan.scanned_blocks, execution))(scan.stack_blocks(placed), **x)
    # the partitioner may order a sum differently in a loop body: float32 rounding, not bit-identity
    assert rel_l2(got, expected) <= 1e-6
    assert rel_l2(got, compiled_forward(loop_blocks)(params(), **inputs())) <= 1e-5  # = the one-device forward


# ---- training --------------------------------------------------------------------------------

def _velocity_loss(f, trainable, frozen, x):
    return jnp.mean(f({**frozen, **trainable}, **x) ** 2)


def test_gradients_with_remat_equal_the_loop():
    """Full fine-tuning: official-named weights, stacked inside the step, remat inside the body."""
    x = inputs()
    grad = lambda runner: jax.jit(jax.value_and_grad(  # noqa: E731
        functools.partial(_velocity_loss, apply(runner, Execution(checkpoint=rematerialized)))))(params(), {}, x)
    loss, grads = grad(scan.scanned_blocks)
    ref_loss, ref_grads = grad(loop_blocks)
    assert grads.keys() == ref_grads.keys()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for name, g in ref_grads.items():
        np.testing.assert_allclose(grads[name], g, rtol=1e-5, atol=1e-7, err_msg=name)
    assert float(jnp.abs(grads[f"double_blocks.{DEPTH - 1}.img_mlp.fc2.weight"]).max()) > 0


def test_lora_gradients_on_a_stacked_base_equal_the_loop():
    """LoRA: the frozen base stacked once, outside the step; the adapter under official names."""
    spec = lora.LoRASpec(rank=4)
    adapter = {k: jnp.asarray(v.numpy()) for k, v in lora.init_adapter(meta_model(CFG), spec, seed=1).items()}
    adapter = {k: v + 0.01 if ".lora_B." in k else v for k, v in adapter.items()}  # B = 0 has no A gradient
    x = inputs()
    execution = Execution(checkpoint=rematerialized)
    grad = lambda runner, frozen: jax.jit(jax.value_and_grad(  # noqa: E731
        functools.partial(_velocity_loss, apply(runner, execution, lora=spec))))(adapter, frozen, x)
    loss, grads = grad(scan.scanned_blocks, scan.stack_blocks(params()))
    ref_loss, ref_grads = grad(loop_blocks, params())
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for name, g in ref_grads.items():
        np.testing.assert_allclose(grads[name], g, rtol=1e-5, atol=1e-7, err_msg=name)
    # merging into the stacked base gives the stacked merge of the per-layer base
    assert_same(lora.merge(scan.stack_blocks(params()), adapter, 2.0),
                scan.stack_blocks(lora.merge(params(), adapter, 2.0)))


def test_an_adapter_on_some_blocks_runs_them_one_by_one():
    """Blocks of different structure cannot share a loop body: the runner unrolls them, still
    reading the base weights from the stacks."""
    spec = lora.LoRASpec(rank=4, targets=r"double_blocks\.1\.img_attn_q")
    adapter = {k: jnp.asarray(v.numpy()) + 0.01 for k, v in lora.init_adapter(meta_model(CFG), spec, seed=1).items()}
    x = inputs()
    scanned = jax.jit(apply(scan.scanned_blocks, lora=spec)).lower({**scan.stack_blocks(params()), **adapter},
                                                                  **x).compile()
    assert not re.search(r"\swhile\(", scanned.as_text())
    assert_same(scanned({**scan.stack_blocks(params()), **adapter}, **x),
                jax.jit(apply(loop_blocks, lora=spec))({**params(), **adapter}, **x))


# ---- the program -----------------------------------------------------------------------------

def test_one_copy_of_the_block_in_the_program():
    """Unrolled, every further block adds its dots to the program; scanned, the program has one
    while loop holding one block's dots whatever the depth, run depth times."""
    dots = lambda text: len(re.findall(r"\sdot\(", text))  # noqa: E731
    loops = lambda text: len(re.findall(r"\swhile\(", text))  # noqa: E731
    low, high = DEPTH, DEPTH + 2  # the DEPTH programs are the other tests' references, compiled once
    unrolled = {d: compiled_forward(loop_blocks, d).as_text() for d in (low, high)}
    scanned = {d: compiled_forward(scan.scanned_blocks, d).as_text() for d in (low, high)}
    per_block = (dots(unrolled[high]) - dots(unrolled[low])) // (high - low)
    assert per_block >= 12 and loops(unrolled[high]) == 0  # q, k, v, proj, fc1, fc2, modulation per stream
    assert loops(scanned[low]) == loops(scanned[high]) == 1
    # the one-block program, plus the last block's text-stream dots that the unrolled program
    # drops (the final layer reads the image stream only) and a loop body cannot
    one_block = dots(unrolled[high]) - (high - 1) * per_block
    assert dots(scanned[low]) == dots(scanned[high]) and one_block <= dots(scanned[high]) < one_block + per_block // 2
    assert hlo.dot_flops(scanned[high]) - hlo.dot_flops(scanned[low]) == pytest.approx(
        hlo.dot_flops(unrolled[high]) - hlo.dot_flops(unrolled[low]), rel=1e-6)


def test_loop_counts_in_the_hlo_reader():
    """``hlo.dot_flops`` and ``hlo.collectives`` count a loop body once per iteration."""
    def unrolled(w, x):
        for i in range(5):
            x = jnp.tanh(w[i] @ x)
        return x

    def scanned(w, x):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(wi @ c), None), x, w)[0]

    w, x = jnp.ones((5, 32, 32)), jnp.ones((32, 4))
    flops = [hlo.dot_flops(jax.jit(f).lower(w, x).compile().as_text()) for f in (unrolled, scanned)]
    assert flops == [5 * 2 * 32 * 32 * 4] * 2

    def summed(x):  # one all-reduce in a loop of 3, one after it
        x = jax.lax.scan(lambda c, _: (jnp.sin(c + jax.lax.psum(c, "x")), None), x, None, length=3)[0]
        return jax.lax.psum(x, "x")

    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    program = jax.jit(jax.shard_map(summed, mesh=mesh, in_specs=P("x"), out_specs=P()))
    ops = hlo.collectives(program.lower(jnp.ones(8 * 16)).compile().as_text())
    assert [op.kind for op in ops] == ["all-reduce"] * 4 and {op.group for op in ops} == {8}


# ---- stacked weights and their placement -----------------------------------------------------

def test_names():
    assert scan.split_layer("double_blocks.12.img_mlp.fc1.weight") == ("double_blocks.img_mlp.fc1.weight", 12)
    assert scan.layer_name("double_blocks.img_mlp.fc1.weight", 12) == "double_blocks.12.img_mlp.fc1.weight"
    assert scan.split_layer("final_layer.linear.weight") is None
    assert scan.is_stacked("double_blocks.img_mlp.fc1.weight") and not scan.is_stacked("double_blocks.0.img_mod.linear.bias")
    # an adapter on some blocks only forms no group: it stays per layer
    assert scan.stack_groups(["double_blocks.0.a", "double_blocks.1.a", "double_blocks.1.b"]) == {
        "double_blocks.a": ["double_blocks.0.a", "double_blocks.1.a"]}


@pytest.mark.parametrize("strategy,mesh_spec", [("tp_fc2_replicated", "tp=8"), ("fsdp", "fsdp=8")])
def test_stacked_weights_keep_each_layers_placement(strategy, mesh_spec):
    shardings = parallel.placement(CFG, strategy, mesh_spec, batch=2).params
    placed = random_params(CFG, torch.float32, seed=3, shardings=shardings)
    host = {k: np.asarray(v) for k, v in placed.items()}
    expected = scan.stacked_shardings(shardings)
    stacked = scan.stack_blocks(placed, dtype=jnp.bfloat16, donate=True)
    assert all(placed[scan.layer_name(name, i)].is_deleted() for name in stacked if scan.is_stacked(name)
               for i in range(DEPTH))
    assert not placed["final_layer.linear.weight"].is_deleted()
    assert stacked.keys() == expected.keys() == scan.stacked_abstract(
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in host.items()}).keys()
    assert len(stacked) == len(host) - (DEPTH - 1) * sum(1 for k in host if k.startswith("double_blocks.0."))
    for name, array in stacked.items():
        assert array.dtype == jnp.bfloat16 and array.sharding.is_equivalent_to(expected[name], array.ndim), name
        if scan.is_stacked(name):
            first = shardings[scan.layer_name(name, 0)]
            assert array.sharding.shard_shape(array.shape) == (DEPTH, *first.shard_shape(array.shape[1:])), name
            reference = np.stack([host[scan.layer_name(name, i)] for i in range(DEPTH)])
        else:
            reference = host[name]
        np.testing.assert_array_equal(np.asarray(array), reference.astype(jnp.bfloat16), err_msg=name)
    fc1 = stacked["double_blocks.img_mlp.fc1.weight"]
    assert fc1.shape == (DEPTH, CFG.mlp_hidden_dim, CFG.hidden_size)
    assert scan.stack_blocks(stacked).keys() == stacked.keys()  # stacking twice changes nothing
