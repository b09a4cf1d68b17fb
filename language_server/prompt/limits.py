"""What a prompt may be: ``PromptLimits``, and ``PromptError`` (400 / 413) for one that is not."""

from __future__ import annotations

from dataclasses import dataclass


class PromptError(ValueError):
    """A prompt the server will not run: ``status`` 400 (malformed) or 413 (too large)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class PromptLimits:
    max_prompt_tokens: int = 32768
    max_images: int = 16
    max_image_pixels: int = 64 * 1024 * 1024  # width * height of one image, from its header
    max_image_tokens: int = 16384  # visual tokens of one image (or video)
    max_video_frames: int = 65536  # frames in one video's container
    max_video_seconds: float = 4 * 3600.0  # one video's duration (frames / rate)

    def __post_init__(self) -> None:
        sizes = (self.max_prompt_tokens, self.max_images, self.max_image_pixels,
                 self.max_image_tokens, self.max_video_frames, self.max_video_seconds)  # fmt: skip
        if min(sizes) <= 0:
            raise ValueError(f"prompt limits must be positive, got {self}")
