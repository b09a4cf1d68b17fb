"""The disaggregated pipeline in one process, without transport: encoder half -> language half.

For parity tests and local experiments. The servers do the same with the data plane in between:
only ``EncodedPrompt``'s visual rows (``embeds`` and ``deepstack``) would travel.
"""

from __future__ import annotations

from typing import Any

import torch

from encode_server.vision import EncodedPrompt, VisionEncoder
from language_server.generate import GenerationResult, SamplingParams, build_input_embeds, generate
from language_server.model import Qwen3MoeForCausalLMWithDeepStack


def language_inputs(
    model: Qwen3MoeForCausalLMWithDeepStack, encoded: EncodedPrompt
) -> dict[str, torch.Tensor | None]:
    """Keyword arguments for the language model's forward / generate for one encoded prompt."""
    if encoded.n_vis == 0:
        return {"input_embeds": None, "input_deepstack_embeds": None, "visual_mask": None}
    embeds, deepstack = build_input_embeds(
        model, encoded.input_ids, encoded.visual_mask, encoded.embeds, encoded.deepstack
    )
    return {
        "input_embeds": embeds,
        "input_deepstack_embeds": deepstack,
        "visual_mask": encoded.visual_mask.to(model.device),
    }


@torch.inference_mode()
def prefill_logits(model: Qwen3MoeForCausalLMWithDeepStack, encoded: EncodedPrompt) -> torch.Tensor:
    """Logits [seq, vocab] of the language half for every prompt position."""
    kwargs = language_inputs(model, encoded)
    input_ids = None if kwargs["input_embeds"] is not None else encoded.input_ids.to(model.device)
    return model(input_ids, encoded.positions.to(model.device), **kwargs)


def generate_encoded(
    model: Qwen3MoeForCausalLMWithDeepStack, encoded: EncodedPrompt, params: SamplingParams
) -> GenerationResult:
    """Generate from an already encoded prompt."""
    return generate(
        model, encoded.input_ids, encoded.positions, params, **language_inputs(model, encoded)
    )


class LocalPipeline:
    """Encoder and language model in one process: ``generate(messages, params)``."""

    def __init__(self, encoder: VisionEncoder, model: Qwen3MoeForCausalLMWithDeepStack) -> None:
        self.encoder = encoder
        self.model = model

    def generate(self, messages: Any, params: SamplingParams) -> GenerationResult:
        return generate_encoded(self.model, self.encoder.encode(messages), params)

    def decode(self, token_ids: tuple[int, ...]) -> str:
        return self.encoder.preprocessor.processor.tokenizer.decode(list(token_ids))
