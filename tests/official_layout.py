"""Tiny models saved in the layouts the released weights come in: the Glyph-SDXL-v2 folder, the
Qwen2.5-VL folder, and a whole checkpoint root as tencent/HunyuanVideo-1.5 ships ``ckpts/``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from transformers import ByT5Tokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, T5Config, T5EncoderModel

from hunyuan_tpu import image_condition as ic
from hunyuan_tpu import text_encoding as te
from hunyuan_tpu.checkpoint import save_transformer
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.model import HunyuanVideo15DiT
from hunyuan_tpu.random_init import randomize_like_trained_
from hunyuan_tpu.vae import tiny_vae

GLYPH_TOKENS = 5  # 2 colors + 3 fonts


def glyph_encoder(width: int, seed: int) -> T5EncoderModel:
    """A T5 encoder ``width`` wide with ByT5's vocabulary and the Glyph color and font tokens."""
    tokenizer = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, decoder_start_token_id=0)
    encoder = T5EncoderModel(config)
    encoder.resize_token_embeddings(len(tokenizer) + GLYPH_TOKENS, mean_resizing=False)
    return randomize_like_trained_(encoder, seed=seed).eval()


def glyph_layout(root: Path, encoder: T5EncoderModel, wrapped: bool) -> Path:
    """The official ckpts/text_encoder layout: byt5-small/ beside Glyph-SDXL-v2/."""
    base, glyph = root / "byt5-small", root / "Glyph-SDXL-v2"
    encoder.config.save_pretrained(base)
    ByT5Tokenizer().save_pretrained(base)
    (glyph / "assets").mkdir(parents=True)
    (glyph / "checkpoints").mkdir()
    (glyph / "assets" / "color_idx.json").write_text(json.dumps({"white": 0, "black": 1}))
    fonts = {"en-Roboto": 0, "zh-Song": 1, "fr-Arial": 2}
    (glyph / "assets" / "multilingual_10-lang_idx.json").write_text(json.dumps(fonts))
    state = encoder.encoder.state_dict()
    if wrapped:
        state = {"state_dict": {"module.text_tower.encoder." + k: v for k, v in state.items()}}
    torch.save(state, glyph / "checkpoints" / "byt5_model.pt")
    return glyph


def qwen_folder(folder: Path, llm: te.Encoder) -> Path:
    """``llm`` (a Qwen2.5-VL language model) saved as the whole Qwen2.5-VL model is downloaded."""
    config = Qwen2_5_VLConfig(
        text_config=llm.model.config.to_dict(),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=llm.model.config.hidden_size, fullatt_block_indexes=[0]),
    )
    full = Qwen2_5_VLForConditionalGeneration(config)
    full.model.language_model.load_state_dict(llm.model.state_dict())
    full.save_pretrained(folder)
    llm.tokenizer.save_pretrained(folder)
    return folder


def official_root(root: Path, version: str = "480p_t2v") -> Path:
    """A checkpoint root of tiny models in the official layout: transformer/<version>, vae,
    text_encoder/llm, text_encoder/Glyph-SDXL-v2 (byt5-small beside it); for an i2v version a DiT
    trained for i2v and vision_encoder/siglip (FLUX.1-Redux's image_encoder and feature_extractor)."""
    i2v = "i2v" in version
    cfg = dataclasses.replace(DiTConfig.preset("tiny"), ideal_task="i2v" if i2v else None)
    save_transformer(randomize_like_trained_(HunyuanVideo15DiT(cfg), seed=5).eval(), root / "transformer" / version)
    if i2v:
        siglip = ic.tiny_siglip(cfg.vision_states_dim)
        siglip.model.save_pretrained(root / "vision_encoder" / "siglip" / "image_encoder")
        siglip.processor.save_pretrained(root / "vision_encoder" / "siglip" / "feature_extractor")
    tiny_vae(seed=1).model.save_pretrained(root / "vae")
    qwen_folder(root / "text_encoder" / "llm", te.tiny_llm(cfg.text_states_dim, seed=2))
    glyph_layout(root / "text_encoder", glyph_encoder(cfg.byt5_states_dim, seed=3), wrapped=False)
    return root
