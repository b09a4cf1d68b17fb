"""A video's plan from its container's metadata alone (issue 19, first part): which frames are
sampled, the grid they make, the timestamp of each temporal group and the prompt text
transformers' Qwen3-VL processor writes for them, before any frame is decoded.

The rules are the checkpoint's video processor's (``Qwen3VLVideoProcessor`` in transformers
5.24, see docs/video_transformers_notes.md): ``fps`` frames a second, clamped to
``[min_frames, max_frames]`` and to the frames there are, spread evenly (``linspace``, rounded
half to even); the frames resized together so their total pixels fall in the size budget (the
resize rounds to ``patch * merge``); an odd count repeats its last frame; one temporal group of
``temporal_patch_size`` frames per ``<t seconds>`` timestamp and vision run.
``plan_source`` plans a request's ``VideoSource`` within the server's limits: from its
container's metadata (``container.probe``), or from the headers of the frames a client sampled.
``tests/language_server/prompt/test_video*.py`` check all of it against transformers.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from language_server.prompt.container import probe
from language_server.prompt.limits import PromptError, PromptLimits
from protocol.chat import VideoSource


@dataclass(frozen=True, slots=True)
class VideoRules:
    """What the checkpoint's video processor decides with (read from it: ``from_processor``)."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 32 * 32  # over all sampled frames
    max_pixels: int = 768 * 32 * 32

    @classmethod
    def from_processor(cls, video_processor: Any) -> VideoRules:
        size = video_processor.size
        return cls(fps=float(video_processor.fps), min_frames=int(video_processor.min_frames),
                   max_frames=int(video_processor.max_frames),
                   patch_size=int(video_processor.patch_size),
                   temporal_patch_size=int(video_processor.temporal_patch_size),
                   merge_size=int(video_processor.merge_size),
                   min_pixels=int(size["shortest_edge"]), max_pixels=int(size["longest_edge"]))  # fmt: skip


@dataclass(frozen=True, slots=True)
class VideoPlan:
    frame_indices: tuple[int, ...]  # of the container's frames, as sampled
    height: int  # every frame resized to this
    width: int
    grid: tuple[int, int, int]  # (temporal groups, patch rows, patch columns)
    timestamps: tuple[float, ...]  # seconds, one per temporal group
    tokens_per_group: int  # visual rows of one temporal group (patches / merge^2)

    @property
    def n_tokens(self) -> int:
        """Visual rows (video pad tokens) of the whole video."""
        return self.grid[0] * self.tokens_per_group


def sample_frames(rules: VideoRules, total_frames: int, source_fps: float | None,
                  fps: float | None = None, num_frames: int | None = None) -> list[int]:  # fmt: skip
    """The container frame indices the processor keeps (``source_fps`` None: 24, as it assumes)."""
    if total_frames < 1:
        raise ValueError("the video has no frames")
    if num_frames is None:
        rate = source_fps if source_fps else 24.0
        num_frames = int(total_frames / rate * (fps if fps is not None else rules.fps))
        num_frames = min(max(num_frames, rules.min_frames), rules.max_frames, total_frames)
    else:
        num_frames = min(max(num_frames, 1), total_frames)
    return [int(i) for i in np.linspace(0, total_frames - 1, num_frames).round().astype(int)]


def resize(rules: VideoRules, n_frames: int, height: int, width: int) -> tuple[int, int]:
    """(height, width) of every sampled frame: transformers' ``smart_resize`` for video."""
    factor = rules.patch_size * rules.merge_size
    if n_frames < rules.temporal_patch_size:
        raise ValueError(f"a video needs at least {rules.temporal_patch_size} sampled frames")
    if max(height, width) / min(height, width) > 200:
        raise ValueError("the video's aspect ratio is above 200")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(n_frames / rules.temporal_patch_size) * rules.temporal_patch_size
    if t_bar * h_bar * w_bar > rules.max_pixels:
        beta = math.sqrt(n_frames * height * width / rules.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < rules.min_pixels:
        beta = math.sqrt(rules.min_pixels / (n_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def timestamps(rules: VideoRules, indices: list[int], source_fps: float | None) -> list[float]:
    """Seconds of each temporal group: its frames' times averaged (the last frame repeated to
    fill the last group), as the processor writes them into the prompt."""
    rate = source_fps if source_fps else 24.0
    k = rules.temporal_patch_size
    padded = list(indices) + [indices[-1]] * (-len(indices) % k)
    times = [i / rate for i in padded]
    return [sum(times[g : g + k]) / k for g in range(0, len(times), k)]


def plan_video(rules: VideoRules, total_frames: int, source_fps: float | None, height: int,
               width: int, fps: float | None = None, num_frames: int | None = None) -> VideoPlan:  # fmt: skip
    """Everything about a video the prompt needs, from its metadata (no frame decoded)."""
    indices = sample_frames(rules, total_frames, source_fps, fps, num_frames)
    h, w = resize(rules, len(indices), height, width)
    groups = -(-len(indices) // rules.temporal_patch_size)
    grid = (groups, h // rules.patch_size, w // rules.patch_size)
    per_group = grid[1] * grid[2] // rules.merge_size**2
    return VideoPlan(tuple(indices), h, w, grid, tuple(timestamps(rules, indices, source_fps)),
                     per_group)  # fmt: skip


def video_text(plan: VideoPlan, start: str = "<|vision_start|>", pad: str = "<|video_pad|>",
               end: str = "<|vision_end|>") -> str:  # fmt: skip
    """What the processor puts where the chat template wrote one video pad token."""
    return "".join(f"<{t:.1f} seconds>{start}{pad * plan.tokens_per_group}{end}"
                   for t in plan.timestamps)  # fmt: skip


def plan_source(video: VideoSource, rules: VideoRules, limits: PromptLimits, k: int,
                frame_size: Callable[[bytes, int], tuple[int, int]]) -> VideoPlan:  # fmt: skip
    """The plan of request video ``k``; ``frame_size(data, k)`` reads a frame image's (width,
    height) from its header. PromptError (400 malformed, 413 over a limit) before any decode."""
    if video.max_frames is not None:
        rules = replace(rules, max_frames=min(rules.max_frames, video.max_frames))
    try:
        if not video.frames:
            plan = _container_plan(video, rules, limits, k)
        else:
            if len(video.frames) > rules.max_frames:
                raise PromptError(f"video {k} has {len(video.frames)} frames, at most "
                                  f"{rules.max_frames}")  # fmt: skip
            sizes = {frame_size(f, k) for f in video.frames}
            if len(sizes) != 1:
                raise PromptError(f"the frames of video {k} differ in size: {sorted(sizes)}")
            ((width, height),) = sizes
            _check_frame_size(width, height, limits, k)
            n = len(video.frames)
            plan = plan_video(rules, n, video.fps or rules.fps, height, width, num_frames=n)
    except PromptError:
        raise
    except ValueError as exc:  # the processor's own rules (too few frames, aspect ratio)
        raise PromptError(f"video {k}: {exc}") from None
    if plan.n_tokens > limits.max_image_tokens:
        raise PromptError(f"video {k} needs {plan.n_tokens} visual tokens, the limit is "
                          f"{limits.max_image_tokens}", 413)  # fmt: skip
    return plan


def _container_plan(video: VideoSource, rules: VideoRules, limits: PromptLimits,
                    k: int) -> VideoPlan:  # fmt: skip
    meta = probe(video.data, limits.max_video_frames)
    if meta.total_frames > limits.max_video_frames:
        raise PromptError(f"video {k} has {meta.total_frames} frames, the limit is "
                          f"{limits.max_video_frames}", 413)  # fmt: skip
    if meta.seconds > limits.max_video_seconds:
        raise PromptError(f"video {k} lasts {meta.seconds:.0f} s, the limit is "
                          f"{limits.max_video_seconds:.0f} s", 413)  # fmt: skip
    _check_frame_size(meta.width, meta.height, limits, k)
    return plan_video(rules, meta.total_frames, meta.fps, meta.height, meta.width,
                      fps=video.fps)  # fmt: skip


def _check_frame_size(width: int, height: int, limits: PromptLimits, k: int) -> None:
    if width < 1 or height < 1:
        raise PromptError(f"video {k} has zero size ({width}x{height})")
    if width * height > limits.max_image_pixels:
        raise PromptError(f"video {k} has {width * height} pixels a frame, the limit is "
                          f"{limits.max_image_pixels}", 413)  # fmt: skip


def video_key(salt: bytes, video: VideoSource, plan: VideoPlan) -> bytes:
    """A video's content key: its bytes (or each of its frames') and the frames sampled."""
    h = hashlib.sha256(salt + b"video" + json.dumps(plan.frame_indices).encode())
    h.update(video.data)
    for frame in video.frames:
        h.update(len(frame).to_bytes(8, "little") + frame)
    return h.digest()
