"""Prompt encoding as the official pipeline does it: the Qwen2.5-VL language model read through
the video prompt template, and the Glyph-ByT5 encoder for text quoted in the prompt.

LLM: the prompt goes into the official chat template (a fixed system message that asks for a
video description, then the prompt as the user turn, then the assistant header), padded to
``crop_start + 1000`` tokens; the hidden state 3 from the end (``hidden_states[-3]``, no final
norm) is kept from ``crop_start`` on, where ``crop_start`` is the position just after
``<|im_start|>user\\n`` in the template around a fixed reference prompt (108 with the Qwen2.5-VL
tokenizer), the same for every prompt. An empty prompt is sent as " ".

ByT5: the distinct strings in "..." or “...” become ``Text "a". Text "b". ``, tokenized to 256
bytes and encoded by the T5 encoder; a prompt without quotes gives zeros and an all-zero mask.
The reference encodes the positive prompt's glyphs only: the negative side is always empty.

Without weights, ``tiny_llm`` / ``tiny_byt5`` build the same model classes from small configs
with trained-scale random weights, and a byte-level tokenizer with the Qwen chat template.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig, AutoModel, AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast,
    Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel,
)

from .files import InputError
from .random_init import randomize_like_trained_

LLM_MAX_LENGTH = 1000
BYT5_MAX_LENGTH = 256
HIDDEN_STATE_SKIP_LAYER = 2  # hidden_states[-(2 + 1)]
USER_MARKER = "<|im_start|>user\n"
REFERENCE_PROMPT = "a photo of a cat"  # the official TextEncoder's, for the crop position
# The official PROMPT_TEMPLATE_ENCODE_VIDEO_JSON system message, byte for byte (its source
# continues the string over lines with backslashes, which leaves 8 spaces before each item).
VIDEO_SYSTEM_MESSAGE = (
    "You are a helpful assistant. Describe the video by detailing the following aspects:"
    "         1. The main content and theme of the video."
    "         2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "         3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "         4. background environment, light, style and atmosphere."
    "         5. camera angles, movements, and transitions used in the video."
)
# Qwen2.5-VL's chat template, reduced to text-only messages (what the encoder is given).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_GLYPH_PATTERN = re.compile(r"\"(.*?)\"|“(.*?)”")


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A tokenizer and the model that reads its tokens; ``source`` is a folder or "tiny"."""

    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module
    source: str

    @property
    def width(self) -> int:
        config = self.model.config
        return int(getattr(config, "d_model", None) or config.hidden_size)


@dataclasses.dataclass(frozen=True)
class Encoded:
    states: torch.Tensor  # (1, length, width) float32
    mask: torch.Tensor  # (1, length) int64
    dropped_tokens: int  # how many tokens truncation cut off (0: none)


def _require_folder(flag: str, folder: Path, *files: str) -> None:
    if not folder.is_dir():
        raise InputError(f"{flag} {folder}: no such folder")
    for name in files:
        if not (folder / name).is_file():
            raise InputError(f"{flag} {folder}: no {name} in it (see README: weights to download)")


# ---- LLM (Qwen2.5-VL-7B-Instruct's language model) -------------------------------------------

def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte plus Qwen's special tokens and chat template."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|endoftext|>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"], padding_side="right", chat_template=CHAT_TEMPLATE,
    )


def tiny_llm(width: int, dtype: torch.dtype = torch.float32, seed: int = 0,
             tokenizer: PreTrainedTokenizerBase | None = None) -> Encoder:
    """A 3-layer Qwen2.5-VL text model ``width`` wide, reading ``tokenizer``'s tokens (default:
    ``byte_level_tokenizer``)."""
    tokenizer = tokenizer or byte_level_tokenizer()
    heads = 4
    half = width // heads // 2
    config = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
        num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=2048,
        rope_scaling={"type": "mrope", "mrope_section": [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]},
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
    )
    model = randomize_like_trained_(Qwen2_5_VLTextModel(config), seed=seed)
    return Encoder(tokenizer, model.to(dtype).eval(), "tiny")


def llm_width(folder: Path) -> int:
    """Hidden size of the language model in a Qwen2.5-VL folder, from its config only."""
    _require_folder("{text_encoder}", folder, "config.json")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, OSError, KeyError) as e:
        raise InputError(f"{{text_encoder}} {folder}: cannot read config.json ({e})") from None
    text = getattr(config, "text_config", config)
    return int(text.hidden_size)


def load_llm(folder: Path, dtype: torch.dtype) -> Encoder:
    """Qwen2.5-VL-7B-Instruct as downloaded (the official ``ckpts/text_encoder/llm``): the full
    model is loaded as the reference does and its language model kept."""
    llm_width(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="right")
    model = AutoModel.from_pretrained(folder, dtype=dtype)
    model = getattr(model, "language_model", model)
    model.requires_grad_(False)
    return Encoder(tokenizer, model.eval(), str(folder))


def _template(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": VIDEO_SYSTEM_MESSAGE}, {"role": "user", "content": prompt or " "}]


def _tokenize_chat(tokenizer: PreTrainedTokenizerBase, prompt: str, **kwargs: Any) -> dict[str, torch.Tensor]:
    return tokenizer.apply_chat_template(
        _template(prompt), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kwargs
    )


def crop_start(tokenizer: PreTrainedTokenizerBase) -> int:
    """Where every prompt's tokens are cut: the index just after ``<|im_start|>user\\n`` in the
    template around ``REFERENCE_PROMPT``. The official TextEncoder finds it once, when it is built,
    and cuts every prompt there; a prompt whose leading whitespace merges with the marker's newline
    (Qwen's BPE joins "\\n\\n") has no marker of its own, and is still cut at that index."""
    input_ids = _tokenize_chat(tokenizer, REFERENCE_PROMPT)["input_ids"][0].tolist()
    marker = tokenizer(USER_MARKER, add_special_tokens=False)["input_ids"]
    for i in range(len(input_ids) - len(marker) + 1):
        if input_ids[i:i + len(marker)] == marker:
            return i + len(marker)
    raise InputError(f"the text encoder's tokenizer does not produce the {USER_MARKER!r} marker of the chat template")


# (encoder, input_ids, attention_mask) -> the states the encoding keeps, float32: the model's forward
# eagerly on the host (``eager_llm``, ``eager_byt5``) or jitted on the accelerator (``encoder_runtime``)
ModelCall = Callable[[Encoder, torch.Tensor, torch.Tensor], torch.Tensor]


def eager_llm(encoder: Encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``hidden_states[-3]`` of the language model, eagerly."""
    with torch.no_grad():
        out = encoder.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return out.hidden_states[-(HIDDEN_STATE_SKIP_LAYER + 1)].float()


def llm_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str,
               max_length: int = LLM_MAX_LENGTH) -> tuple[dict[str, torch.Tensor], int, int]:
    """The templated prompt padded to ``crop_start + max_length`` tokens (one shape for every
    prompt), the crop position, and how many tokens truncation dropped."""
    start = crop_start(tokenizer)
    full = _tokenize_chat(tokenizer, prompt)["input_ids"][0].tolist()
    tokens = _tokenize_chat(tokenizer, prompt, padding="max_length", truncation=True, max_length=start + max_length)
    return tokens, start, max(0, len(full) - start - max_length)


def encode_llm(encoder: Encoder, prompt: str, max_length: int = LLM_MAX_LENGTH, run: ModelCall = eager_llm) -> Encoded:
    tokens, start, dropped = llm_tokens(encoder.tokenizer, prompt, max_length)
    states = run(encoder, tokens["input_ids"], tokens["attention_mask"])
    return Encoded(states[:, start:].float(), tokens["attention_mask"][:, start:].long(), dropped)


# ---- ByT5 glyph encoder (google/byt5-small + Glyph-SDXL-v2 weights) --------------------------

def glyph_texts(prompt: str) -> list[str]:
    """The strings quoted in the prompt, duplicates dropped (first occurrence kept)."""
    found = [a or b for a, b in _GLYPH_PATTERN.findall(prompt)]
    return list(dict.fromkeys(found))


def glyph_prompt(prompt: str) -> str | None:
    """What the ByT5 encoder reads: ``Text "a". Text "b". `` or None when nothing is quoted."""
    texts = glyph_texts(prompt)
    return "".join(f'Text "{t}". ' for t in texts) if texts else None


def tiny_byt5(width: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Encoder:
    """A 2-layer T5 encoder ``width`` wide with the (file-less, byte-level) ByT5 tokenizer."""
    tokenizer = ByT5Tokenizer()
    heads = 4
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=max(1, width // heads), d_ff=2 * width,
                      num_layers=2, num_heads=heads, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0)
    model = randomize_like_trained_(T5EncoderModel(config), seed=seed)
    return Encoder(tokenizer, model.to(dtype).eval(), "tiny")


def _glyph_special_tokens(assets: Path) -> list[str]:
    """The color and font tokens Glyph-SDXL-v2 adds to the ByT5 vocabulary, in its order."""
    tables = {}
    for name in ("color_idx.json", "multilingual_10-lang_idx.json"):
        try:
            tables[name] = json.loads((assets / name).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{assets / name}: cannot read ({e})") from None
    colors = [f"<color-{i}>" for i in range(len(tables["color_idx.json"]))]
    fonts = [f"<{code[:2]}-font-{idx}>" for code, idx in tables["multilingual_10-lang_idx.json"].items()]
    return colors + fonts


def byt5_folders(folder: Path) -> tuple[Path, Path]:
    """(Glyph-SDXL-v2 folder, byt5-small folder) of the official layout, checked."""
    _require_folder("{byt5}", folder, "checkpoints/byt5_model.pt", "assets/color_idx.json",
                    "assets/multilingual_10-lang_idx.json")
    base = folder.parent / "byt5-small"
    if not (base / "config.json").is_file():
        raise InputError(f"{{byt5}} {folder}: no byt5-small/config.json beside it ({base}; google/byt5-small, see README)")
    return folder, base


def byt5_width(folder: Path) -> int:
    _, base = byt5_folders(folder)
    try:
        return int(T5Config.from_pretrained(base).d_model)
    except (ValueError, OSError) as e:
        raise InputError(f"{base / 'config.json'}: cannot read ({e})") from None


def load_byt5(folder: Path, dtype: torch.dtype) -> Encoder:
    """The official glyph encoder: google/byt5-small's config and tokenizer, the Glyph-SDXL-v2
    color and font tokens added, and its ``checkpoints/byt5_model.pt`` encoder weights.

    ``folder`` is the Glyph-SDXL-v2 folder; byt5-small is expected beside it, as in the official
    ``ckpts/text_encoder`` layout. byt5-small's own weights are not read: every encoder tensor
    comes from the Glyph checkpoint.
    """
    glyph, base = byt5_folders(folder)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(_glyph_special_tokens(glyph / "assets"), special_tokens=True)
    model = T5EncoderModel(T5Config.from_pretrained(base))
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    path = glyph / "checkpoints" / "byt5_model.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise InputError(f"{path}: cannot read ({e})") from None
    if "state_dict" in state:  # the training checkpoint form: keep the text tower's encoder
        prefix = "module.text_tower.encoder."
        state = {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    try:
        model.encoder.load_state_dict(state)
    except RuntimeError as e:
        raise InputError(f"{path}: does not fit byt5-small with the Glyph tokens added ({str(e).splitlines()[0]})") from None
    model.requires_grad_(False)
    return Encoder(tokenizer, model.to(dtype).eval(), str(folder))


def eager_byt5(encoder: Encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The T5 encoder's last hidden state, eagerly."""
    with torch.no_grad():
        return encoder.model(input_ids=input_ids, attention_mask=attention_mask.float())[0].float()


def encode_byt5(encoder: Encoder, prompt: str, max_length: int = BYT5_MAX_LENGTH,
                run: ModelCall = eager_byt5) -> Encoded:
    text = glyph_prompt(prompt)
    if text is None:
        return Encoded(torch.zeros(1, max_length, encoder.width), torch.zeros(1, max_length, dtype=torch.long), 0)
    dropped = max(0, len(encoder.tokenizer(text)["input_ids"]) - max_length)
    tokens = encoder.tokenizer(text, padding="max_length", max_length=max_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt")
    states = run(encoder, tokens["input_ids"], tokens["attention_mask"])
    return Encoded(states.float(), tokens["attention_mask"].long(), dropped)
