"""The disaggregated pipeline in one process, without transport: prompt, encoder, language half.

For parity tests and local experiments. The servers do the same with the data plane in between
(flow v3): the language side prepares the prompt (``PromptBuilder``), the encoder gets only each
image's bytes, and only the visual rows (``embeds`` and ``deepstack``) would travel.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from encode_server.vision import VisionEncoder
from language_server.engines.base import SamplingParams
from language_server.engines.reference.generate import (
    GenerationResult,
    build_input_embeds,
    generate,
)
from language_server.engines.reference.model import Qwen3MoeForCausalLMWithDeepStack
from language_server.prompt.builder import PreparedPrompt, PromptBuilder
from protocol.chat import ImageSourcePolicy, to_turns


@dataclass(frozen=True)
class EncodedPrompt:
    """What the language model needs for one prompt.

    input_ids [seq] long; positions [3, seq] long (M-RoPE); mrope_delta: decode step at text
    position p uses p + mrope_delta on all three axes; visual_mask [seq] bool; embeds [n_vis, H]
    and deepstack [n_vis, 3H] laid out [ds0 | ds1 | ds2], both contiguous, in the ViT's dtype;
    image_grid_thw [n_images, 3] long; n_vis == visual_mask.sum(). ids, positions, mask and grid
    stay on the CPU; embeds and deepstack are on the encoder's device.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    mrope_delta: int
    visual_mask: torch.Tensor
    embeds: torch.Tensor
    deepstack: torch.Tensor
    image_grid_thw: torch.Tensor
    n_vis: int
    video_grid_thw: torch.Tensor | None = None  # [n_videos, 3]
    kinds: tuple[str, ...] = ()  # each visual item's kind ("image" / "video"), prompt order
    item_rows: tuple[int, ...] = ()  # each visual item's rows, prompt order


class SplitPipeline:
    """``PromptBuilder`` (language side) + ``VisionEncoder`` (encode side), wired directly."""

    def __init__(self, builder: PromptBuilder, encoder: VisionEncoder) -> None:
        self.builder = builder
        self.encoder = encoder

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> SplitPipeline:
        encoder = VisionEncoder.from_pretrained(model_dir, device=device, dtype=dtype)
        return cls(PromptBuilder.from_pretrained(model_dir), encoder)

    @property
    def processor(self) -> Any:
        """The builder's Hugging Face processor (chat template, tokenizer, image processor)."""
        return self.builder.processor

    @property
    def tokenizer(self) -> Any:
        return self.builder.tokenizer

    def prepare(self, messages: Any, media_dir: Path | None = None) -> PreparedPrompt:
        """OpenAI-style messages -> the language side's prepared prompt (no pixel decoded).

        Image parts: ``{"type": "image_url", "image_url": {"url": URL}}`` or
        ``{"type": "image", "image": PIL image | encoded bytes | URL}``; URL is a ``data:`` URL or,
        with ``media_dir`` (as the server's ``--allowed-local-media-path``), a path inside it.
        PIL images travel as PNG bytes. ValueError (``PromptError``) on bad input.
        """
        turns, images = to_turns(_with_urls(messages), ImageSourcePolicy(local_root=media_dir))
        return self.builder.build(turns, images)

    def encode(self, messages: Any) -> EncodedPrompt:
        """Prepare and encode one prompt."""
        return self.encode_batch([messages])[0]

    def encode_batch(self, batch: list[Any]) -> list[EncodedPrompt]:
        """Prepare several prompts, then encode every image of every prompt in ONE ViT forward."""
        prepared = [self.prepare(messages) for messages in batch]
        pixels = []
        for prompt in prepared:
            for spec in prompt.images:
                image = self.encoder.preprocess(spec.data, spec.frames if spec.kind == "video"
                                                else (), spec.frame_data)  # fmt: skip
                if image.grid != spec.grid:
                    raise RuntimeError(f"encoder grid {image.grid} != prepared {spec.grid}")
                pixels.append(image)
        rows = iter(self.encoder.run_vision(pixels))
        return [self._encoded(p, [next(rows) for _ in p.images]) for p in prepared]

    def _encoded(self, prompt: PreparedPrompt, rows: list[tuple[torch.Tensor, torch.Tensor]]):
        hidden, device, dtype = self.encoder.hidden, self.encoder.device, self.encoder.dtype
        embeds = [e for e, _ in rows] or [torch.zeros(0, hidden, device=device, dtype=dtype)]
        deepstack = [d for _, d in rows] or [torch.zeros(0, 3 * hidden, device=device, dtype=dtype)]
        return EncodedPrompt(
            input_ids=prompt.input_ids,
            positions=prompt.positions,
            mrope_delta=prompt.mrope_delta,
            visual_mask=prompt.visual_mask,
            embeds=torch.cat(embeds),
            deepstack=torch.cat(deepstack),
            image_grid_thw=prompt.image_grid_thw,
            n_vis=prompt.n_vis,
            video_grid_thw=prompt.video_grid_thw,
            kinds=tuple(spec.kind for spec in prompt.images),
            item_rows=tuple(spec.n_tokens for spec in prompt.images),
        )


def _with_urls(messages: Any) -> Any:
    """``messages`` with PIL images and raw bytes in image parts turned into data URLs."""
    if not isinstance(messages, list):
        return messages
    return [
        {**m, "content": [_part_url(p) for p in m["content"]]}
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        else m
        for m in messages
    ]


def _part_url(part: Any) -> Any:
    if not isinstance(part, dict) or part.get("type") != "image":
        return part
    image = part.get("image")
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        image = buf.getvalue()
    if isinstance(image, bytes):
        return {
            "type": "image",
            "image": "data:image/png;base64," + base64.b64encode(image).decode(),
        }
    return part


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
    """Prompt builder, encoder and language model in one process: ``generate(messages, params)``."""

    def __init__(self, pipeline: SplitPipeline, model: Qwen3MoeForCausalLMWithDeepStack) -> None:
        self.pipeline = pipeline
        self.model = model

    def generate(self, messages: Any, params: SamplingParams) -> GenerationResult:
        return generate_encoded(self.model, self.pipeline.encode(messages), params)

    def decode(self, token_ids: tuple[int, ...]) -> str:
        return self.pipeline.tokenizer.decode(list(token_ids))
