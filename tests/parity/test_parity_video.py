"""Parity of the split halves on videos against transformers' monolithic model (issue 19).

The language side plans each video from its container's metadata and builds the prompt; the
encoder decodes the sampled frames and runs the video processor's patches through the ViT (in
one forward with the images); the language half runs on the rows. transformers gets the frames
PyAV decodes from the same bytes, with the container's frame count and rate. Float32 logits at
every prompt position within 1e-4 (max abs), 16 greedy tokens identical.
"""

from __future__ import annotations

import pytest
import torch

from epd.local import generate_encoded, prefill_logits
from language_server.engines.base import SamplingParams
from tests.e2e.conftest import media_prompt, transformers_inputs
from tests.parity.test_parity import ATOL, N_TOKENS

# name -> items in prompt order: ("image", h, w, seed) or ("video", frames, h, w, fps, seed)
PROMPTS = {
    "one_video": [("video", 9, 64, 96, 4, 1)],
    "image_and_video": [("image", 80, 112, 2), ("video", 12, 96, 64, 6, 3)],
    "long_video": [("video", 40, 128, 160, 8, 4)],  # 10 frames of 5 x 4 = 100 rows > 3 blocks
}


def _messages(spec, make_image):
    """(messages for our split pipeline, transformers' content, videos, metadata)."""
    ours, theirs, videos, metadata = media_prompt(spec, make_image)
    return [{"role": "user", "content": ours}], theirs, videos, metadata


@pytest.fixture(scope="module")
def cases(pipeline, make_image):
    """name -> (EncodedPrompt from ONE ViT forward over every image and video, HF inputs)."""
    built = {name: _messages(spec, make_image) for name, spec in PROMPTS.items()}
    encoded = pipeline.encode_batch([ours for ours, *_ in built.values()])
    return {name: (enc, transformers_inputs(pipeline.processor, *rest))
            for (name, (_, *rest)), enc in zip(built.items(), encoded, strict=True)}  # fmt: skip


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
