"""The encoder half of Qwen3-VL-MoE: processor plus ViT, loaded without any language weight.

``VisionEncoder.preprocess`` (CPU, no weights) and ``run_vision`` (the ViT forward) are separate
so that a server can overlap the buffer-allocation round trip with the ViT. ``encode`` and
``encode_batch`` chain the two.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoProcessor
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import (
    Qwen3VLMoeVisionModel,
    Qwen3VLMoeVisionRotaryEmbedding,
)

from encode_server.images import ImageLimits
from encode_server.preprocess import PreprocessedPrompt, Preprocessor
from encode_server.weights import load_prefixed

log = logging.getLogger(__name__)

VISUAL_PREFIX = "model.visual."
N_DEEPSTACK = 3


@dataclass(frozen=True)
class EncodedPrompt:
    """What the language side needs for one prompt.

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


class VisionEncoder:
    """Processor + ``Qwen3VLMoeVisionModel``; holds no decoder layer and no language tensor."""

    def __init__(
        self, preprocessor: Preprocessor, vision: Qwen3VLMoeVisionModel, hidden: int
    ) -> None:
        self.preprocessor = preprocessor
        self.vision = vision.eval().requires_grad_(False)
        self.hidden = hidden

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        limits: ImageLimits | None = None,
    ) -> VisionEncoder:
        """Load the processor and only the ``model.visual.*`` tensors of a checkpoint directory."""
        config = AutoConfig.from_pretrained(model_dir)
        processor = AutoProcessor.from_pretrained(model_dir)
        vision = _build_vision(config.vision_config, model_dir, device, dtype)
        preprocessor = Preprocessor(processor, config, limits or ImageLimits())
        log.info(
            "vision encoder from %s: %d parameters, %s on %s",
            model_dir,
            sum(p.numel() for p in vision.parameters()),
            dtype,
            device,
        )
        return cls(preprocessor, vision, config.text_config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.vision.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def preprocess(self, messages: Any) -> PreprocessedPrompt:
        """Chat messages -> ids, positions, pixels. CPU only; ValueError on bad input."""
        return self.preprocessor(messages)

    @torch.no_grad()
    def run_vision(self, prompts: list[PreprocessedPrompt]) -> list[EncodedPrompt]:
        """One ViT forward over every image of ``prompts``; one EncodedPrompt per prompt, in order.

        Prompts without images get empty [0, H] / [0, 3H] tensors. Blocking; returned tensors
        are fresh (the caller owns them).
        """
        with_images = [p for p in prompts if p.pixel_values is not None]
        if with_images:
            embeds, deepstack = self._forward(with_images)
            embeds_parts = embeds.split([p.n_vis for p in with_images])
            deepstack_parts = deepstack.split([p.n_vis for p in with_images])
        out, k = [], 0
        for prompt in prompts:
            if prompt.pixel_values is None:
                e = torch.zeros(0, self.hidden, device=self.device, dtype=self.dtype)
                d = torch.zeros(0, N_DEEPSTACK * self.hidden, device=self.device, dtype=self.dtype)
            else:
                e, d, k = embeds_parts[k].contiguous(), deepstack_parts[k].contiguous(), k + 1
            out.append(_encoded(prompt, e, d))
        return out

    def encode(self, messages: Any) -> EncodedPrompt:
        """Preprocess and encode one prompt."""
        return self.run_vision([self.preprocess(messages)])[0]

    def encode_batch(self, batch: list[Any]) -> list[EncodedPrompt]:
        """Preprocess several prompts, then encode all of their images in ONE ViT forward."""
        return self.run_vision([self.preprocess(m) for m in batch])

    def _forward(self, prompts: list[PreprocessedPrompt]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.cat([p.pixel_values for p in prompts]).to(self.device, self.dtype)
        grid = torch.cat([p.image_grid_thw for p in prompts]).to(self.device)
        output = self.vision(pixels, grid_thw=grid, return_dict=True)
        deepstack = torch.cat(list(output.deepstack_features), dim=-1)
        if deepstack.shape[-1] != N_DEEPSTACK * self.hidden:
            raise RuntimeError(f"expected {N_DEEPSTACK} deepstack features, got {deepstack.shape}")
        return output.pooler_output, deepstack


def _encoded(prompt: PreprocessedPrompt, embeds: torch.Tensor, deepstack: torch.Tensor):
    return EncodedPrompt(
        input_ids=prompt.input_ids,
        positions=prompt.positions,
        mrope_delta=prompt.mrope_delta,
        visual_mask=prompt.visual_mask,
        embeds=embeds,
        deepstack=deepstack,
        image_grid_thw=prompt.image_grid_thw,
        n_vis=prompt.n_vis,
    )


def _build_vision(vision_config, model_dir, device, dtype) -> Qwen3VLMoeVisionModel:
    """Build the ViT on the meta device, then assign the checkpoint's tensors (no random init)."""
    state = load_prefixed(model_dir, VISUAL_PREFIX, device, dtype)
    with torch.device("meta"):
        vision = Qwen3VLMoeVisionModel(vision_config)
    vision.load_state_dict(state, strict=True, assign=True)
    with torch.device(device):
        vision.rotary_pos_emb = Qwen3VLMoeVisionRotaryEmbedding(vision_config)
    leftover = [n for n, t in [*vision.named_parameters(), *vision.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"vision tensors not loaded from the checkpoint: {leftover[:5]}")
    return vision
