"""What a video container says about itself, read with PyAV without decoding a frame.

The language side needs a video's frame count, frame rate and frame size to sample its frames,
size its grid and write its timestamps before any encoder work (issue 19). ``probe`` opens the
container (header only), takes the first video stream's declared frame count and, when the
container declares none (Matroska, WebM), counts its packets (demuxing, no decoding) up to a
bound and a deadline. Every refusal is a ``ValueError`` fit for an HTTP 400.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class VideoMeta:
    total_frames: int  # as transformers' PyAV loader counts them (the stream's frame count)
    fps: float | None  # the stream's average rate; None when the container gives none
    height: int
    width: int

    @property
    def seconds(self) -> float:
        return self.total_frames / (self.fps or 24.0)


def probe(data: bytes, max_frames: int, deadline_s: float = 10.0) -> VideoMeta:
    """The first video stream's metadata. ValueError for a file that is not a video we serve
    (corrupt, no video stream, no frames, more than ``max_frames`` packets to count)."""
    import av  # PyAV: only the video path needs it

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise ValueError("the file holds no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate
            fps = float(rate) if rate else None
            frames = int(stream.frames or 0)
            if frames <= 0:
                frames = _count_packets(container, stream, max_frames, deadline_s)
            width, height = stream.codec_context.width, stream.codec_context.height
    except av.FFmpegError as exc:
        raise ValueError(f"cannot read the video container: {type(exc).__name__}: {exc}") from None
    if frames <= 0:
        raise ValueError("the video has no frames")
    return VideoMeta(frames, fps if fps and fps > 0 else None, int(height), int(width))


def _count_packets(container, stream, max_frames: int, deadline_s: float) -> int:
    deadline = time.monotonic() + deadline_s
    count = 0
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's flush packet
            continue
        count += 1
        if count > max_frames:
            raise ValueError(f"the video has more than {max_frames} frames")
        if time.monotonic() > deadline:
            raise ValueError(f"reading the video's packets took more than {deadline_s:.0f} s")
    return count
