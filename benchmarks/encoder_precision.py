"""Stage 1's embeddings at bfloat16 against the official precisions (Qwen2.5-VL and SigLIP float16,
ByT5 float32), and each against float32, on seeded random weights.

    python benchmarks/encoder_precision.py                 # tiny and wide stand-ins (a few minutes)
    python benchmarks/encoder_precision.py --sizes tiny    # seconds

Each encoder is built once with trained-scale random weights (``random_init``), copied to each
dtype, and given the same input: the LLM a templated prompt padded to crop_start + 1000 tokens
(the embeddings compared on the valid tokens), ByT5 a quoted text, SigLIP a seeded image. Drift is
the relative L2 and the largest absolute difference of the float32-cast outputs. Random weights
make this a measure of the arithmetic, not of what a trained model does with it: trained
activations have outliers that round differently, so measure on real weights before choosing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import numpy as np
import torch
from PIL import Image
from transformers import (
    Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, SiglipVisionConfig, SiglipVisionModel, T5Config, T5EncoderModel,
)

from hunyuan_tpu import image_condition as ic
from hunyuan_tpu import text_encoding as te
from hunyuan_tpu.metrics import rel_l2
from hunyuan_tpu.random_init import randomize_like_trained_

PROMPT = 'A neon sign that says "OPEN" flickers on a rainy street at night, reflections on the wet asphalt'
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OFFICIAL = {"llm": "float16", "byt5": "float32", "siglip": "float16"}


def llm(size: str) -> te.Encoder:
    if size == "tiny":
        return te.tiny_llm(64)
    # the released width and head layout, 4 of its 28 layers
    tokenizer = te.byte_level_tokenizer()
    config = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=3584, intermediate_size=18944, num_hidden_layers=4,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    return te.Encoder(tokenizer, randomize_like_trained_(Qwen2_5_VLTextModel(config), seed=0).eval(), "wide")


def byt5(size: str) -> te.Encoder:
    if size == "tiny":
        return te.tiny_byt5(32)
    tokenizer = te.tiny_byt5(32).tokenizer
    config = T5Config(vocab_size=len(tokenizer), d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0)  # byt5-small's encoder
    return te.Encoder(tokenizer, randomize_like_trained_(T5EncoderModel(config), seed=0).eval(), "wide")


def siglip(size: str) -> ic.VisionEncoder:
    if size == "tiny":
        return ic.tiny_siglip(48)
    config = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=6, num_attention_heads=16,
                                image_size=384, patch_size=14)  # so400m's width and patches, 6 of its 27 layers
    processor = ic.tiny_siglip(48).processor
    processor.size = {"height": 384, "width": 384}
    return ic.VisionEncoder(processor, randomize_like_trained_(SiglipVisionModel(config), seed=0).eval(), "wide")


def outputs(kind: str, encoder, dtype: torch.dtype) -> np.ndarray:
    cast = dataclasses.replace(encoder, model=copy.deepcopy(encoder.model).to(dtype))
    if kind == "llm":
        encoded = te.encode_llm(cast, PROMPT)
        return encoded.states[0, : int(encoded.mask.sum())].numpy()
    if kind == "byt5":
        encoded = te.encode_byt5(cast, PROMPT)
        return encoded.states[0, : int(encoded.mask.sum())].numpy()
    image = Image.fromarray((np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8))
    return ic.encode_siglip(cast, image)[0].numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "wide"], choices=["tiny", "wide"])
    args = p.parse_args()
    torch.manual_seed(0)
    print("| encoder | size | official | bf16 vs official: rel L2, max abs | bf16 vs fp32 | official vs fp32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, build in (("llm", llm), ("byt5", byt5), ("siglip", siglip)):
        for size in args.sizes:
            begin = time.perf_counter()
            encoder = build(size)
            out = {name: outputs(kind, encoder, dtype) for name, dtype in DTYPES.items()}
            official = out[OFFICIAL[kind]]

            def drift(a, b):
                return f"{rel_l2(a, b):.2e}, {np.abs(a - b).max():.2e}"
            print(f"| {kind} | {size} ({sum(t.numel() for t in encoder.model.parameters()) / 1e6:.0f}M) | "
                  f"{OFFICIAL[kind]} | {drift(out['bfloat16'], official)} | {drift(out['bfloat16'], out['float32'])} "
                  f"| {drift(official, out['float32'])} |  ({time.perf_counter() - begin:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
