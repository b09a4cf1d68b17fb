"""epd-make-tiny-model: a complete, deterministic, published-layout checkpoint that transformers loads."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration

from epd.tiny_model import TinySpec, main, make_tiny_model, parse_args

EXPECTED_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
    "chat_template.jinja",
}


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_default_checkpoint_is_complete(tiny_model_dir):
    assert {p.name for p in tiny_model_dir.iterdir()} >= EXPECTED_FILES
    config = json.loads((tiny_model_dir / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]) == (64, 4, 1000)
    assert (text["num_local_experts"], text["moe_intermediate_size"]) == (4, 48)
    assert vision["deepstack_visual_indexes"] == [1, 2, 3] and vision["out_hidden_size"] == 64
    assert text["rope_parameters"]["mrope_section"] == [2, 3, 3]
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    tokens = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    for token, key in zip(tokens, keys, strict=True):
        assert processor.tokenizer.convert_tokens_to_ids(token) == config[key]
    assert len(processor.tokenizer) == text["vocab_size"]


def test_weights_use_published_names_and_expert_layout(tiny_model_dir):
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        gate_up = f.get_slice("model.language_model.layers.0.mlp.experts.gate_up_proj").get_shape()
        down = f.get_slice("model.language_model.layers.0.mlp.experts.down_proj").get_shape()
    assert {n.split(".")[0] for n in names} == {"model", "lm_head"}
    assert all(
        n == "lm_head.weight" or n.startswith(("model.visual.", "model.language_model."))
        for n in names
    )
    assert gate_up == [4, 64, 96] and down == [4, 48, 64]  # [E, H, 2I] and [E, I, H]


def test_transformers_loads_it_with_transposed_experts(tiny_model_dir, monolithic):
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as f:
        stored = f.get_tensor("model.language_model.layers.1.mlp.experts.gate_up_proj")
    loaded = monolithic.model.language_model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(loaded.detach(), stored.transpose(1, 2))


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny_model_dir):
    again = make_tiny_model(tmp_path / "again")
    other = make_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert _digest(again / name) == _digest(tiny_model_dir / name)
    assert _digest(other / "model.safetensors") != _digest(tiny_model_dir / "model.safetensors")


@pytest.mark.slow
def test_cli_writes_other_sizes(tmp_path):
    out = tmp_path / "bigger"
    argv = [
        str(out),
        "--hidden",
        "96",
        "--layers",
        "2",
        "--experts",
        "6",
        "--top-k",
        "3",
        "--vocab",
        "700",
        "--vision-depth",
        "6",
        "--moe-intermediate",
        "40",
        "--shards",
        "2",
    ]
    assert main(argv) == 0
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_experts, text.vocab_size) == (
        96,
        2,
        6,
        700,
    )
    assert model.config.vision_config.deepstack_visual_indexes == [2, 3, 4]
    assert (out / "model.safetensors.index.json").is_file()


def test_cli_help_and_errors(capsys, tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = capsys.readouterr().out
    for flag in (
        "--hidden",
        "--layers",
        "--experts",
        "--vocab",
        "--vision-depth",
        "--seed",
        "--dtype",
        "--shards",
    ):
        assert flag in help_text
    assert main([str(tmp_path / "bad"), "--moe-intermediate", "32"]) == 2  # 2I == H
    with pytest.raises(ValueError, match="moe_intermediate"):
        TinySpec(hidden=48)  # I == H with the default I = 48
