"""Parity of the split halves on videos against transformers' monolithic model (issue 19).

The language side plans each video from its container's metadata and builds the prompt; the
encoder decodes the sampled frames and runs the video processor's patches through the ViT (in
one forward with the images); the language half runs on the rows. transformers gets the frames
PyAV decodes from the same bytes, with the container's frame count and rate. Float32 logits at
every prompt position within 1e-4 (max abs), 16 greedy tokens identical.
"""

from __future__ import annotations

import base64

import pytest
import torch

from epd.local import generate_encoded, prefill_logits
from language_server.engines.base import SamplingParams
from tests.conftest import decoded_frames, video_bytes
from tests.parity.test_parity import ATOL, N_TOKENS, _data_url

# name -> items in prompt order: ("image", h, w, seed) or ("video", frames, h, w, fps, seed)
PROMPTS = {
    "one_video": [("video", 9, 64, 96, 4, 1)],
    "image_and_video": [("image", 80, 112, 2), ("video", 12, 96, 64, 6, 3)],
    "long_video": [("video", 40, 128, 160, 8, 4)],  # 10 frames of 5 x 4 = 100 rows > 3 blocks
}


def _messages(spec, make_image):
    ours, theirs, videos, metadata = [], [], [], []
    for k, item in enumerate(spec):
        if item[0] == "image":
            image = make_image(item[1], item[2], item[3])
            ours.append({"type": "image_url", "image_url": {"url": _data_url(image)}})
            theirs.append({"type": "image", "image": image})
        else:
            _, n, h, w, fps, seed = item
            data = video_bytes(n, h, w, fps=fps, seed=seed)
            url = "data:video/mp4;base64," + base64.b64encode(data).decode()
            ours.append({"type": "video_url", "video_url": {"url": url}})
            theirs.append({"type": "video"})
            videos.append(decoded_frames(data))
            metadata.append({"total_num_frames": n, "fps": fps})
        text = {"type": "text", "text": f"clip {k}."}
        ours.append(text)
        theirs.append(text)
    ask = {"type": "text", "text": "What happens?"}
    return [{"role": "user", "content": [*ours, ask]}], [*theirs, ask], videos, metadata


@pytest.fixture(scope="module")
def cases(pipeline, make_image):
    """name -> (EncodedPrompt from ONE ViT forward over every image and video, HF inputs)."""
    built = {name: _messages(spec, make_image) for name, spec in PROMPTS.items()}
    encoded = pipeline.encode_batch([ours for ours, *_ in built.values()])
    processor = pipeline.processor
    out = {}
    for (name, (_, theirs, videos, metadata)), enc in zip(built.items(), encoded, strict=True):
        text = processor.apply_chat_template([{"role": "user", "content": theirs}],
                                             tokenize=False, add_generation_prompt=True)  # fmt: skip
        images = [p["image"] for p in theirs if p["type"] == "image"]
        inputs = processor(text=[text], images=images or None, videos=videos,
                           video_metadata=metadata, return_tensors="pt")  # fmt: skip
        out[name] = (enc, inputs)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROMPTS))
def test_prefill_logits_match(name, cases, language_model, monolithic):
    encoded, inputs = cases[name]
    assert torch.equal(encoded.input_ids, inputs["input_ids"][0])
    assert torch.equal(encoded.video_grid_thw, inputs["video_grid_thw"])
    with torch.no_grad():
        ref = monolithic(**inputs).logits[0]
    ours = prefill_logits(language_model, encoded)
    diff = (ours - ref).abs().max().item()
    print(f"{name}: seq {len(encoded.input_ids)}, n_vis {encoded.n_vis}, max abs diff {diff:.3g}")
    assert ours.shape == ref.shape
    assert diff <= ATOL
    if name == "long_video":
        assert encoded.n_vis > 3 * 16


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_tokens_match(name, cases, language_model, monolithic):
    encoded, inputs = cases[name]
    with torch.no_grad():
        ref = monolithic.generate(**inputs, max_new_tokens=N_TOKENS, do_sample=False)
    result = generate_encoded(language_model, encoded, SamplingParams(max_new_tokens=N_TOKENS))
    assert result.token_ids == tuple(ref[0, inputs["input_ids"].shape[1] :].tolist())
    assert len(result.token_ids) == N_TOKENS
