"""An offline byte-level tokenizer and Qwen3-VL processor for the tiny checkpoint.

256 byte-level tokens (no merges) followed by the Qwen special tokens, a chat template that
emits ``<|vision_start|><|image_pad|><|vision_end|>`` per image item, and an image processor with
patch 16, merge 2 and an explicit mean/std. Nothing is downloaded.
"""

from __future__ import annotations

import itertools

from tokenizers import AddedToken
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# One turn per message; string or list content; every image item becomes one vision block that
# the processor expands to t*h*w/merge^2 image pads.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] in ['image', 'image_url'] -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item['type'] in ['video', 'video_url'] -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

MEAN_STD = [0.5, 0.5, 0.5]
PATCH, MERGE, TEMPORAL = 16, 2, 2
MIN_PIXELS = 4 * (PATCH * MERGE) ** 2  # at least 4 visual tokens
MAX_PIXELS = 1024 * (PATCH * MERGE) ** 2  # at most 1024 visual tokens


def _merges(n: int) -> list[tuple[str, str]]:
    """``n`` two-character BPE merges, common characters first, so every id decodes to text."""
    chars = sorted(ByteLevel.alphabet())
    first = [c for c in _COMMON if c in chars]
    order = first + [c for c in chars if c not in first]
    pairs = ((a, b) for a in order for b in order)
    merges = list(itertools.islice(pairs, n))
    if len(merges) < n:
        raise ValueError(f"the tiny tokenizer supports at most {len(order) ** 2} merges, not {n}")
    return merges


_COMMON = "Ġetaoinshrdlucmfwypvbgkjqxz"


def build_tokenizer(vocab_size: int = 1000) -> Qwen2Tokenizer:
    """Byte-level Qwen2 tokenizer of exactly ``vocab_size`` ids: 256 bytes, two-character merges,
    then the special tokens in the last ids."""
    n_base = vocab_size - len(SPECIAL_TOKENS)
    chars = sorted(ByteLevel.alphabet())
    merges = _merges(n_base - len(chars))
    vocab = {ch: i for i, ch in enumerate(chars)}
    vocab.update({a + b: len(chars) + i for i, (a, b) in enumerate(merges)})
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS
            ]
        }
    )
    return tok


def build_processor(vocab_size: int = 1000) -> Qwen3VLProcessor:
    """The Qwen3VLProcessor saved beside the tiny weights."""
    image = Qwen2VLImageProcessor(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        image_mean=MEAN_STD,
        image_std=MEAN_STD,
    )
    video = Qwen3VLVideoProcessor(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        image_mean=MEAN_STD,
        image_std=MEAN_STD,
    )
    return Qwen3VLProcessor(
        image_processor=image,
        tokenizer=build_tokenizer(vocab_size),
        video_processor=video,
        chat_template=CHAT_TEMPLATE,
    )
