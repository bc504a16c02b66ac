"""hunyuan_tpu.encoder_runtime: stage 1's encoders jitted through torchax against eager PyTorch
(tiny models, float32 unless said), and one compile per padded length."""

import numpy as np
import pytest
import torch
from PIL import Image

from hunyuan_tpu import encoder_runtime as er
from hunyuan_tpu import image_condition as ic
from hunyuan_tpu import text_encoding as te
from hunyuan_tpu.files import InputError
from hunyuan_tpu.metrics import rel_l2

LLM_LENGTH = 48  # stage 1 pads to crop_start + 1000; any fixed length exercises the same program


def _llm_tokens(encoder: te.Encoder, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = encoder.tokenizer(text, padding="max_length", truncation=True, max_length=LLM_LENGTH, return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"]


def _eager_llm(encoder: te.Encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = encoder.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[-(te.HIDDEN_STATE_SKIP_LAYER + 1)].float()


def test_llm_matches_eager_and_compiles_once_per_padded_length():
    llm = te.tiny_llm(64)
    runner = er.jax_llm(llm.model)
    # two padded prompts of different lengths, then one that fills every slot (no padding: the
    # eager path's causal-only branch, a boolean mask under jit)
    for text in ("a red fox", "a cat walks on the grass at dawn", "x" * 2 * LLM_LENGTH):
        ids, mask = _llm_tokens(llm, text)
        got = er.encode_llm_jax(runner, ids, mask)
        expected = _eager_llm(llm, ids, mask)
        assert got.shape == expected.shape == (1, LLM_LENGTH, 64) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not mask.eq(0).any() and runner.compiled_shapes == 1


def test_llm_keeps_the_hidden_state_text_encoding_reads():
    assert er.LLM_HIDDEN_STATE == -(te.HIDDEN_STATE_SKIP_LAYER + 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llm_in_half_precision_stays_within_its_rounding(dtype):
    llm = te.tiny_llm(64, dtype)
    ids, mask = _llm_tokens(llm, "a red fox")
    got = er.encode_llm_jax(er.jax_llm(llm.model), ids, mask)
    assert got.dtype == torch.float32 and rel_l2(got.numpy(), _eager_llm(llm, ids, mask).numpy()) <= 2e-2


def test_byt5_matches_eager_with_the_model_left_as_it_was():
    byt5 = te.tiny_byt5(32)
    runner = er.jax_byt5(byt5.model)
    for text in ('Text "HI". ', 'Text "OPEN". Text "SALE 50%". '):
        tokens = byt5.tokenizer(text, padding="max_length", max_length=te.BYT5_MAX_LENGTH, truncation=True,
                                return_tensors="pt")
        got = er.encode_byt5_jax(runner, tokens["input_ids"], tokens["attention_mask"])
        with torch.no_grad():
            expected = byt5.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"].float())[0]
        assert got.shape == (1, te.BYT5_MAX_LENGTH, 32)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert runner.compiled_shapes == 1
    # traced with eager attention on a twin: the eager path's model keeps its own
    assert byt5.model.config._attn_implementation == "sdpa"


def test_siglip_matches_eager():
    vision = ic.tiny_siglip(48)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    pixels = vision.processor(images=np.asarray(image), return_tensors="pt")["pixel_values"]
    got = er.encode_siglip_jax(er.jax_siglip(vision.model), pixels)
    torch.testing.assert_close(got, ic.encode_siglip(vision, image), rtol=1e-5, atol=1e-5)


def test_as_the_eager_paths_model_call():
    """``encode_llm`` / ``encode_byt5`` with ``run=``: the whole encoding (template, crop) through the
    jitted model gives the eager encoding."""
    llm, byt5 = te.tiny_llm(64), te.tiny_byt5(32)
    prompt = 'a sign "OPEN" in the rain'
    got = te.encode_llm(llm, prompt, run=er.llm_call(er.jax_llm(llm.model)))
    expected = te.encode_llm(llm, prompt)
    torch.testing.assert_close(got.states, expected.states, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.mask, expected.mask)
    glyphs = te.encode_byt5(byt5, prompt, run=er.byt5_call(er.jax_byt5(byt5.model)))
    torch.testing.assert_close(glyphs.states, te.encode_byt5(byt5, prompt).states, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="another model"):
        te.encode_byt5(te.tiny_byt5(32, seed=1), prompt, run=er.byt5_call(er.jax_byt5(byt5.model)))


def test_mismatched_inputs_are_refused_in_one_line():
    runner = er.JaxEncoder(torch.nn.Linear(1, 1), lambda params, **inputs: None, {})
    with pytest.raises(InputError, match=r"input_ids \(1, 4\) and attention_mask \(1, 5\)"):
        er.encode_llm_jax(runner, torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(InputError, match="expected"):
        er.encode_siglip_jax(runner, torch.zeros(3, 8, 8))


def test_stage1_on_the_device_equals_the_host(tmp_path):
    import cli_runner
    from safetensors.torch import load_file

    image = tmp_path / "first.png"
    Image.fromarray((np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)).save(image)
    common = ["--prompt", 'a sign "OPEN"', "--image", image, "--text_encoder_dtype", "float32",
              "--vision_encoder_dtype", "float32", "--sr"]
    for backend in ("torch", "jax"):
        cli_runner.call("stage1_text_encoder.py", *common, "--encoder_backend", backend,
                        "--output_dir", tmp_path / backend)
    host, device = (load_file(str(tmp_path / b / "embeddings.safetensors")) for b in ("torch", "jax"))
    assert host.keys() == device.keys()
    for key in host:
        if host[key].is_floating_point() and host[key].any() and "image_cond" not in key:  # the VAE runs eagerly
            assert rel_l2(device[key].numpy(), host[key].numpy()) < 1e-5, key
        else:
            assert torch.equal(device[key], host[key]), key
