"""Shared fixtures: one tiny Qwen3-VL-MoE checkpoint per session, and the models loaded from it.

Heavy imports (torch, transformers) happen inside the fixtures so that test packages that need no
model (protocol, transfer) do not pay for them. Nothing is ever downloaded.
"""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A default tiny checkpoint (float32, one safetensors file, seed 0)."""
    from epd.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def monolithic(tiny_model_dir):
    """transformers' own Qwen3VLMoeForConditionalGeneration, float32: the parity oracle."""
    import torch
    from transformers import Qwen3VLMoeForConditionalGeneration

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def encoder(tiny_model_dir):
    from encode_server.vision import VisionEncoder

    return VisionEncoder.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def builder(tiny_model_dir):
    """The language side's PromptBuilder (chat template, tokens, grids, M-RoPE) on the tiny model."""
    from language_server.prompt.builder import PromptBuilder

    return PromptBuilder.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def pipeline(builder, encoder):
    """The disaggregated pipeline in one process: ``pipeline.encode(messages)`` and friends."""
    from epd.local import SplitPipeline

    return SplitPipeline(builder, encoder)


@pytest.fixture(scope="session")
def language_model(tiny_model_dir):
    from language_server.engines.reference.model import Qwen3MoeForCausalLMWithDeepStack

    return Qwen3MoeForCausalLMWithDeepStack.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def make_image():
    """``make_image(height, width, seed=0)``: a PIL RGB image of uniform random pixels."""
    import numpy as np
    from PIL import Image

    def make(height: int, width: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))

    return make


@pytest.fixture(scope="session")
def encode_image():
    """``encode_image(image, format="PNG", **save_kwargs)``: the image's encoded bytes."""
    import io

    def encode(image, format: str = "PNG", **save_kwargs) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=format, **save_kwargs)
        return buf.getvalue()

    return encode


@pytest.fixture(scope="session")
def make_video():
    """``make_video(frames, height, width, fps=4, seed=0, codec="mpeg4", fmt="mp4")``: the
    bytes of a video of random frames encoded with PyAV (a lossless ``ffv1`` in ``mkv`` works
    too); each frame differs, so a wrong frame or order changes the rows."""
    return video_bytes


def video_bytes(frames: int, height: int, width: int, fps: int = 4, seed: int = 0,
                codec: str = "mpeg4", fmt: str = "mp4", faststart: bool = False) -> bytes:  # fmt: skip
    """``faststart``: an mp4 whose index comes before its frames (cut it short and the
    container still declares every frame)."""
    import io
    import tempfile

    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    with tempfile.NamedTemporaryFile(suffix=f".{fmt}") as tmp:
        buf = tmp.name if faststart else io.BytesIO()  # faststart rewrites the file at the end
        options = {"movflags": "faststart"} if faststart else {}
        _write_video(av.open(buf, mode="w", format=fmt, options=options), rng, frames, height,
                     width, fps, codec)  # fmt: skip
        return tmp.read() if faststart else buf.getvalue()  # type: ignore[union-attr]


def _write_video(container, rng, frames, height, width, fps, codec) -> None:
    import av
    import numpy as np

    with container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            pixels = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
            pixels = pixels.repeat(8, 0).repeat(8, 1)  # blocks: survives lossy coding
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decoded_frames(data: bytes):
    """Every frame of ``data`` as transformers' PyAV loader reads them: [T, H, W, 3] uint8."""
    import io

    import av
    import numpy as np

    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
