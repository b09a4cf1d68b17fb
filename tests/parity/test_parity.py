"""Parity of the split halves against transformers' monolithic Qwen3VLMoeForConditionalGeneration.

Same checkpoint directory, float32: logits at every prompt position within 1e-4 (max abs), and the
16 greedy tokens identical to the monolithic ``model.generate(do_sample=False)``.
"""

from __future__ import annotations

import base64
import dataclasses
import io

import pytest
import torch

from epd.local import generate_encoded, language_inputs, prefill_logits
from language_server.engines.base import SamplingParams

ATOL = 1e-4
N_TOKENS = 16
BLOCK_TOKENS = 16  # data-plane block size assumed by the design

# name -> list of (height, width, seed, as_data_url); sizes are non-square and all different
PROMPTS = {
    "text_only": [],
    "one_image": [(80, 112, 1, True)],
    "two_images": [(200, 96, 2, False), (96, 160, 3, True)],
    "long_image": [(224, 320, 4, False)],  # 7 x 10 = 70 visual tokens > 3 blocks of 16
}


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _messages(spec, make_image):
    """(messages for our split pipeline, the same messages with PIL images for transformers)."""
    ours, theirs = [], []
    for k, (h, w, seed, as_url) in enumerate(spec):
        image = make_image(h, w, seed)
        part = {"type": "image_url", "image_url": {"url": _data_url(image)}}
        ours.append(part if as_url else {"type": "image", "image": image})
        theirs.append({"type": "image", "image": image})
        ours.append({"type": "text", "text": f"picture {k}."})
        theirs.append({"type": "text", "text": f"picture {k}."})
    text = {"type": "text", "text": "Describe what you see, then count to ten."}
    return (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [*ours, text]}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [*theirs, text]}],
    )


@pytest.fixture(scope="module")
def cases(pipeline, monolithic, make_image):
    """name -> (EncodedPrompt from ONE batched ViT forward, monolithic inputs)."""
    pairs = {name: _messages(spec, make_image) for name, spec in PROMPTS.items()}
    encoded = pipeline.encode_batch([ours for ours, _ in pairs.values()])
    processor = pipeline.processor
    out = {}
    for (name, (_, theirs)), enc in zip(pairs.items(), encoded, strict=True):
        inputs = processor.apply_chat_template(
            theirs,
            tokenize=True,
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        )
        out[name] = (enc, inputs)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROMPTS))
def test_prefill_logits_match(name, cases, language_model, monolithic):
    encoded, inputs = cases[name]
    assert torch.equal(encoded.input_ids, inputs["input_ids"][0])
    assert encoded.n_vis == int((inputs["input_ids"] == monolithic.config.image_token_id).sum())
    with torch.no_grad():
        ref = monolithic(**inputs).logits[0]
    ours = prefill_logits(language_model, encoded)
    diff = (ours - ref).abs().max().item()
    print(f"{name}: seq {len(encoded.input_ids)}, n_vis {encoded.n_vis}, max abs diff {diff:.3g}")
    assert ours.shape == ref.shape
    assert diff <= ATOL


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_tokens_match(name, cases, language_model, monolithic):
    encoded, inputs = cases[name]
    with torch.no_grad():
        ref = monolithic.generate(**inputs, max_new_tokens=N_TOKENS, do_sample=False)
    ref_tokens = tuple(ref[0, inputs["input_ids"].shape[1] :].tolist())
    result = generate_encoded(language_model, encoded, SamplingParams(max_new_tokens=N_TOKENS))
    assert len(ref_tokens) == N_TOKENS
    assert result.token_ids == ref_tokens
    assert result.finish_reason == "length"


def test_expected_visual_token_counts(cases):
    counts = {name: cases[name][0].n_vis for name in PROMPTS}
    assert counts["text_only"] == 0
    assert counts["one_image"] > 0
    assert cases["two_images"][0].image_grid_thw.shape == (2, 3)
    assert counts["long_image"] > 3 * BLOCK_TOKENS


@pytest.mark.slow
def test_long_image_survives_block_transport(cases, language_model, monolithic):
    """Cut the visual rows into 16-token blocks (each with its deepstack rows), reassemble, compare."""
    encoded, inputs = cases["long_image"]
    blocks = [
        (
            encoded.embeds[i : i + BLOCK_TOKENS].clone(),
            encoded.deepstack[i : i + BLOCK_TOKENS].clone(),
        )
        for i in range(0, encoded.n_vis, BLOCK_TOKENS)
    ]
    assert len(blocks) > 3
    embeds = torch.cat([e for e, _ in blocks])
    deepstack = torch.cat([d for _, d in blocks])
    rebuilt = dataclasses.replace(encoded, embeds=embeds, deepstack=deepstack)
    with torch.no_grad():
        ref = monolithic(**inputs).logits[0]
    assert (prefill_logits(language_model, rebuilt) - ref).abs().max().item() <= ATOL
    kwargs = language_inputs(language_model, rebuilt)
    assert kwargs["input_deepstack_embeds"][encoded.visual_mask].abs().sum(-1).min() > 0
