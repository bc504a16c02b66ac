"""The released encoders' configurations (their config.json's), for building them on the meta
device: shapes without weights, for the projections and parameter counts."""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLTextConfig, SiglipVisionConfig, T5Config

LLM_LAYERS = 28


def qwen_config(layers: int = LLM_LAYERS, vocab: int = 152064) -> Qwen2_5_VLTextConfig:
    """Qwen2.5-VL-7B-Instruct's language model (its config.json's text part; the special token ids
    left out, which change nothing in a forward and may lie outside a cut vocabulary)."""
    return Qwen2_5_VLTextConfig(
        vocab_size=vocab, hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
        rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        bos_token_id=None, eos_token_id=None, pad_token_id=None)


def byt5_config() -> T5Config:
    """google/byt5-small's encoder, the vocabulary grown by Glyph-SDXL-v2's color and font tokens
    (about 1.5k in all; only the embedding's size depends on it)."""
    return T5Config(vocab_size=1536, d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6,
                    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, is_encoder_decoder=False)


def siglip_config() -> SiglipVisionConfig:
    """SigLIP so400m-patch14-384 (FLUX.1-Redux-dev's image_encoder): 729 patches."""
    return SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                              image_size=384, patch_size=14)


def qwen_vl_config() -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct whole, as downloaded: the language model and the vision tower (stage 1
    reads the whole folder and keeps the language model)."""
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584)
    return Qwen2_5_VLConfig(text_config=qwen_config().to_dict(), vision_config=vision)
