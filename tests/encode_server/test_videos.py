"""Untrusted video input on the encoder: ``decode_frames`` (PyAV, under ``VideoLimits``) and
``VisionEncoder.preprocess`` for a video job (a container with frame indices, or frames the
client sampled), checked against transformers' own video processor."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch
from PIL import Image

from encode_server.videos import VideoLimits, decode_frames
from tests.conftest import decoded_frames, video_bytes

LIMITS = VideoLimits()
H, W = 32, 48


@pytest.fixture(scope="module")
def clip() -> bytes:
    return video_bytes(6, H, W, seed=1)


def _audio_file(fmt: str, with_video_stream: bool = False) -> bytes:
    """A file of four frames of silent audio; optionally a declared video stream that never
    gets a packet."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        if with_video_stream:
            video = container.add_stream("mpeg4", rate=4)
            video.width, video.height, video.pix_fmt = W, H, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=8000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), dtype=np.int16), format="s16", layout="mono"
            )
            frame.sample_rate, frame.pts = 8000, i * 1024
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    return buf.getvalue()


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# --- decode_frames ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "fmt"), [("mpeg4", "mp4"), ("ffv1", "matroska")], ids=["mpeg4", "ffv1"]
)
def test_decode_returns_exactly_the_frames_asked_for(codec, fmt):
    data = video_bytes(7, H, W, seed=2, codec=codec, fmt=fmt)
    every = decoded_frames(data)
    assert every.shape == (7, H, W, 3)
    for indices in ([0, 1], [1, 4, 6], [6], list(range(7))):
        out = decode_frames(data, indices, LIMITS)
        assert out.dtype == np.uint8 and out.shape == (len(indices), H, W, 3)
        assert np.array_equal(out, every[indices]), indices
    assert not np.array_equal(every[0], every[1])  # a wrong frame would show


@pytest.mark.parametrize(
    "data", [b"", b"not a video at all" * 10, b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64]
)
def test_undecodable_bytes_are_refused(data):
    with pytest.raises(ValueError, match="cannot decode video"):
        decode_frames(data, [0], LIMITS)


@pytest.mark.parametrize(("codec", "fmt"), [("mpeg4", "mp4"), ("ffv1", "matroska")])
def test_truncated_files_are_refused(codec, fmt):
    data = video_bytes(8, H, W, codec=codec, fmt=fmt)
    for cut in (len(data) // 2, len(data) * 9 // 10):  # mp4: the index (moov) is at the end
        with pytest.raises(ValueError, match="cannot decode|decodable frame"):
            decode_frames(data[:cut], [0, 7], LIMITS)


def test_audio_only_files_are_refused():
    for fmt in ("wav", "matroska"):
        with pytest.raises(ValueError, match="no video stream"):
            decode_frames(_audio_file(fmt), [0], LIMITS)


def test_a_video_stream_without_frames_is_refused():
    data = _audio_file("matroska", with_video_stream=True)
    with av.open(io.BytesIO(data)) as container:
        assert len(container.streams.video) == 1  # the stream is there, its frames are not
    with pytest.raises(ValueError, match="ends after 0 decodable frame"):
        decode_frames(data, [0], LIMITS)


def test_frames_past_the_end_are_refused(clip):
    for indices in ([6], [2, 6], [0, 1, 2, 3, 4, 5, 100]):
        with pytest.raises(ValueError, match=f"frame {indices[-1]} was asked for"):
            decode_frames(clip, indices, LIMITS)


def test_the_past_the_end_message_counts_the_frames_the_video_has(clip):
    with pytest.raises(ValueError, match="ends after 6 decodable frame"):
        decode_frames(clip, [2, 6], LIMITS)


@pytest.mark.parametrize("indices", [[], [2, 2], [3, 1], [0, 2, 1]])
def test_frame_indices_must_increase(clip, indices):
    with pytest.raises(ValueError, match="increasing frame indices"):
        decode_frames(clip, indices, LIMITS)


def test_limits_on_bytes_pixels_frames_and_duration(clip):
    assert len(decode_frames(clip, [0], VideoLimits(max_bytes=len(clip)))) == 1
    with pytest.raises(ValueError, match=f"larger than {len(clip) - 1} bytes"):
        decode_frames(clip, [0], VideoLimits(max_bytes=len(clip) - 1))
    assert len(decode_frames(clip, [0], VideoLimits(max_pixels=H * W))) == 1
    with pytest.raises(ValueError, match=f"{H * W} pixels, more than {H * W - 1}"):
        decode_frames(clip, [0], VideoLimits(max_pixels=H * W - 1))
    assert len(decode_frames(clip, [1, 2], VideoLimits(max_frames=3))) == 2
    with pytest.raises(ValueError, match="frame 3 is past the 3 frames"):
        decode_frames(clip, [1, 3], VideoLimits(max_frames=3))
    with pytest.raises(ValueError, match="video lasts"):  # 6 frames at 4 fps
        decode_frames(clip, [0], VideoLimits(max_seconds=1.0))


def test_decode_time_is_bounded(clip):
    # The deadline is checked on every decoded frame before it is matched, so frame 0 (not
    # wanted) already finds a deadline 1 ns after the start has passed.
    with pytest.raises(ValueError, match="video decode took more than"):
        decode_frames(clip, [1, 2], VideoLimits(max_decode_s=1e-9))


def test_limits_are_validated():
    for bad in ({"max_bytes": 0}, {"max_pixels": -1}, {"max_frames": 0}):
        with pytest.raises(ValueError, match="must be positive"):
            VideoLimits(**bad)
    for bad in ({"max_seconds": 0.0}, {"max_decode_s": -1.0}):
        with pytest.raises(ValueError, match="time limits must be positive"):
            VideoLimits(**bad)


# --- VisionEncoder.preprocess for a video ----------------------------------------------------


def _reference(encoder, frames: np.ndarray):
    return encoder.video_processor(videos=[frames], do_sample_frames=False, return_tensors="pt")


def test_preprocess_a_container_matches_the_hf_video_processor(encoder, clip):
    indices = [0, 2, 3, 5]
    out = encoder.preprocess(clip, frames=indices)
    ref = _reference(encoder, decoded_frames(clip)[indices])
    assert torch.equal(out.pixel_values, ref["pixel_values_videos"])
    assert list(out.grid) == ref["video_grid_thw"][0].tolist()
    t, h, w = out.grid
    assert t == 2 and out.n_tokens == t * h * w // encoder.merge_size**2
    assert out.decode_s > 0
    other = encoder.preprocess(clip, frames=[1, 2, 3, 4])
    assert not torch.equal(other.pixel_values, out.pixel_values)  # the indices matter


def test_preprocess_client_frames_matches_the_hf_video_processor(encoder, clip):
    frames = decoded_frames(clip)[1:5]
    out = encoder.preprocess(b"", frame_data=[_png(f) for f in frames])
    ref = _reference(encoder, frames)
    assert torch.equal(out.pixel_values, ref["pixel_values_videos"])
    assert list(out.grid) == ref["video_grid_thw"][0].tolist()
    assert out.decode_s > 0
    assert encoder.preprocess(_png(frames[0])).decode_s == 0.0  # an image: no video decode


def test_client_frames_of_different_sizes_are_refused(encoder, clip):
    frames = decoded_frames(clip)
    with pytest.raises(ValueError, match="differ in size"):
        encoder.preprocess(b"", frame_data=[_png(frames[0]), _png(frames[1][:, :32])])


def test_a_single_frame_is_fewer_than_a_temporal_patch(encoder, clip):
    frame = decoded_frames(clip)[0]
    for call in (
        lambda: encoder.preprocess(clip, frames=[3]),
        lambda: encoder.preprocess(b"", frame_data=[_png(frame)]),
    ):
        with pytest.raises(ValueError, match="cannot preprocess the video"):
            call()


def test_bad_video_bytes_are_a_value_error_from_preprocess(encoder, clip):
    with pytest.raises(ValueError, match="cannot decode video"):
        encoder.preprocess(b"garbage" * 20, frames=[0, 1])
    with pytest.raises(ValueError, match="frame 9 was asked for"):
        encoder.preprocess(clip, frames=[0, 9])
