"""The encoder half of Qwen3-VL-MoE: image processor plus ViT, without any language weight.

Flow v3: the encoder gets one image's (or video's) bytes per encode job and never sees prompt
text. ``preprocess`` (CPU, no weights: decode, checks, image or video processor) and
``run_vision`` (one ViT forward over a batch of images and videos) are separate so that a
scheduler can batch across jobs. The ViT attends within each temporal patch, so a video of grid
(t, h, w) and images batched with it do not see each other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoVideoProcessor
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import (
    Qwen3VLMoeVisionModel,
    Qwen3VLMoeVisionRotaryEmbedding,
)

from encode_server.images import ImageLimits, decode_image
from encode_server.videos import VideoLimits, decode_frames
from encode_server.weights import load_prefixed

log = logging.getLogger(__name__)

VISUAL_PREFIX = "model.visual."
Rows = tuple[torch.Tensor, torch.Tensor]  # (embeds [n, H], deepstack [n, 3H]) of one image
N_DEEPSTACK = 3


@dataclass(frozen=True)
class PreprocessedImage:
    """One image after the image processor, before the ViT.

    pixel_values [patches, C*T*P*P] on the CPU; grid (t, h, w) in patches; n_tokens: visual
    tokens after the spatial merge (t*h*w // merge**2); decode_s: seconds spent decoding (a
    video's frames; 0 for an image, whose decode is cheap and counted in preprocessing).
    """

    pixel_values: torch.Tensor
    grid: tuple[int, int, int]
    n_tokens: int
    decode_s: float = 0.0


class VisionEncoder:
    """Image processor + ``Qwen3VLMoeVisionModel``; holds no decoder layer and no language tensor."""

    def __init__(
        self,
        image_processor: Any,
        vision: Qwen3VLMoeVisionModel,
        hidden: int,
        limits: ImageLimits | None = None,
        video_processor: Any = None,
        video_limits: VideoLimits | None = None,
    ) -> None:
        self.image_processor = image_processor
        self.video_processor = video_processor
        self.vision = vision.eval().requires_grad_(False)
        self.hidden = hidden
        self.limits = limits or ImageLimits()
        self.video_limits = video_limits or VideoLimits()
        self.merge_size = int(vision.config.spatial_merge_size)
        if int(image_processor.merge_size) != self.merge_size:
            raise ValueError("the image processor's merge_size differs from the ViT's")

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        limits: ImageLimits | None = None,
        video_limits: VideoLimits | None = None,
    ) -> VisionEncoder:
        """Load the image and video processors and only the ``model.visual.*`` tensors of a
        checkpoint."""
        config = AutoConfig.from_pretrained(model_dir)
        image_processor = AutoImageProcessor.from_pretrained(model_dir)
        video_processor = AutoVideoProcessor.from_pretrained(model_dir)
        vision = _build_vision(config.vision_config, model_dir, device, dtype)
        log.info(
            "vision encoder from %s: %d parameters, %s on %s",
            model_dir,
            sum(p.numel() for p in vision.parameters()),
            dtype,
            device,
        )
        return cls(image_processor, vision, config.text_config.hidden_size, limits,
                   video_processor, video_limits)  # fmt: skip

    @property
    def device(self) -> torch.device:
        return next(self.vision.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def preprocess_image(self, data: bytes) -> PreprocessedImage:
        """Encoded bytes -> patches. CPU only, no weights; ValueError on bad input."""
        image = decode_image(data, self.limits)
        batch = self.image_processor(images=[image], return_tensors="pt")
        return self._patches(batch["pixel_values"], batch["image_grid_thw"][0])

    def preprocess(self, data: bytes, frames: Sequence[int] = (),
                   frame_data: Sequence[bytes] = ()) -> PreprocessedImage:  # fmt: skip
        """An image (``data``), or a video: a container (``data``) with the frame indices to
        sample, or the frames a client sampled (``frame_data``, each an encoded image), as an
        ``EncodeJob`` carries them -> patches. CPU only, no weights; ValueError on bad input."""
        if not frames and not frame_data:
            return self.preprocess_image(data)
        start = time.perf_counter()
        if frame_data:
            images = [np.asarray(decode_image(f, self.limits)) for f in frame_data]
            if len({f.shape for f in images}) != 1:
                raise ValueError("the video's frames differ in size")
            video = np.stack(images)
        else:
            video = decode_frames(data, list(frames), self.video_limits)
        decoded = time.perf_counter()
        return replace(self.preprocess_video(video), decode_s=decoded - start)

    def preprocess_video(self, frames: np.ndarray) -> PreprocessedImage:
        """Decoded frames ``[T, H, W, 3]`` uint8 (already sampled) -> patches, by the
        checkpoint's video processor. ValueError when it refuses them."""
        if self.video_processor is None:
            raise ValueError("this encoder has no video processor")
        try:
            batch = self.video_processor(videos=[frames], do_sample_frames=False,
                                         return_tensors="pt")  # fmt: skip
        except (ValueError, TypeError) as exc:  # e.g. fewer frames than a temporal patch
            raise ValueError(f"cannot preprocess the video: {exc}") from None
        return self._patches(batch["pixel_values_videos"], batch["video_grid_thw"][0])

    def _patches(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> PreprocessedImage:
        """A processor's output for one image or video: its rows are t*h*w // merge**2."""
        grid = tuple(int(x) for x in grid_thw)
        n_tokens = grid[0] * grid[1] * grid[2] // self.merge_size**2
        return PreprocessedImage(pixel_values, grid, n_tokens)  # type: ignore[arg-type]

    @torch.no_grad()
    def run_vision(
        self, images: list[PreprocessedImage], out: list[Rows | None] | None = None
    ) -> list[Rows]:
        """ONE ViT forward over ``images``; per image, in order, (embeds [n, H], deepstack [n, 3H]
        laid out [ds0 | ds1 | ds2]) in the ViT's dtype on its device.

        ``out[i]``, when given, is where image ``i``'s rows go (e.g. views into a staging
        arena); otherwise each image gets fresh tensors. Either way the split is the only copy,
        and every returned tensor is contiguous. Blocking on the CPU; on a GPU the copies are
        queued on the current stream (record an event before reading them elsewhere).
        """
        if not images:
            return []
        pixels = torch.cat([im.pixel_values for im in images]).to(self.device, self.dtype)
        grid = torch.tensor([im.grid for im in images], dtype=torch.long, device=self.device)
        output = self.vision(pixels, grid_thw=grid, return_dict=True)
        features = list(output.deepstack_features)
        if len(features) != N_DEEPSTACK:
            raise RuntimeError(f"expected {N_DEEPSTACK} deepstack features, got {len(features)}")
        rows, start = [], 0
        for i, im in enumerate(images):
            end = start + im.n_tokens
            target = out[i] if out is not None else None
            rows.append(self._split(output.pooler_output[start:end],
                                    [f[start:end] for f in features], target))  # fmt: skip
            start = end
        return rows

    def _split(self, embeds: torch.Tensor, features: list[torch.Tensor], out: Rows | None) -> Rows:
        if out is None:
            return embeds.clone(memory_format=torch.contiguous_format), torch.cat(features, -1)
        e, d = out
        e.copy_(embeds)
        torch.cat(features, dim=-1, out=d)
        return e, d


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
