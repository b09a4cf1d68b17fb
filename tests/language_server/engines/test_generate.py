"""The generation loop: KV-cached decoding equals full recomputation, sampling knobs, stopping."""

from __future__ import annotations

import pytest
import torch

from epd.local import language_inputs
from language_server.engines.base import SamplingParams
from language_server.engines.reference.generate import (
    build_input_embeds,
    generate,
    next_token,
    stream,
)


@pytest.fixture(scope="module")
def image_prompt(pipeline, make_image):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": make_image(128, 64, seed=7)},
                {"type": "text", "text": "Name it."},
            ],
        }
    ]
    return pipeline.encode(messages)


def _run(model, encoded, params, **extra):
    return generate(
        model,
        encoded.input_ids,
        encoded.positions,
        params,
        **language_inputs(model, encoded),
        **extra,
    )


def test_cached_greedy_equals_full_recompute(language_model, image_prompt):
    """No cache, whole sequence each step, text positions continuing from max + 1."""
    result = _run(language_model, image_prompt, SamplingParams(max_new_tokens=8))
    kwargs = language_inputs(language_model, image_prompt)
    embeds, deepstack, positions = (
        kwargs["input_embeds"],
        kwargs["input_deepstack_embeds"],
        image_prompt.positions,
    )
    tokens = []
    with torch.no_grad():
        for _ in range(8):
            token = int(language_model(None, positions, embeds, deepstack)[-1].argmax())
            tokens.append(token)
            embeds = torch.cat([embeds, language_model.embed(torch.tensor([token]))])
            deepstack = torch.cat([deepstack, deepstack.new_zeros(1, deepstack.shape[1])])
            positions = torch.cat(
                [positions, positions.new_full((3, 1), int(positions.max()) + 1)], 1
            )
    assert result.token_ids == tuple(tokens)


def test_seeded_sampling_is_reproducible(language_model, image_prompt):
    params = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.95, top_k=50, seed=123)
    first = _run(language_model, image_prompt, params)
    assert first == _run(language_model, image_prompt, params)
    others = {
        _run(
            language_model, image_prompt, SamplingParams(max_new_tokens=12, temperature=1.5, seed=s)
        ).token_ids
        for s in range(4)
    }
    assert len(others) > 1


def test_top_k_one_and_tiny_top_p_are_greedy(language_model, image_prompt):
    greedy = _run(language_model, image_prompt, SamplingParams(max_new_tokens=6))
    top1 = _run(
        language_model,
        image_prompt,
        SamplingParams(max_new_tokens=6, temperature=2.0, top_k=1, seed=1),
    )
    nucleus = _run(
        language_model,
        image_prompt,
        SamplingParams(max_new_tokens=6, temperature=2.0, top_p=1e-6, seed=1),
    )
    assert greedy.token_ids == top1.token_ids == nucleus.token_ids


def test_next_token_filters():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    gen = torch.Generator().manual_seed(0)
    picks = {next_token(logits, SamplingParams(temperature=1.0, top_k=2), gen) for _ in range(200)}
    assert picks == {1, 2}
    picks = {next_token(logits, SamplingParams(temperature=1.0, top_p=0.5), gen) for _ in range(50)}
    assert picks == {1}


def test_stop_tokens_and_streaming(language_model, image_prompt):
    full = _run(language_model, image_prompt, SamplingParams(max_new_tokens=10))
    stop_at = full.token_ids[3]
    first = full.token_ids.index(stop_at)
    seen = []
    stopped = _run(
        language_model,
        image_prompt,
        SamplingParams(max_new_tokens=10, stop_token_ids=[stop_at]),
        on_token=seen.append,
    )
    assert stopped.token_ids == full.token_ids[:first] == tuple(seen)
    assert stopped.finish_reason == "stop" and full.finish_reason == "length"
    streamed = stream(
        language_model,
        image_prompt.input_ids,
        image_prompt.positions,
        SamplingParams(max_new_tokens=10),
        **language_inputs(language_model, image_prompt),
    )
    assert tuple(streamed) == full.token_ids


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": 2.5},
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"seed": "x"},
        {"stop_token_ids": [-1]},
    ],
)
def test_sampling_params_validation(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_sampling_params_is_frozen():
    params = SamplingParams(stop_token_ids=[3, 4])
    assert params.stop_token_ids == (3, 4) and params.greedy
    with pytest.raises(AttributeError):
        params.temperature = 1.0


def test_build_input_embeds(language_model, image_prompt):
    embeds, deepstack = build_input_embeds(
        language_model,
        image_prompt.input_ids,
        image_prompt.visual_mask,
        image_prompt.embeds,
        image_prompt.deepstack,
    )
    mask = image_prompt.visual_mask
    assert torch.equal(embeds[mask], image_prompt.embeds)
    assert torch.equal(embeds[~mask], language_model.embed(image_prompt.input_ids[~mask]))
    assert torch.equal(deepstack[mask], image_prompt.deepstack)
    assert not deepstack[~mask].any()
    with pytest.raises(ValueError, match="expected embeds"):
        build_input_embeds(
            language_model,
            image_prompt.input_ids,
            mask,
            image_prompt.embeds[1:],
            image_prompt.deepstack,
        )
    with pytest.raises(ValueError, match="visual_mask"):
        build_input_embeds(
            language_model,
            image_prompt.input_ids,
            mask.long(),
            image_prompt.embeds,
            image_prompt.deepstack,
        )
