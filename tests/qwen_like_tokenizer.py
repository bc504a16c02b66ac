"""A small BPE tokenizer trained here with Qwen2's pre-tokenizer rules, so that whitespace merges as
in the real one ("\\n\\n" is one token, a newline joins the spaces before it): the byte-level
tokenizer of the tiny models never merges, and hides what merging does to the chat template."""

from __future__ import annotations

import functools

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hunyuan_tpu import text_encoding as te

# Qwen2's tokenizer.json pre-tokenizer: this split (isolated), then byte-level without its own regex
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    lines = [te.VIDEO_SYSTEM_MESSAGE, "A cat walks on the grass, realistic.", "一只猫在草地上行走。",
             '"OPEN" sign', "user\n", "assistant\n"]
    whitespace = ["\n\n", "\n\n\n", " \n", "  \n", "\t\n", "\r\n", "\n ", "\t", "    ", "\n\t"]
    return [f"{a}{w}{b}" for a in lines for b in lines for w in whitespace] * 4


@functools.cache
def qwen_like_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|endoftext|>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"], padding_side="right", chat_template=te.CHAT_TEMPLATE,
    )
