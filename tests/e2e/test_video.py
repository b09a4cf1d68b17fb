"""Videos end to end (issue 19), on both engines: real encode and language servers (Mooncake
over TCP), the greedy tokens of transformers' monolithic model, and hostile videos refused with
a clear 4xx while the server keeps serving and every block comes back."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from epd.cluster import LocalCluster
from tests.conftest import video_bytes
from tests.e2e.conftest import data_url, media_prompt, transformers_inputs, video_url
from tests.encode_server.test_videos import _audio_file

pytestmark = pytest.mark.slow
N_TOKENS = 16

ENGINES = [
    "transformers",
    pytest.param("sglang", marks=pytest.mark.skipif(
        importlib.util.find_spec("sglang") is None, reason="SGLang is not installed")),
]  # fmt: skip

# name -> items in prompt order: ("image", h, w, seed), ("video", frames, h, w, fps, seed), or
# ("frames", n, h, w, seed): frames the client sampled itself, sent as image data URLs
PROMPTS = {
    "one_video": [("video", 9, 64, 96, 4, 1)],
    "image_and_video": [("image", 80, 112, 2), ("video", 12, 96, 64, 6, 3)],
    "long_video": [("video", 40, 128, 160, 8, 4)],  # 100 rows: more than 3 blocks of 16
    "client_frames": [("frames", 6, 48, 80, 5)],
}


@pytest.fixture(scope="module", params=ENGINES)
def cluster(request, tiny_model_dir, tmp_path_factory):
    """Two encoders, 16-row blocks, and a language server that refuses videos of more than
    2000 frames (a real server's default is 65536)."""
    logs = tmp_path_factory.mktemp(f"video-{request.param}-logs")
    with LocalCluster(
        tiny_model_dir, n_encoders=2, transport="mooncake", log_dir=logs, startup_timeout_s=240,
        language_args=["--engine", request.param, "--num-blocks", "64", "--block-tokens", "16",
                       "--max-video-frames", "2000",
                       *(["--sglang-args", '{"chunked_prefill_size": 32}']
                         if request.param == "sglang" else [])],
    ) as c:  # fmt: skip
        yield c


def _monolithic(monolithic, theirs, videos, metadata, client_frames=False):
    """transformers' greedy tokens and the frames its processor sampled."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(monolithic.name_or_path)
    inputs = transformers_inputs(processor, theirs, videos, metadata, return_metadata=True,
                                 **({"do_sample_frames": False} if client_frames else {}))  # fmt: skip
    sampled = [[int(i) for i in m.frames_indices] for m in inputs.pop("video_metadata")]
    with torch.no_grad():
        out = monolithic.generate(**inputs, max_new_tokens=N_TOKENS, min_new_tokens=N_TOKENS,
                                  do_sample=False)  # fmt: skip
    return out[0, inputs["input_ids"].shape[1] :].tolist(), sampled


def _body(content, **extra):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": N_TOKENS,
            "temperature": 0, "ignore_eos": True, **extra}  # fmt: skip


def _wait_blocks_back(cluster, timeout_s: float = 30.0) -> None:
    """Until every block is available again (free or an idle resident) and none is lent or
    handed to the engine (SGLang lets go once its stream ends)."""
    deadline, pool = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        pool = cluster.health()["pool"]
        if (pool["available_blocks"] == pool["total_blocks"] and pool["lent_blocks"] == 0
                and pool.get("handed_blocks", 0) == 0):  # fmt: skip
            return
        time.sleep(0.05)
    raise AssertionError(f"blocks not back within {timeout_s} s: {pool}")


@pytest.mark.parametrize("name", list(PROMPTS))
def test_served_video_tokens_equal_monolithic(name, cluster, monolithic, make_image):
    ours, theirs, videos, metadata = media_prompt(PROMPTS[name], make_image)
    status, reply = cluster.chat(_body(ours))
    assert status == 200, reply
    expected, sampled = _monolithic(monolithic, theirs, videos, metadata, name == "client_frames")
    assert reply["epd"]["token_ids"] == expected
    assert reply["epd"]["video_frame_indices"] == sampled
    timings = reply["epd"]["timings"]
    assert timings["videos"] == len(videos) and timings["transfer_s"] > 0
    if name == "long_video":
        assert timings["visual_tokens"] > 3 * 16
    if name != "client_frames":
        assert 0 < timings["decode_s"] <= timings["preprocess_s"]
    _wait_blocks_back(cluster)


def _huge_declared_size() -> bytes:
    """A 4x4 raw-video AVI whose header claims 100000 x 100000 pixels."""
    data = bytearray(video_bytes(2, 8, 8, codec="rawvideo", fmt="avi"))
    at = data.find(b"strf") + 12  # BITMAPINFOHEADER: biSize, then biWidth, biHeight
    data[at : at + 8] = (100000).to_bytes(4, "little") * 2
    return bytes(data)


def _cut_frames() -> bytes:
    """An mp4 whose index (first) declares 16 frames, cut short inside its frames: the
    language side plans all 16, the encoder runs out of frames."""
    data = video_bytes(16, 64, 64, seed=9, faststart=True)
    return data[: data.find(b"mdat") + 200]


HOSTILE = {
    "corrupt": (lambda: b"\x1aE\xdf\xa3 not a video" * 40, 400, "cannot read the video"),
    "truncated_header": (lambda: video_bytes(8, 32, 32)[:300], 400, "cannot read the video"),
    "truncated_frames": (_cut_frames, 400, "frame"),
    "huge_declared_size": (_huge_declared_size, 400, "size"),
    "thousands_of_frames": (lambda: video_bytes(3000, 16, 16, fps=100), 413, "3000 frames"),
    "zero_frames": (lambda: _audio_file("matroska", with_video_stream=True), 400, "no frames"),
    "one_frame": (lambda: video_bytes(1, 32, 32), 400, "at least 2"),
    "audio_only": (lambda: _audio_file("wav"), 400, "no video stream"),
}


def test_hostile_videos_get_a_clear_4xx_and_the_server_keeps_serving(cluster, make_image):
    good, _, _, _ = media_prompt(PROMPTS["one_video"], make_image)
    for name, (make, status, words) in HOSTILE.items():
        content = [{"type": "video_url", "video_url": {"url": video_url(make())}},
                   {"type": "text", "text": "What happens?"}]  # fmt: skip
        got, reply = cluster.chat(_body(content))
        assert got == status, (name, reply)
        assert words in reply["error"]["message"], (name, reply)
        _wait_blocks_back(cluster)
    # bad sampling options and a video where an image is expected
    for extra, where in [({"mm_processor_kwargs": {"fps": 0}}, "fps"),
                         ({"mm_processor_kwargs": {"max_frames": 1}}, "max_frames"),
                         ({"mm_processor_kwargs": {"num_frames": 8}}, "mm_processor_kwargs")]:  # fmt: skip
        got, reply = cluster.chat(_body(good, **extra))
        assert got == 400 and where in reply["error"]["message"], reply
    image_as_video = [{"type": "video_url", "video_url": {"url": data_url(make_image(32, 32))}}]
    got, reply = cluster.chat(_body(image_as_video))
    assert got == 400 and "data:video/" in reply["error"]["message"], reply
    status, reply = cluster.chat(_body(good))  # still serving
    assert status == 200, reply
    _wait_blocks_back(cluster)
