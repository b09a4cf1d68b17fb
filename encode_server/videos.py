"""Untrusted video bytes -> the frames a job asks for, with PyAV, under limits a hostile file
cannot get past.

``decode_frames`` is the encoder's only video entry point: a container's bytes and the frame
indices the language side sampled (in decode order, as transformers' PyAV loader counts them).
It decodes frames in order and stops after the last index it needs, so a file never costs more
than its frames up to that index. Limits: container bytes, declared and decoded frame size,
duration, frames decoded and wall time. Corrupt, truncated or audio-only files, and files with
fewer frames than the job asks for, raise ``ValueError`` with a message that says which.
"""

from __future__ import annotations

import io
import itertools
import time
from dataclasses import dataclass

import numpy as np

MAX_ASPECT = 200  # the video processor's own bound (smart_resize)


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on one untrusted video."""

    max_bytes: int = 32 * 1024 * 1024  # the container
    max_pixels: int = 16 * 1024 * 1024  # width * height of one frame
    max_frames: int = 65536  # frames decoded to reach the last one a job asks for
    max_seconds: float = 4 * 3600.0  # the stream's duration, when it declares one
    max_decode_s: float = 60.0  # wall time of one video's decode

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_pixels, self.max_frames) < 1:
            raise ValueError("video limits must be positive")
        if min(self.max_seconds, self.max_decode_s) <= 0:
            raise ValueError("video time limits must be positive")


def decode_frames(data: bytes, indices: list[int], limits: VideoLimits) -> np.ndarray:
    """Frames ``indices`` (increasing) of the first video stream of ``data``: uint8
    ``[len(indices), height, width, 3]`` RGB. ValueError for anything not served."""
    import av  # PyAV: only the encoder's video path needs it

    if len(data) > limits.max_bytes:
        raise ValueError(f"video larger than {limits.max_bytes} bytes")
    if not indices or any(b <= a for a, b in itertools.pairwise(indices)):
        raise ValueError("a video job needs increasing frame indices")
    if indices[-1] >= limits.max_frames:
        raise ValueError(f"frame {indices[-1]} is past the {limits.max_frames} frames this "
                         "encoder decodes from one video")  # fmt: skip
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            return _frames(container, indices, limits)
    except av.FFmpegError as exc:
        raise ValueError(f"cannot decode video: {type(exc).__name__}: {exc}") from None


def _frames(container, indices: list[int], limits: VideoLimits) -> np.ndarray:
    if not container.streams.video:
        raise ValueError("the file holds no video stream")
    stream = container.streams.video[0]
    _check_size(stream.codec_context.width, stream.codec_context.height, limits)
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
        if seconds > limits.max_seconds:
            raise ValueError(f"video lasts {seconds:.0f} s, more than {limits.max_seconds:.0f} s")
    deadline = time.monotonic() + limits.max_decode_s
    out: list[np.ndarray] = []
    shape, decoded = None, 0
    for k, frame in enumerate(container.decode(stream)):
        decoded = k + 1
        if time.monotonic() > deadline:
            raise ValueError(f"video decode took more than {limits.max_decode_s:g} s")
        if k != indices[len(out)]:
            continue
        _check_size(frame.width, frame.height, limits)
        if shape is not None and (frame.height, frame.width) != shape:
            raise ValueError("the video's frames change size")
        shape = (frame.height, frame.width)
        out.append(frame.to_ndarray(format="rgb24"))
        if len(out) == len(indices):
            return np.stack(out)
    raise ValueError(f"the video ends after {decoded} decodable frame(s); frame "
                     f"{indices[len(out)]} was asked for")  # fmt: skip


def _check_size(width: int, height: int, limits: VideoLimits) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"video frame size {width}x{height} is out of bounds")
    if width * height > limits.max_pixels:
        raise ValueError(f"video frames have {width * height} pixels, more than "
                         f"{limits.max_pixels}")  # fmt: skip
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ValueError(f"video aspect ratio {width}x{height} exceeds {MAX_ASPECT}:1")
