"""Fixtures for end-to-end tests: real server processes on loopback, and request helpers."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from epd.cluster import LocalCluster
from tests.conftest import decoded_frames, video_bytes


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def video_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def media_prompt(spec, make_image):
    """A user turn of images and videos for the server and for transformers' processor.

    ``spec``: items in prompt order, ``("image", h, w, seed)``, ``("video", frames, h, w, fps,
    seed)`` (an MP4 made with PyAV) or ``("frames", n, h, w, seed)`` (frames a client sampled
    itself, sent as image URLs at 2 fps). Returns (OpenAI content for the server, transformers'
    content, its videos as decoded frames, their metadata)."""
    ours, theirs, videos, metadata = [], [], [], []
    for k, item in enumerate(spec):
        if item[0] == "image":
            image = make_image(item[1], item[2], item[3])
            ours.append({"type": "image_url", "image_url": {"url": data_url(image)}})
            theirs.append({"type": "image", "image": image})
        elif item[0] == "video":
            _, n, h, w, fps, seed = item
            data = video_bytes(n, h, w, fps=fps, seed=seed)
            ours.append({"type": "video_url", "video_url": {"url": video_url(data)}})
            theirs.append({"type": "video"})
            videos.append(decoded_frames(data))
            metadata.append({"total_num_frames": n, "fps": fps})
        else:
            _, n, h, w, seed = item
            frames = [make_image(h, w, seed + j) for j in range(n)]
            ours.append({"type": "video", "video": [data_url(f) for f in frames], "fps": 2})
            theirs.append({"type": "video"})
            videos.append(np.stack([np.asarray(f) for f in frames]))
            metadata.append({"total_num_frames": n, "fps": 2, "frames_indices": list(range(n))})
        ours.append({"type": "text", "text": f"clip {k}."})
        theirs.append({"type": "text", "text": f"clip {k}."})
    ask = {"type": "text", "text": "What happens?"}
    return [*ours, ask], [*theirs, ask], videos, metadata


def transformers_inputs(processor, theirs, videos, metadata, **kwargs):
    """transformers' processor on ``media_prompt``'s second to fourth values (a generation
    prompt after the user turn); ``kwargs`` go to the processor call."""
    text = processor.apply_chat_template([{"role": "user", "content": theirs}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    images = [p["image"] for p in theirs if p["type"] == "image"]
    return processor(text=[text], images=images or None, videos=videos or None,
                     video_metadata=metadata or None, return_tensors="pt", **kwargs)  # fmt: skip


@pytest.fixture(scope="session")
def cluster(tiny_model_dir, tmp_path_factory):
    """Two encode servers and one language server (mooncake over TCP), small blocks, and a
    staging arena of four 16-row chunks: concurrent jobs wait for room in it, and the long
    image (70 rows) is larger than all of it (fresh memory). Image paths are read from
    ``cluster.media_dir`` only."""
    logs = tmp_path_factory.mktemp("cluster-logs")
    with LocalCluster(
        tiny_model_dir, n_encoders=2, transport="mooncake", log_dir=logs,
        language_args=["--num-blocks", "64", "--block-tokens", "16"],
        encoder_args=["--staging-tokens", "64"], media_dir=tmp_path_factory.mktemp("media"),
    ) as c:  # fmt: skip
        yield c
