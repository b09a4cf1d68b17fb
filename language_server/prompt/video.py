"""A video's plan from its container's metadata alone (issue 19, first part): which frames are
sampled, the grid they make, the timestamp of each temporal group and the prompt text
transformers' Qwen3-VL processor writes for them, before any frame is decoded.

The rules are the checkpoint's video processor's (``Qwen3VLVideoProcessor`` in transformers
5.24, see docs/video_transformers_notes.md): ``fps`` frames a second, clamped to
``[min_frames, max_frames]`` and to the frames there are, spread evenly (``linspace``, rounded
half to even); the frames resized together so their total pixels fall in the size budget (the
resize rounds to ``patch * merge``); an odd count repeats its last frame; one temporal group of
``temporal_patch_size`` frames per ``<t seconds>`` timestamp and vision run.
``tests/language_server/prompt/test_video.py`` checks all of it against transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


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
