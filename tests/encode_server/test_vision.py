"""The encoder half: only ViT weights, one ViT forward per batch, outputs shaped for the data plane."""

from __future__ import annotations

import pytest
import torch

from encode_server.vision import VisionEncoder
from epd.tiny_model import make_tiny_model


def _prompt(make_image, *sizes, seed=0):
    parts = [
        {"type": "image", "image": make_image(h, w, seed + k)} for k, (h, w) in enumerate(sizes)
    ]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]}]


def test_encoder_holds_no_language_weights(encoder, tiny_model_dir):
    names = [n for n, _ in encoder.vision.named_parameters()]
    assert names and not [n for n in names if "layers." in n or "embed_tokens" in n]
    assert encoder.hidden == 64


def test_encode_shapes_and_layout(encoder, make_image):
    out = encoder.encode(_prompt(make_image, (80, 112), (200, 96)))
    hidden = encoder.hidden
    seq = out.input_ids.shape[0]
    assert out.input_ids.dtype == torch.long and out.positions.shape == (3, seq)
    assert out.visual_mask.dtype == torch.bool and int(out.visual_mask.sum()) == out.n_vis
    assert out.embeds.shape == (out.n_vis, hidden) and out.embeds.is_contiguous()
    assert out.deepstack.shape == (out.n_vis, 3 * hidden) and out.deepstack.is_contiguous()
    assert out.embeds.data_ptr() != out.deepstack.data_ptr()
    assert out.image_grid_thw.tolist() == [[1, 4, 8], [1, 12, 6]]
    assert out.n_vis == (4 * 8 + 12 * 6) // 4
    # decode positions continue from the largest prompt position
    assert out.mrope_delta == int(out.positions.max()) + 1 - seq


def test_deepstack_columns_are_the_three_vit_features(encoder, make_image):
    prompt = encoder.preprocess(_prompt(make_image, (64, 96)))
    with torch.no_grad():
        raw = encoder.vision(prompt.pixel_values, grid_thw=prompt.image_grid_thw, return_dict=True)
    out = encoder.run_vision([prompt])[0]
    assert torch.equal(out.embeds, raw.pooler_output)
    for k, feature in enumerate(raw.deepstack_features):
        assert torch.equal(out.deepstack[:, k * 64 : (k + 1) * 64], feature)


def test_text_only_prompt_has_empty_visual_tensors(encoder):
    out = encoder.encode([{"role": "user", "content": "no pictures here"}])
    assert out.n_vis == 0 and out.embeds.shape == (0, 64) and out.deepstack.shape == (0, 192)
    assert out.image_grid_thw.shape == (0, 3) and out.mrope_delta == 0
    assert torch.equal(out.positions, torch.arange(len(out.input_ids)).expand(3, -1))


def test_batch_is_one_vit_forward_and_matches_single(encoder, make_image, monkeypatch):
    prompts = [
        _prompt(make_image, (80, 112), seed=1),
        [{"role": "user", "content": "text only"}],
        _prompt(make_image, (96, 160), (224, 320), seed=2),
    ]
    singles = [encoder.encode(p) for p in prompts]
    calls = []
    original = encoder.vision.forward
    monkeypatch.setattr(
        encoder.vision, "forward", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    batch = encoder.encode_batch(prompts)
    assert len(calls) == 1
    for one, many in zip(singles, batch, strict=True):
        assert torch.equal(one.input_ids, many.input_ids)
        assert torch.equal(one.positions, many.positions)
        assert torch.allclose(one.embeds, many.embeds, atol=1e-5)
        assert torch.allclose(one.deepstack, many.deepstack, atol=1e-5)


def test_preprocess_needs_no_vit(encoder, make_image, monkeypatch):
    monkeypatch.setattr(encoder.vision, "forward", lambda *a, **k: pytest.fail("ViT called"))
    prompt = encoder.preprocess(_prompt(make_image, (64, 64)))
    assert prompt.n_vis == 4 and prompt.pixel_values.shape[0] == 16 and prompt.n_images == 1


def test_bad_image_is_a_value_error(encoder):
    bad = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
        }
    ]
    with pytest.raises(ValueError, match="cannot decode"):
        encoder.encode(bad)


@pytest.mark.slow
def test_sharded_bfloat16_encoder(tmp_path, make_image, encoder):
    sharded = make_tiny_model(tmp_path / "sharded", shards=4)
    bf16 = VisionEncoder.from_pretrained(sharded, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.vision.parameters()} == {torch.bfloat16}
    f32 = VisionEncoder.from_pretrained(sharded)
    prompt = _prompt(make_image, (80, 112))
    a, b, ref = bf16.encode(prompt), f32.encode(prompt), encoder.encode(prompt)
    assert a.embeds.dtype == torch.bfloat16 and a.deepstack.dtype == torch.bfloat16
    assert torch.equal(b.embeds, ref.embeds) and torch.equal(b.deepstack, ref.deepstack)
    assert (a.deepstack.float() - ref.deepstack).abs().max() < 0.1


@pytest.mark.parametrize("text", ["<|image_pad|> hi", "<|video_pad|>"])
def test_vision_tokens_typed_as_text_are_rejected(encoder, text):
    with pytest.raises(ValueError, match="pad"):
        encoder.encode([{"role": "user", "content": text}])
