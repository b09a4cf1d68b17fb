"""The deepstack block matters, and each slice is added after the right decoder layer."""

from __future__ import annotations

import pytest
import torch

from epd.local import language_inputs
from language_server.engines.reference.model import Qwen3MoeModel, Qwen3MoeModelWithDeepStack


@pytest.fixture(scope="module")
def encoded(pipeline, make_image):
    image = make_image(96, 128, seed=11)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image", "image": image},
                {"type": "text", "text": "What is it?"},
            ],
        }
    ]
    return pipeline.encode(messages)


def _logits(model, encoded, deepstack):
    kwargs = language_inputs(model, encoded)
    with torch.no_grad():
        return model(None, encoded.positions, kwargs["input_embeds"], deepstack)


def _first_visual(encoded) -> int:
    return int(encoded.visual_mask.nonzero()[0])


def test_zeroing_deepstack_changes_logits(language_model, encoded):
    deepstack = language_inputs(language_model, encoded)["input_deepstack_embeds"]
    full = _logits(language_model, encoded, deepstack)
    zeroed = _logits(language_model, encoded, torch.zeros_like(deepstack))
    first = _first_visual(encoded)
    # causal: nothing before the image moves (up to MoE batching noise)
    assert torch.allclose(full[:first], zeroed[:first], atol=1e-5)
    assert (full[first:] - zeroed[first:]).abs().max() > 1e-3


@pytest.mark.parametrize("order", [(1, 0, 2), (0, 2, 1), (2, 1, 0)])
def test_permuting_slices_changes_logits(language_model, encoded, order):
    deepstack = language_inputs(language_model, encoded)["input_deepstack_embeds"]
    hidden = language_model.config.hidden_size
    slices = deepstack.split(hidden, dim=-1)
    permuted = torch.cat([slices[k] for k in order], dim=-1)
    diff = _logits(language_model, encoded, deepstack) - _logits(language_model, encoded, permuted)
    assert diff.abs().max() > 1e-3


def test_visual_mask_path_equals_dense_add(language_model, encoded):
    kwargs = language_inputs(language_model, encoded)
    with torch.no_grad():
        masked = language_model(None, encoded.positions, **kwargs)
        kwargs["visual_mask"] = None
        dense = language_model(None, encoded.positions, **kwargs)
    assert torch.equal(masked, dense)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_slice_k_enters_after_layer_k(language_model, encoded, layer):
    """With only slice k non-zero, outputs of layers < k are untouched and layer k's output moves."""
    deepstack = language_inputs(language_model, encoded)["input_deepstack_embeds"]
    hidden = language_model.config.hidden_size
    only_k = torch.zeros_like(deepstack)
    only_k[:, layer * hidden : (layer + 1) * hidden] = deepstack[
        :, layer * hidden : (layer + 1) * hidden
    ]
    base = _layer_outputs(language_model, encoded, torch.zeros_like(deepstack))
    moved = _layer_outputs(language_model, encoded, only_k)
    for k in range(layer + 1):
        assert torch.allclose(base[k], moved[k], atol=1e-5), f"layer {k} output changed"
    assert (base[layer + 1] - moved[layer + 1]).abs().max() > 1e-2


def _layer_outputs(model, encoded, deepstack):
    """Each decoder layer's INPUT (so index k + 1 sees what was added after layer k)."""
    seen = []
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
        for layer in model.model.layers
    ]
    try:
        _logits(model, encoded, deepstack)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_without_deepstack_equals_plain_text_model(language_model, encoded):
    plain = Qwen3MoeModel(language_model.config)
    plain.load_state_dict(language_model.model.state_dict())
    plain.eval()
    kwargs = language_inputs(language_model, encoded)
    with torch.no_grad():
        ours = language_model.model(None, encoded.positions, kwargs["input_embeds"], None)
        ref = plain(None, encoded.positions, kwargs["input_embeds"])
        ours_ids = language_model.model(encoded.input_ids, encoded.positions)
        ref_ids = plain(encoded.input_ids, encoded.positions)
    assert torch.equal(ours, ref)
    assert torch.equal(ours_ids, ref_ids)
    assert not hasattr(plain, "_check_deepstack")


def test_bad_deepstack_shapes_are_rejected(language_model, encoded):
    seq, hidden = len(encoded.input_ids), language_model.config.hidden_size
    embeds = language_inputs(language_model, encoded)["input_embeds"]
    for bad in (torch.zeros(seq, hidden + 1), torch.zeros(seq - 1, 3 * hidden), torch.zeros(seq)):
        with pytest.raises(ValueError, match="input_deepstack_embeds"):
            language_model(None, encoded.positions, embeds, bad)


def test_layer_indices_are_absolute_in_a_pipeline_stage(language_model, encoded):
    """A stage holding layers 2..3 still adds slice 2 after layer 2 (not slice 0)."""
    deepstack = language_inputs(language_model, encoded)["input_deepstack_embeds"]
    inputs = _layer_outputs(language_model, encoded, deepstack)
    with torch.no_grad():
        full = language_model.model(
            None,
            encoded.positions,
            language_inputs(language_model, encoded)["input_embeds"],
            deepstack,
        )
        stage = Qwen3MoeModelWithDeepStack(language_model.config).eval()
        stage.load_state_dict(language_model.model.state_dict())
        stage.layers = stage.layers[2:]
        # the stage's input is the hidden state entering layer 2; embedding is a pass-through here
        staged = stage(None, encoded.positions, inputs[2][0], deepstack)
    assert [layer.self_attn.layer_idx for layer in stage.layers] == [2, 3]
    assert torch.allclose(staged, full, atol=1e-5)
