"""The encoder half: only ViT weights, image bytes in, one ViT forward per batch, rows shaped for
the data plane; and the split pipeline (prompt builder + encoder) that the parity tests use."""

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


def test_encoder_holds_no_language_weights(encoder):
    names = [n for n, _ in encoder.vision.named_parameters()]
    assert names and not [n for n in names if "layers." in n or "embed_tokens" in n]
    assert encoder.hidden == 64 and encoder.merge_size == 2
    assert not hasattr(encoder, "tokenizer") and not hasattr(encoder, "processor")


def test_preprocess_image_matches_the_hf_image_processor(encoder, make_image, encode_image):
    image = make_image(200, 96, seed=3)
    ours = encoder.preprocess_image(encode_image(image))
    ref = encoder.image_processor(images=[image], return_tensors="pt")
    assert ours.grid == (1, 12, 6) == tuple(ref["image_grid_thw"][0].tolist())
    assert ours.n_tokens == 12 * 6 // 4
    assert torch.equal(ours.pixel_values, ref["pixel_values"])


def test_preprocess_needs_no_vit(encoder, make_image, encode_image, monkeypatch):
    monkeypatch.setattr(encoder.vision, "forward", lambda *a, **k: pytest.fail("ViT called"))
    image = encoder.preprocess_image(encode_image(make_image(64, 64)))
    assert image.n_tokens == 4 and image.pixel_values.shape[0] == 16 and image.grid == (1, 4, 4)


def test_deepstack_columns_are_the_three_vit_features(encoder, make_image, encode_image):
    image = encoder.preprocess_image(encode_image(make_image(64, 96)))
    with torch.no_grad():
        grid = torch.tensor([image.grid])
        raw = encoder.vision(image.pixel_values, grid_thw=grid, return_dict=True)
    [(embeds, deepstack)] = encoder.run_vision([image])
    assert torch.equal(embeds, raw.pooler_output)
    for k, feature in enumerate(raw.deepstack_features):
        assert torch.equal(deepstack[:, k * 64 : (k + 1) * 64], feature)


def test_run_vision_is_one_forward_with_owned_rows(encoder, make_image, encode_image, monkeypatch):
    images = [encoder.preprocess_image(encode_image(make_image(h, w, s)))
              for h, w, s in [(80, 112, 1), (224, 320, 2), (64, 64, 3)]]  # fmt: skip
    singles = [encoder.run_vision([im])[0] for im in images]
    calls = []
    original = encoder.vision.forward
    monkeypatch.setattr(
        encoder.vision, "forward", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    batch = encoder.run_vision(images)
    assert len(calls) == 1 and encoder.run_vision([]) == [] and len(calls) == 1
    storages = set()
    for im, (e, d), (e1, d1) in zip(images, batch, singles, strict=True):
        assert e.shape == (im.n_tokens, 64) and d.shape == (im.n_tokens, 192)
        assert e.is_contiguous() and d.is_contiguous()
        storages |= {e.untyped_storage().data_ptr(), d.untyped_storage().data_ptr()}
        assert torch.allclose(e, e1, atol=1e-5) and torch.allclose(d, d1, atol=1e-5)
    assert len(storages) == 2 * len(images)  # every tensor owns its memory


def test_bad_image_bytes_are_a_value_error(encoder):
    with pytest.raises(ValueError, match="cannot decode"):
        encoder.preprocess_image(b"\x89PNG not really")


def test_encode_shapes_and_layout(pipeline, make_image):
    out = pipeline.encode(_prompt(make_image, (80, 112), (200, 96)))
    hidden = pipeline.encoder.hidden
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


def test_text_only_prompt_has_empty_visual_tensors(pipeline):
    out = pipeline.encode([{"role": "user", "content": "no pictures here"}])
    assert out.n_vis == 0 and out.embeds.shape == (0, 64) and out.deepstack.shape == (0, 192)
    assert out.image_grid_thw.shape == (0, 3) and out.mrope_delta == 0
    assert torch.equal(out.positions, torch.arange(len(out.input_ids)).expand(3, -1))


def test_batch_is_one_vit_forward_and_matches_single(pipeline, make_image, monkeypatch):
    prompts = [
        _prompt(make_image, (80, 112), seed=1),
        [{"role": "user", "content": "text only"}],
        _prompt(make_image, (96, 160), (224, 320), seed=2),
    ]
    singles = [pipeline.encode(p) for p in prompts]
    calls = []
    original = pipeline.encoder.vision.forward
    monkeypatch.setattr(
        pipeline.encoder.vision, "forward", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    batch = pipeline.encode_batch(prompts)
    assert len(calls) == 1
    for one, many in zip(singles, batch, strict=True):
        assert torch.equal(one.input_ids, many.input_ids)
        assert torch.equal(one.positions, many.positions)
        assert torch.allclose(one.embeds, many.embeds, atol=1e-5)
        assert torch.allclose(one.deepstack, many.deepstack, atol=1e-5)


def test_bad_image_in_a_prompt_is_a_value_error(pipeline):
    bad = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
        }
    ]
    with pytest.raises(ValueError, match="cannot decode"):
        pipeline.encode(bad)


@pytest.mark.slow
def test_sharded_bfloat16_encoder(tmp_path, make_image, encode_image, encoder):
    sharded = make_tiny_model(tmp_path / "sharded", shards=4)
    bf16 = VisionEncoder.from_pretrained(sharded, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.vision.parameters()} == {torch.bfloat16}
    f32 = VisionEncoder.from_pretrained(sharded)
    data = encode_image(make_image(80, 112))
    [a], [b], [ref] = (e.run_vision([e.preprocess_image(data)]) for e in (bf16, f32, encoder))
    assert a[0].dtype == torch.bfloat16 and a[1].dtype == torch.bfloat16
    assert torch.equal(b[0], ref[0]) and torch.equal(b[1], ref[1])
    assert (a[1].float() - ref[1]).abs().max() < 0.1


@pytest.mark.parametrize("text", ["<|image_pad|> hi", "<|video_pad|>"])
def test_vision_tokens_typed_as_text_are_rejected(pipeline, text):
    with pytest.raises(ValueError, match="pad"):
        pipeline.encode([{"role": "user", "content": text}])
