"""Loading the language half: sharded checkpoints, bfloat16, both expert layouts, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from epd.local import prefill_logits
from epd.tiny_model import make_tiny_model
from language_server.engines.reference.model import Qwen3MoeForCausalLMWithDeepStack
from language_server.engines.weights import to_internal


@pytest.fixture(scope="module")
def text_prompt(pipeline):
    return pipeline.encode([{"role": "user", "content": "Hello there, tiny model."}])


@pytest.mark.slow
def test_sharded_checkpoint_loads_the_same_weights(tmp_path, language_model, text_prompt):
    sharded = make_tiny_model(tmp_path / "sharded", shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    model = Qwen3MoeForCausalLMWithDeepStack.from_pretrained(sharded)
    for name, tensor in language_model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert torch.equal(
        prefill_logits(model, text_prompt), prefill_logits(language_model, text_prompt)
    )


@pytest.mark.slow
def test_bfloat16_load_matches_float32_closely(tiny_model_dir, language_model, text_prompt):
    model = Qwen3MoeForCausalLMWithDeepStack.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = prefill_logits(model, text_prompt)
    assert logits.dtype == torch.bfloat16
    ref = prefill_logits(language_model, text_prompt)
    assert (logits.float() - ref).abs().max() < 0.1


@pytest.mark.slow
def test_bfloat16_checkpoint_loads_in_float32(tmp_path, text_prompt):
    bf16_dir = make_tiny_model(tmp_path / "bf16", dtype="bfloat16", shards=2)
    model = Qwen3MoeForCausalLMWithDeepStack.from_pretrained(bf16_dir, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.isfinite(prefill_logits(model, text_prompt)).all()


def test_internal_expert_layout_loads_identically(tmp_path, tiny_model_dir, language_model):
    """A checkpoint in transformers' internal layout ([E, 2I, H], [E, H, I]) gives the same model."""
    out = tmp_path / "internal"
    out.mkdir()
    for name in ("config.json",):
        (out / name).write_text((tiny_model_dir / name).read_text())
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    for name in tensors:
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name] = tensors[name].transpose(1, 2).contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    model = Qwen3MoeForCausalLMWithDeepStack.from_pretrained(out)
    for name, tensor in language_model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_expert_layout_detection_by_shape():
    e, h, i = 4, 64, 48
    published = torch.randn(e, h, 2 * i)
    assert to_internal("x.experts.gate_up_proj", published, h, i).shape == (e, 2 * i, h)
    assert to_internal("x.experts.down_proj", torch.randn(e, i, h), h, i).shape == (e, h, i)
    assert to_internal("x.experts.down_proj", torch.randn(e, h, i), h, i).shape == (e, h, i)
    with pytest.raises(ValueError, match="matches neither"):
        to_internal("x.experts.gate_up_proj", torch.randn(e, h, i), h, i)
    with pytest.raises(ValueError, match="both expert layouts"):
        to_internal("x.experts.gate_up_proj", torch.randn(e, 64, 64), 64, 32)
    square = torch.randn(e, 64, 64)
    assert torch.equal(
        to_internal("x.experts.gate_up_proj", square, 64, 32, "published"), square.transpose(1, 2)
    )
    assert to_internal("x.q_proj.weight", published, h, i) is published


def test_missing_weights_are_a_clear_error(tmp_path, tiny_model_dir):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Qwen3MoeForCausalLMWithDeepStack.from_pretrained(tmp_path)
    save_file({"model.visual.x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.language_model"):
        Qwen3MoeForCausalLMWithDeepStack.from_pretrained(tmp_path)
