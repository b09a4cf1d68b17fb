"""Chat messages -> token ids, M-RoPE positions and pixel patches (no model weights needed).

M-RoPE positions come from transformers' own ``Qwen3VLMoeModel.get_rope_index``, borrowed onto a
small holder of the config so that no language (or vision) model is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import Qwen3VLMoeConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeModel

from encode_server.images import ImageLimits, split_messages


@dataclass(frozen=True)
class PreprocessedPrompt:
    """One prompt after the processor, before the ViT.

    input_ids [seq] long; positions [3, seq] long (M-RoPE t/h/w); mrope_delta: the decode-time
    offset (text position p gets M-RoPE position p + mrope_delta); visual_mask [seq] bool;
    pixel_values [patches, C*T*P*P] or None without images; image_grid_thw [n_images, 3] long;
    n_vis: number of visual tokens (== visual_mask.sum()).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    mrope_delta: int
    visual_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor
    n_vis: int

    @property
    def n_images(self) -> int:
        return int(self.image_grid_thw.shape[0])


class _RopeIndex:
    """Just enough of Qwen3VLMoeModel for its get_rope_index: the config and one helper."""

    get_rope_index = Qwen3VLMoeModel.get_rope_index
    get_vision_position_ids = Qwen3VLMoeModel.get_vision_position_ids

    def __init__(self, config: Qwen3VLMoeConfig) -> None:
        self.config = config


class Preprocessor:
    """Owns the Hugging Face processor (chat template, tokenizer, image processor) and M-RoPE."""

    def __init__(self, processor: Any, config: Qwen3VLMoeConfig, limits: ImageLimits) -> None:
        self.processor = processor
        self.config = config
        self.limits = limits
        self._rope = _RopeIndex(config)
        self._merge = config.vision_config.spatial_merge_size

    def __call__(self, messages: Any) -> PreprocessedPrompt:
        """Validate and preprocess one prompt; ValueError on bad input. CPU only, no weights."""
        template_messages, images = split_messages(messages, self.limits)
        text = self.processor.apply_chat_template(
            template_messages, tokenize=False, add_generation_prompt=True
        )
        batch = self.processor(text=[text], images=images or None, return_tensors="pt")
        input_ids = batch["input_ids"][0].long()
        mm_types = batch["mm_token_type_ids"][0]
        grid = batch["image_grid_thw"].long() if images else torch.zeros(0, 3, dtype=torch.long)
        positions, delta = self._positions(input_ids, mm_types, grid)
        visual_mask = input_ids == self.config.image_token_id
        n_vis = int(visual_mask.sum())
        expected = int((grid.prod(-1) // self._merge**2).sum())
        if bool((mm_types == 2).any()):
            raise ValueError("video input is not supported")
        if n_vis != expected:
            raise ValueError(f"prompt has {n_vis} image pad tokens for {expected} visual tokens")
        return PreprocessedPrompt(
            input_ids=input_ids,
            positions=positions,
            mrope_delta=delta,
            visual_mask=visual_mask,
            pixel_values=batch["pixel_values"] if images else None,
            image_grid_thw=grid,
            n_vis=n_vis,
        )

    def _positions(
        self, input_ids: torch.Tensor, mm_types: torch.Tensor, grid: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        positions, deltas = self._rope.get_rope_index(
            input_ids[None],
            mm_token_type_ids=mm_types[None],
            image_grid_thw=grid if grid.shape[0] else None,
        )
        return positions[:, 0].contiguous(), int(deltas.reshape(-1)[0])
