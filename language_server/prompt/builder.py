"""Prompt preparation on the language side (flow v3): everything but the pixels.

``PromptBuilder.build(turns, images)`` renders the checkpoint's chat template (one template for
every prompt, text-only included), tokenizes it, reads each image's size from its header only
(EXIF orientation honoured as the encoder's ``ImageOps.exif_transpose`` will), asks the image
processor's own resize rule for the patch grid, expands each ``<|image_pad|>`` to the image's
visual-token count and computes M-RoPE positions with transformers' ``get_rope_index``. A video
(``VideoSource``) is planned from its container's metadata (``container.probe``) or its frames'
headers (``video.plan_video``): its sampled frames, grid and timestamps; its ``<|video_pad|>``
becomes the timestamp text and vision tokens per temporal group that transformers' processor
writes. Every limit is checked here, before any encoder work: ``PromptError`` carries 400 or 413.

No pixel is decoded and no ViT runs on this side. ``build`` keeps no state between calls besides
the tokenizer, so it may run in a worker thread.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import ExifTags, Image
from transformers import AutoConfig, AutoProcessor, Qwen3VLMoeConfig
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeModel

from language_server.prompt.limits import PromptError, PromptLimits
from language_server.prompt.video import VideoPlan, VideoRules, plan_source, video_key
from protocol.chat import VideoSource, to_messages
from protocol.messages import ChatTurn

SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that transpose width and height
MAX_ASPECT = 200  # the image processor's own bound (smart_resize)


@dataclass(frozen=True)
class ImageSpec:
    """One visual item of a prompt (an image, or a video: ``kind``): its bytes (untouched) and
    the grid the encoder must produce."""

    data: bytes  # an image's bytes, or a video's container (empty for client-sampled frames)
    grid: tuple[int, int, int]  # (t, h, w) in patches
    n_tokens: int  # t * h * w // merge**2
    offset: int  # first row of this item among the prompt's visual rows
    content_key: bytes = b""  # SHA-256 over the row settings and the bytes (``image_key``)
    kind: str = "image"  # or "video"
    frames: tuple[int, ...] = ()  # a video's sampled frame indices (client frames: 0..n-1)
    frame_data: tuple[bytes, ...] = ()  # a video sent as frames: each one's encoded bytes
    plan: VideoPlan | None = None  # a video's frames, grid and timestamps


@dataclass(frozen=True)
class PreparedPrompt:
    """input_ids [seq] long (image pads expanded); positions [3, seq] long (M-RoPE t/h/w);
    mrope_delta: decode position p uses p + mrope_delta; visual_mask [seq] bool; images in
    prompt order."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    mrope_delta: int
    visual_mask: torch.Tensor
    images: tuple[ImageSpec, ...]

    @property
    def n_vis(self) -> int:
        return sum(image.n_tokens for image in self.images)

    @property
    def image_grid_thw(self) -> torch.Tensor:
        """[n_images, 3]: the images' grids (not the videos')."""
        return _grids(self.images, "image")

    @property
    def video_grid_thw(self) -> torch.Tensor:
        """[n_videos, 3]: the videos' grids."""
        return _grids(self.images, "video")

    @property
    def video_frame_indices(self) -> list[list[int]]:
        """Each video's sampled frame indices, in prompt order."""
        return [list(spec.frames) for spec in self.images if spec.kind == "video"]


def _grids(items: tuple[ImageSpec, ...], kind: str) -> torch.Tensor:
    grids = [spec.grid for spec in items if spec.kind == kind]
    return torch.tensor(grids, dtype=torch.long).reshape(-1, 3)


class _RopeIndex:
    """Just enough of Qwen3VLMoeModel for its get_rope_index: the config and one helper."""

    get_rope_index = Qwen3VLMoeModel.get_rope_index
    get_vision_position_ids = Qwen3VLMoeModel.get_vision_position_ids

    def __init__(self, config: Qwen3VLMoeConfig) -> None:
        self.config = config


class PromptBuilder:
    """Owns the Hugging Face processor's template, tokenizer and image-size rule; no weights."""

    def __init__(
        self,
        processor: Any,
        config: Qwen3VLMoeConfig,
        limits: PromptLimits | None = None,
        rows_dtype: str = "",
    ) -> None:
        self.processor = processor
        self.config = config
        self.limits = limits or PromptLimits()
        self._images = processor.image_processor
        self.video_rules = VideoRules.from_processor(processor.video_processor)
        self._rope = _RopeIndex(config)
        self.image_token_id = config.image_token_id
        self._vision_ids = _vision_token_ids(processor.tokenizer, config)
        self.video_token_id = self._vision_ids[1]
        # No token is longer than this many UTF-8 bytes, so a text of B bytes has at least
        # B / this many tokens: a prompt that long is refused before tokenizing it (a 10 MB
        # prompt would otherwise hold the GIL for about a second while its ids become tensors).
        self._max_token_bytes = (
            max(
                len(processor.tokenizer.convert_tokens_to_string([t]).encode())
                for t in processor.tokenizer.get_vocab()
            )
            or 1
        )
        self.merge_size = int(self._images.merge_size)
        self.key_salt = _key_salt(processor, config, rows_dtype)
        if self.merge_size != config.vision_config.spatial_merge_size:  # type: ignore[union-attr]
            raise ValueError("the image processor's merge_size differs from the model's")

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, limits: PromptLimits | None = None, rows_dtype: str = ""
    ) -> PromptBuilder:
        return cls(AutoProcessor.from_pretrained(model_dir), AutoConfig.from_pretrained(model_dir),
                   limits, rows_dtype)  # fmt: skip

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def build(
        self,
        turns: list[ChatTurn],
        images: list[bytes | VideoSource],
        add_generation_prompt: bool = True,
    ) -> PreparedPrompt:
        """Validate and prepare one prompt whose visual items (``images``: an image's bytes or
        a ``VideoSource``) are in prompt order. PromptError (400 / 413) on anything not served."""
        if len(images) > self.limits.max_images:
            raise PromptError(f"too many images and videos: {len(images)}, at most "
                              f"{self.limits.max_images}")  # fmt: skip
        _check_image_order(turns, images)
        specs, offset = [], 0
        for k, item in enumerate(images):
            spec = self._video(item, k) if isinstance(item, VideoSource) else self._image(item, k)
            specs.append(replace(spec, offset=offset))
            offset += spec.n_tokens
        ids = self._tokenize(turns, images, add_generation_prompt)
        input_ids = self._expand(ids, specs)
        if len(input_ids) > self.limits.max_prompt_tokens:
            raise PromptError(f"prompt has {len(input_ids)} tokens, the limit is "
                              f"{self.limits.max_prompt_tokens}", 400)  # fmt: skip
        images_mask, videos_mask = (
            input_ids == self.image_token_id,
            input_ids == self.video_token_id,
        )
        token_types = images_mask.long() + 2 * videos_mask.long()  # transformers' 1 / 2
        prompt = PreparedPrompt(input_ids, input_ids, 0, images_mask | videos_mask, tuple(specs))
        positions, delta = self._positions(input_ids, token_types, prompt)
        return replace(prompt, positions=positions, mrope_delta=delta)

    def _image(self, data: bytes, k: int) -> ImageSpec:
        grid, n = self._grid(data, k)
        return ImageSpec(data=data, grid=grid, n_tokens=n, offset=0,
                         content_key=image_key(self.key_salt, data))  # fmt: skip

    def _video(self, video: VideoSource, k: int) -> ImageSpec:
        """A video's spec from its container's metadata, or from its frames' headers."""
        plan = plan_source(video, self.video_rules, self.limits, k, _header_size)
        return ImageSpec(data=video.data, grid=plan.grid, n_tokens=plan.n_tokens, offset=0,
                         content_key=video_key(self.key_salt, video, plan), kind="video",
                         frames=plan.frame_indices, frame_data=video.frames, plan=plan)  # fmt: skip

    def _grid(self, data: bytes, k: int) -> tuple[tuple[int, int, int], int]:
        """(grid, visual tokens) of image ``k`` from its header, by the image processor's rule."""
        width, height = _header_size(data, k)
        if width < 1 or height < 1:
            raise PromptError(f"image {k} has zero size ({width}x{height})")
        if max(width, height) / min(width, height) > MAX_ASPECT:
            raise PromptError(f"image {k} aspect ratio {width}x{height} exceeds {MAX_ASPECT}:1")
        if width * height > self.limits.max_image_pixels:
            raise PromptError(f"image {k} has {width * height} pixels, the limit is "
                              f"{self.limits.max_image_pixels}", 413)  # fmt: skip
        p, size = self._images.patch_size, self._images.size
        h, w = smart_resize(height, width, factor=p * self.merge_size,
                            min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])  # fmt: skip
        grid = (1, h // p, w // p)
        if self._images.get_number_of_image_patches(height, width, {}) != grid[1] * grid[2]:
            raise RuntimeError(f"{type(self._images).__name__} does not resize like smart_resize")
        n = grid[0] * grid[1] * grid[2] // self.merge_size**2
        if n > self.limits.max_image_tokens:
            raise PromptError(f"image {k} needs {n} visual tokens, the limit is "
                              f"{self.limits.max_image_tokens}", 413)  # fmt: skip
        return grid, n

    def _tokenize(self, turns: list[ChatTurn], images: list[Any], add_generation_prompt: bool):
        messages = [
            {**m, "content": [p if p["type"] == "text" else {"type": p["type"]}
                              for p in m["content"]]}
            for m in to_messages(turns, [None] * len(images))
        ]  # fmt: skip
        text = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        least = len(text.encode("utf-8", "surrogatepass")) // self._max_token_bytes
        if least > self.limits.max_prompt_tokens:
            raise PromptError(f"prompt has at least {least} tokens, the limit is "
                              f"{self.limits.max_prompt_tokens}", 400)  # fmt: skip
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.limits.max_prompt_tokens:  # before any tensor is built
            raise PromptError(f"prompt has {len(ids)} tokens, the limit is "
                              f"{self.limits.max_prompt_tokens}", 400)  # fmt: skip
        ids = torch.tensor(ids, dtype=torch.long)
        n_videos = sum(isinstance(x, VideoSource) for x in images)
        n_images = len(images) - n_videos
        image_pad, video_pad, start, end = (int((ids == t).sum()) for t in self._vision_ids)
        if (image_pad, video_pad, start, end) != (n_images, n_videos, len(images), len(images)):
            raise PromptError(
                f"vision tokens typed in text: the prompt holds {image_pad} image pad, "
                f"{video_pad} video pad, {start} vision start and {end} vision end tokens "
                f"for {n_images} images and {n_videos} videos"
            )
        return ids

    def _expand(self, ids: torch.Tensor, specs: list[ImageSpec]) -> torch.Tensor:
        """Each image pad repeated to its rows; each video pad replaced by what transformers'
        processor writes for it: per temporal group, ``<t seconds>``, vision start, its pads,
        vision end (the template's own start and end stay around them)."""
        pieces, last = [], 0
        visual = ((ids == self.image_token_id) | (ids == self.video_token_id)).nonzero()
        for (at,), spec in zip(visual.tolist(), specs, strict=True):
            pieces.append(ids[last:at])
            if spec.kind == "image":
                pieces.append(ids.new_full((spec.n_tokens,), self.image_token_id))
            else:
                assert spec.plan is not None
                pieces.append(self._video_ids(spec.plan))
            last = at + 1
        pieces.append(ids[last:])
        return torch.cat(pieces)

    def _video_ids(self, plan: VideoPlan) -> torch.Tensor:
        # Special tokens split BPE, so each timestamp tokenizes as it does inside the whole text.
        stamps = self.tokenizer([f"<{t:.1f} seconds>" for t in plan.timestamps],
                                add_special_tokens=False)["input_ids"]  # fmt: skip
        _, pad, start, end = self._vision_ids
        group = [start] + [pad] * plan.tokens_per_group + [end]
        return torch.tensor([i for stamp in stamps for i in [*stamp, *group]], dtype=torch.long)

    def _positions(
        self, input_ids: torch.Tensor, token_types: torch.Tensor, prompt: PreparedPrompt
    ) -> tuple[torch.Tensor, int]:
        images, videos = prompt.image_grid_thw, prompt.video_grid_thw
        positions, deltas = self._rope.get_rope_index(  # type: ignore[misc]  # a borrowed method
            input_ids[None],  # type: ignore[arg-type]
            mm_token_type_ids=token_types[None],  # type: ignore[arg-type]
            image_grid_thw=images if len(images) else None,  # type: ignore[arg-type]
            video_grid_thw=videos if len(videos) else None,  # type: ignore[arg-type]
        )
        return positions[:, 0].contiguous(), int(deltas.reshape(-1)[0])


def _vision_token_ids(tokenizer: Any, config: Qwen3VLMoeConfig) -> tuple[int, int, int, int]:
    """(image pad, video pad, vision start, vision end) ids, the same in config and tokenizer."""
    names = ("image", "video", "vision_start", "vision_end")
    tokens = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    ids = tuple(int(getattr(config, f"{name}_token_id")) for name in names)
    if ids != tuple(tokenizer.convert_tokens_to_ids(list(tokens))):
        raise ValueError(f"the config's vision token ids {ids} differ from the tokenizer's")
    return ids  # type: ignore[return-value]


def _check_image_order(turns: list[ChatTurn], images: list[Any]) -> None:
    used = [(p.image, p.kind) for turn in turns for p in turn.parts if p.kind != "text"]
    kinds = [("video" if isinstance(x, VideoSource) else "image") for x in images]
    if used != list(enumerate(kinds)):
        raise PromptError(f"image and video parts must use items 0..{len(images) - 1} once "
                          "each, in order, each of its own kind")  # fmt: skip


def _header_size(data: bytes, k: int) -> tuple[int, int]:
    """(width, height) as the encoder will see it after exif_transpose; no pixel is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            # the base class reads the header's EXIF; PNG's override would decode to find it
            orientation = Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    except Image.DecompressionBombError as exc:
        raise PromptError(f"image {k} is too large: {exc}", 413) from None
    except Exception as exc:  # PIL's plugins raise many types on hostile headers
        raise PromptError(f"cannot decode image {k}: {type(exc).__name__}: {exc}") from None
    return (height, width) if orientation in SWAPPING_ORIENTATIONS else (width, height)


def image_key(salt: bytes, data: bytes) -> bytes:
    """An image's content key: SHA-256 over ``salt`` (what changes its rows) and its bytes, as
    this server received them. The whole 32-byte digest is the key (issue 18)."""
    h = hashlib.sha256(salt)
    h.update(data)
    return h.digest()


def _key_salt(processor: Any, config: Qwen3VLMoeConfig, rows_dtype: str) -> bytes:
    """Everything besides the bytes that changes an image's rows: the image and video
    processors' settings, the vision tower's and the language model's shapes, the rows' dtype."""
    text = getattr(config, "text_config", config)
    parts = {"v": 2, "processor": processor.image_processor.to_dict(),
             "video": processor.video_processor.to_dict(),
             "vision": config.vision_config.to_dict(),  # type: ignore[union-attr]
             "hidden": getattr(text, "hidden_size", 0), "dtype": rows_dtype}  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
