"""LoRA: the adapted forward, merging, and the adapter files (official/PEFT and diffusers names)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hunyuan_tpu import lora
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.metrics import rel_l2
from hunyuan_tpu.model import HunyuanVideo15DiT
from hunyuan_tpu.naming import official_to_diffusers
from hunyuan_tpu.random_init import randomize_like_trained_
from hunyuan_tpu.synthetic import random_inputs

CFG = DiTConfig.preset("tiny")
SPEC = lora.LoRASpec(rank=4, alpha=8.0, targets="all-linear")


def base_model() -> HunyuanVideo15DiT:
    return randomize_like_trained_(HunyuanVideo15DiT(CFG), seed=3).eval()


def adapter_weights(nonzero_b: bool) -> dict[str, torch.Tensor]:
    weights = lora.init_adapter(base_model(), SPEC, seed=1)
    if nonzero_b:
        g = torch.Generator().manual_seed(2)
        weights = {k: torch.randn(v.shape, generator=g) * 0.05 if "lora_B" in k else v for k, v in weights.items()}
    return weights


def adapted(weights: dict[str, torch.Tensor]) -> HunyuanVideo15DiT:
    model = base_model()
    ranks = {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in weights.items() if "lora_A" in k}
    lora.with_lora(model, ranks, SPEC.scale)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(".lora_" not in k for k in missing)
    return model


def forward(model, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**random_inputs(CFG, vision_len=5, **extra))


def test_names_and_default_targets():
    names = set(lora.init_adapter(base_model(), lora.LoRASpec(), seed=0))
    per_block = {f"double_blocks.0.{s}_{m}.lora_{p}.weight" for s in ("img", "txt")
                 for m in ("mod.linear", "attn_q", "attn_k", "attn_v", "attn_proj", "mlp.fc1", "mlp.fc2") for p in "AB"}
    assert per_block <= names and len(names) == len(per_block) * CFG.mm_double_blocks_depth
    model = adapted(adapter_weights(False))
    assert "double_blocks.0.img_attn_q.weight" in model.state_dict()  # base names unchanged


def test_zero_b_leaves_the_output_unchanged():
    assert torch.equal(forward(adapted(adapter_weights(False))), forward(base_model()))


def test_merged_weights_equal_the_unmerged_forward():
    weights = adapter_weights(True)
    unmerged = forward(adapted(weights))
    params = {k: jnp.asarray(v.numpy()) for k, v in base_model().state_dict().items()}
    merged = lora.merge(params, {k: jnp.asarray(v.numpy()) for k, v in weights.items()}, SPEC.scale)
    model = base_model()
    model.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in merged.items()})
    assert rel_l2(forward(model), unmerged) <= 1e-5
    assert rel_l2(unmerged, forward(base_model())) > 1e-3


def test_official_file_round_trip(tmp_path):
    weights = adapter_weights(True)
    path = lora.save_adapter(tmp_path / "pytorch_lora_weights.safetensors", weights, SPEC)
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()[lora.METADATA_KEY])
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    loaded = lora.load_adapter(path)
    assert loaded.scale == SPEC.scale and loaded.weights.keys() == weights.keys()
    assert all(torch.equal(loaded.weights[k], weights[k]) for k in weights)
    lora.check_adapter(loaded, CFG, str(path))
    # PEFT's in-memory names (base_model.model. prefix, adapter name) load the same
    save_file({"base_model.model." + k.replace(".weight", ".default.weight"): v for k, v in weights.items()},
              str(tmp_path / "peft.safetensors"))
    peft = lora.load_adapter(tmp_path / "peft.safetensors")
    assert peft.weights.keys() == weights.keys() and peft.scale == 1.0  # no metadata: alpha = r


def test_diffusers_named_file_merges_the_same(tmp_path):
    """diffusers' names, split refiner q/k/v and swapped final modulation included, give the same merge."""
    weights = adapter_weights(True)
    diffusers = {}
    for key, tensor in weights.items():
        module, part = key.removesuffix(".weight").rsplit(".lora_", 1)
        if module.endswith("self_attn_qkv"):  # one A shared by q, k and v; B split by rows
            renamed = official_to_diffusers({module + ".weight": torch.zeros(3, 1)})
            for i, name in enumerate(renamed):  # q, k, v in order
                chunk = tensor.clone() if part == "A" else tensor.chunk(3)[i].clone()
                diffusers[f"transformer.{name.removesuffix('.weight')}.lora_{part}.weight"] = chunk
            continue
        renamed = next(iter(official_to_diffusers({module + ".weight": torch.zeros(2, 1)})))
        swapped = part == "B" and module == "final_layer.adaLN_modulation.1"  # diffusers: [scale, shift]
        value = torch.cat(tensor.chunk(2)[::-1]) if swapped else tensor
        diffusers[f"transformer.{renamed.removesuffix('.weight')}.lora_{part}.weight"] = value
    save_file(diffusers, str(tmp_path / "d.safetensors"), metadata={
        lora.METADATA_KEY: json.dumps({"r": SPEC.rank, "lora_alpha": SPEC.alpha})})
    loaded = lora.load_adapter(tmp_path / "d.safetensors")
    lora.check_adapter(loaded, CFG, "d")
    params = {k: jnp.asarray(v.numpy()) for k, v in base_model().state_dict().items()}
    as_jax = lambda w: {k: jnp.asarray(v.numpy()) for k, v in w.items()}  # noqa: E731
    expected = lora.merge(params, as_jax(weights), SPEC.scale)
    got = lora.merge(params, as_jax(loaded.weights), loaded.scale)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_bad_adapters_are_named(tmp_path):
    save_file({"double_blocks.0.img_attn_q.lora_down.weight": torch.zeros(4, 128)}, str(tmp_path / "kohya.safetensors"))
    with pytest.raises(lora.LoRAError, match="lora_down.weight is not a LoRA weight"):
        lora.load_adapter(tmp_path / "kohya.safetensors")
    save_file({"double_blocks.9.img_attn_q.lora_A.weight": torch.zeros(4, 128),
               "double_blocks.9.img_attn_q.lora_B.weight": torch.zeros(128, 4)}, str(tmp_path / "deep.safetensors"))
    with pytest.raises(lora.LoRAError, match="double_blocks.9.img_attn_q is not a linear layer"):
        lora.check_adapter(lora.load_adapter(tmp_path / "deep.safetensors"), CFG, "deep")
    save_file({"double_blocks.0.img_attn_q.lora_A.weight": torch.zeros(4, 64),
               "double_blocks.0.img_attn_q.lora_B.weight": torch.zeros(128, 4)}, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(lora.LoRAError, match=r"adapter is A \(4, 64\), B \(128, 4\); the layer takes A \(r, 128\)"):
        lora.check_adapter(lora.load_adapter(tmp_path / "narrow.safetensors"), CFG, "narrow")
    save_file({"double_blocks.0.img_attn_q.lora_A.weight": torch.zeros(4, 128)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(lora.LoRAError, match="needs a lora_A"):
        lora.load_adapter(tmp_path / "half.safetensors")
    with pytest.raises(lora.LoRAError, match="neither a preset"):
        lora.LoRASpec(targets="(")
