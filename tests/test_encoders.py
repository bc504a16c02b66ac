"""hunyuan_tpu.text_encoding and image_condition: the official prompt handling, and loading every
encoder from the layout the real weights come in (tiny random models saved in that layout)."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ByT5Tokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, T5Config, T5EncoderModel

from hunyuan_tpu import image_condition as ic
from hunyuan_tpu import text_encoding as te
from hunyuan_tpu.files import InputError
from hunyuan_tpu.pipeline import bucket_size
from hunyuan_tpu.random_init import randomize_like_trained_
from official_layout import glyph_layout
from qwen_like_tokenizer import qwen_like_tokenizer


def test_glyph_texts_as_the_reference_extracts_them():
    prompt = 'A sign "OPEN", a banner “SALE 50%”, again "OPEN" and an empty "" one'
    assert te.glyph_texts(prompt) == ["OPEN", "SALE 50%", ""]
    assert te.glyph_prompt('A sign "OPEN" and “SALE”') == 'Text "OPEN". Text "SALE". '
    assert te.glyph_prompt("no quotes here") is None


def test_system_message_is_the_official_one():
    # sha256 of PROMPT_TEMPLATE_ENCODE_VIDEO_JSON[0]["content"] evaluated from the official source
    digest = hashlib.sha256(te.VIDEO_SYSTEM_MESSAGE.encode()).hexdigest()
    assert digest == "547f3e99c78b2d9b0786a721b726d41be95ee2f52ebf90db55f381b1511c3905"


@pytest.fixture(scope="module")
def llm():
    return te.tiny_llm(64)


def test_llm_keeps_hidden_state_3_from_the_end_after_the_user_marker(llm):
    encoded = te.encode_llm(llm, "a red fox")
    ids = te._tokenize_chat(llm.tokenizer, "a red fox")["input_ids"]
    start = te.crop_start(llm.tokenizer)
    assert llm.tokenizer.decode(ids[0, start - 5:start]) == "user\n"
    valid = ids.shape[1] - start
    # prompt bytes + <|im_end|> \n <|im_start|> assistant\n: the closing tokens stay, as in the reference
    assert valid == len("a red fox") + 3 + len("assistant\n")
    with torch.no_grad():
        reference = llm.model(input_ids=ids, output_hidden_states=True).hidden_states[-3][:, start:]
    assert encoded.states.shape == (1, te.LLM_MAX_LENGTH, 64) and encoded.dropped_tokens == 0
    assert encoded.mask[0, :valid].all() and not encoded.mask[0, valid:].any()
    torch.testing.assert_close(encoded.states[:, :valid], reference, rtol=1e-5, atol=1e-5)
    last = llm.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, start:]
    assert (encoded.states[:, :valid] - last).abs().max() > 1e-2  # not the last layer


@torch.no_grad()
def _official_llm_encoding(encoder: te.Encoder, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The official TextEncoder, re-stated: the crop position found once on "a photo of a cat"
    (a 256-token padded pass), then every prompt templated, padded to crop + 1000 and cut there."""
    tokenizer = encoder.tokenizer

    def chat(text, max_length):
        messages = [{"role": "system", "content": te.VIDEO_SYSTEM_MESSAGE}, {"role": "user", "content": text or " "}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             truncation=True, max_length=max_length, padding="max_length",
                                             return_tensors="pt")
    ids = chat("a photo of a cat", 256)["input_ids"][0].tolist()
    marker = tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    crop = next(i + len(marker) for i in range(len(ids)) if ids[i:i + len(marker)] == marker)
    tokens = chat(prompt, 1000 + crop)
    hidden = encoder.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                           output_hidden_states=True).hidden_states[-3]
    return hidden[:, crop:], tokens["attention_mask"][:, crop:]


QWEN_EDGE_PROMPTS = ["\nA cat walks", "\n\nA cat", " A cat", "  \n A cat", "\tA cat", "\r\nA cat", "   ", "\n",
                     '"OPEN" sign', "“SALE” banner", "一只猫在草地上行走。", "A cat walks on the grass, realistic.", ""]


def test_crop_position_is_the_official_one_for_every_prompt():
    # a tokenizer that merges whitespace as Qwen's does: "user\n" + "\nA" gives "user", "\n\n", "A"
    encoder = te.tiny_llm(64, tokenizer=qwen_like_tokenizer())
    ids = te._tokenize_chat(encoder.tokenizer, "\nA cat walks")["input_ids"][0].tolist()
    marker = encoder.tokenizer(te.USER_MARKER, add_special_tokens=False)["input_ids"]
    assert not any(ids[i:i + len(marker)] == marker for i in range(len(ids)))  # no marker of its own
    for prompt in QWEN_EDGE_PROMPTS:
        states, mask = _official_llm_encoding(encoder, prompt)
        encoded = te.encode_llm(encoder, prompt)
        assert torch.equal(encoded.mask, mask.long()), repr(prompt)
        torch.testing.assert_close(encoded.states, states.float(), rtol=0, atol=0, msg=repr(prompt))


def test_llm_truncates_long_prompts_and_reads_empty_as_space(llm):
    long = te.encode_llm(llm, "x" * 1200)
    assert long.states.shape[1] == te.LLM_MAX_LENGTH and long.mask.all()
    assert long.dropped_tokens == 1200 + 3 + len("assistant\n") - te.LLM_MAX_LENGTH
    torch.testing.assert_close(te.encode_llm(llm, "").states, te.encode_llm(llm, " ").states)


def test_byt5_zeros_without_quotes_and_the_encoder_with(tmp_path):
    byt5 = te.tiny_byt5(32)
    empty = te.encode_byt5(byt5, "nothing quoted")
    assert empty.states.shape == (1, te.BYT5_MAX_LENGTH, 32) and not empty.states.any() and not empty.mask.any()
    encoded = te.encode_byt5(byt5, 'a sign "HI"')
    text = 'Text "HI". '
    assert int(encoded.mask.sum()) == len(text) + 1  # one token per byte, then </s>
    ids = torch.tensor([byt5.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        reference = byt5.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(encoded.states[:, : ids.shape[1]], reference, rtol=1e-5, atol=1e-5)
    assert te.encode_byt5(byt5, '"' + "y" * 300 + '"').dropped_tokens == len('Text "') + 300 + len('". ') + 1 - 256


# ---- loading from the real layouts -----------------------------------------------------------

def test_load_llm_from_a_qwen25_vl_folder(llm, tmp_path):
    config = Qwen2_5_VLConfig(
        text_config=llm.model.config.to_dict(),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[0]),
    )
    full = Qwen2_5_VLForConditionalGeneration(config)
    full.model.language_model.load_state_dict(llm.model.state_dict())
    full.save_pretrained(tmp_path / "llm")
    llm.tokenizer.save_pretrained(tmp_path / "llm")
    assert te.llm_width(tmp_path / "llm") == 64
    loaded = te.load_llm(tmp_path / "llm", torch.float32)
    ours, reference = te.encode_llm(loaded, 'a "quoted" prompt'), te.encode_llm(llm, 'a "quoted" prompt')
    torch.testing.assert_close(ours.states, reference.states)
    assert torch.equal(ours.mask, reference.mask)
    with pytest.raises(InputError, match="no config.json"):
        te.llm_width(tmp_path)


@pytest.mark.parametrize("wrapped", [False, True])
def test_load_byt5_from_the_glyph_layout(tmp_path, wrapped):
    tokenizer = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, decoder_start_token_id=0)
    encoder = T5EncoderModel(config)
    encoder.resize_token_embeddings(len(tokenizer) + 5, mean_resizing=False)  # 2 colors + 3 fonts
    randomize_like_trained_(encoder, seed=3).eval()
    glyph = glyph_layout(tmp_path, encoder, wrapped)
    encoder.config.vocab_size = len(tokenizer)  # byt5-small's own config: without the Glyph tokens
    encoder.config.save_pretrained(tmp_path / "byt5-small")
    assert te.byt5_width(glyph) == 32
    loaded = te.load_byt5(glyph, torch.float32)
    assert loaded.tokenizer.convert_tokens_to_ids("<zh-font-1>") == len(tokenizer) + 3
    prompt = 'a sign "<color-1>HI"'
    ids = torch.tensor([loaded.tokenizer('Text "<color-1>HI". ')["input_ids"]])
    assert len(tokenizer) + 1 in ids[0].tolist()  # the Glyph color token is one token, as in the reference
    with torch.no_grad():
        reference = encoder.encoder(input_ids=ids).last_hidden_state
    torch.testing.assert_close(te.encode_byt5(loaded, prompt).states[:, : ids.shape[1]], reference, rtol=1e-5, atol=1e-5)


def test_load_byt5_errors(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        te.byt5_folders(tmp_path / "Glyph-SDXL-v2")
    (tmp_path / "Glyph-SDXL-v2" / "checkpoints").mkdir(parents=True)
    with pytest.raises(InputError, match="no checkpoints/byt5_model.pt"):
        te.byt5_folders(tmp_path / "Glyph-SDXL-v2")


# ---- the i2v image ---------------------------------------------------------------------------

def test_image_is_fitted_to_the_bucket_of_its_aspect_ratio(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((300, 400, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    image = ic.read_image(tmp_path / "in.png")
    assert ic.image_bucket(image, "480p") == bucket_size("480p", "4:3") == (544, 720)
    assert ic.image_bucket(image, "96p") == (112, 144)
    fitted = ic.resize_center_crop(image, 112, 144)
    assert fitted.size == (144, 112)
    pixels = ic.to_pixels(fitted)
    assert pixels.shape == (1, 3, 112, 144) and -1 <= float(pixels.min()) < float(pixels.max()) <= 1
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read the image"):
        ic.read_image(tmp_path / "bad.png")


def test_load_siglip_from_the_redux_layout(tmp_path):
    tiny = ic.tiny_siglip(48)
    tiny.model.save_pretrained(tmp_path / "siglip" / "image_encoder")
    tiny.processor.save_pretrained(tmp_path / "siglip" / "feature_extractor")
    loaded = ic.load_siglip(tmp_path / "siglip", torch.float32)
    image = Image.fromarray((np.random.default_rng(1).random((112, 144, 3)) * 255).astype(np.uint8))
    states = ic.encode_siglip(loaded, image)
    assert states.shape == (1, (ic.TINY_IMAGE_SIZE // 14) ** 2, 48)
    torch.testing.assert_close(states, ic.encode_siglip(tiny, image))
    with pytest.raises(InputError, match="no feature_extractor/preprocessor_config.json"):
        (tmp_path / "siglip" / "feature_extractor" / "preprocessor_config.json").unlink()
        ic.siglip_width(tmp_path / "siglip")
