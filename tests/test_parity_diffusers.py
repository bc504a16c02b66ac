"""HunyuanVideo15DiT against diffusers' independent implementation, on trained-scale random weights."""

import dataclasses

import pytest
import torch

from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.metrics import rel_l2
from hunyuan_tpu.model import HunyuanVideo15DiT
from hunyuan_tpu.naming import diffusers_to_official, official_to_diffusers
from hunyuan_tpu.random_init import randomize_like_trained_
from hunyuan_tpu.synthetic import random_inputs

diffusers = pytest.importorskip("diffusers")


def _pair(meanflow: bool):
    ref = diffusers.HunyuanVideo15Transformer3DModel(
        num_attention_heads=4, attention_head_dim=16, num_layers=2, num_refiner_layers=2,
        text_embed_dim=40, text_embed_2_dim=24, image_embed_dim=20, rope_axes_dim=(4, 6, 6),
        use_meanflow=meanflow,
    ).eval()
    randomize_like_trained_(ref, seed=1)
    # diffusers fixes the ByT5 projection's inner width at 2048 whatever the config says.
    cfg = dataclasses.replace(DiTConfig.from_dict(dict(ref.config), "diffusers config"), byt5_hidden_dim=2048)
    model = HunyuanVideo15DiT(cfg).eval()
    model.load_state_dict(diffusers_to_official(ref.state_dict()), strict=True)
    return ref, model


def _diffusers_forward(ref, inputs, vision_len):
    vision = inputs.get("vision_states")
    if vision is None:  # diffusers detects t2v from all-zero image embeddings
        vision = torch.zeros(inputs["x"].shape[0], vision_len, ref.config.image_embed_dim)
    return ref(
        inputs["x"], inputs["t"], inputs["text_states"], inputs["text_mask"],
        timestep_r=inputs.get("timestep_r"),
        encoder_hidden_states_2=inputs["byt5_states"], encoder_attention_mask_2=inputs["byt5_mask"],
        image_embeds=vision, return_dict=False,
    )[0]


@pytest.mark.parametrize("case", ["t2v", "i2v", "meanflow_i2v", "meanflow_t2v"])
def test_matches_diffusers(case):
    meanflow = case.startswith("meanflow")
    ref, model = _pair(meanflow)
    vision_len = 5
    inputs = random_inputs(
        model.config, batch=3, latent=(3, 4, 6), vision_len=vision_len if case.endswith("i2v") else None,
        meanflow=meanflow, seed=2,
    )
    assert inputs["text_mask"][:, 0].all()  # see test_refiner_keeps_slot_0 for the other case
    with torch.no_grad():
        expected = _diffusers_forward(ref, inputs, vision_len)
        got = model(**inputs)
    assert got.shape == expected.shape == (3, 32, 3, 4, 6)
    assert rel_l2(got, expected) <= 1e-5


def test_names_round_trip():
    ref, model = _pair(meanflow=True)
    official = model.state_dict()
    there = official_to_diffusers(official)
    assert set(there) == set(ref.state_dict())
    back = diffusers_to_official(there)
    assert set(back) == set(official)
    assert all(torch.equal(back[k], official[k]) for k in official)


def test_padded_slots_do_not_change_the_output():
    _, model = _pair(meanflow=False)
    inputs = random_inputs(model.config, batch=2, vision_len=5, seed=3)
    with torch.no_grad():
        before = model(**inputs)
        noisy = dict(inputs)
        for states, mask in (("text_states", "text_mask"), ("byt5_states", "byt5_mask")):
            pad = ~inputs[mask].bool()
            noisy[states] = torch.where(pad[..., None], 100 * torch.randn_like(inputs[states]), inputs[states])
        after = model(**noisy)
    assert rel_l2(after, before) <= 1e-6


def test_refiner_keeps_slot_0():
    """Official behaviour (not diffusers'): the refiner always attends to LLM slot 0, even padded."""
    ref, model = _pair(meanflow=False)
    inputs = random_inputs(model.config, batch=2, seed=4)
    inputs["text_mask"][:, 0] = 0
    changed = dict(inputs, text_states=inputs["text_states"].clone())
    changed["text_states"][:, 0] += 5.0
    with torch.no_grad():
        ours = rel_l2(model(**changed), model(**inputs))
        theirs = rel_l2(_diffusers_forward(ref, changed, 5), _diffusers_forward(ref, inputs, 5))
    assert ours > 1e-3  # slot 0 reaches valid tokens through the refiner's attention
    assert theirs < 1e-6  # diffusers masks it out entirely
