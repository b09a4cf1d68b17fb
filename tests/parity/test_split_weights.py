"""Each half loads only its own tensors from the one checkpoint; together they cover all of it."""

from __future__ import annotations

from safetensors import safe_open

import encode_server.weights
import language_server.engines.weights
from encode_server.vision import VisionEncoder
from language_server.engines.reference.model import Qwen3MoeForCausalLMWithDeepStack

LANGUAGE_MARKERS = ("layers.", "embed_tokens", "lm_head", "self_attn", "experts")


def _checkpoint_numel(model_dir) -> dict[str, int]:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        names = f.keys()
        return {name: f.get_slice(name).get_shape() for name in names}


def _count(shapes) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def test_halves_hold_disjoint_parameters(tiny_model_dir, encoder, language_model):
    lm_names = [n for n, _ in language_model.named_parameters()]
    vit_names = [n for n, _ in encoder.vision.named_parameters()]
    assert not [n for n in lm_names if "visual" in n or "merger" in n or "blocks." in n]
    assert not [n for n in vit_names if any(m in n for m in LANGUAGE_MARKERS)]
    lm_count = sum(p.numel() for p in language_model.parameters())
    vit_count = sum(p.numel() for p in encoder.vision.parameters())
    shapes = _checkpoint_numel(tiny_model_dir)
    visual = _count(s for n, s in shapes.items() if n.startswith("model.visual."))
    print(
        f"language half: {lm_count} parameters; encoder half: {vit_count} parameters;"
        f" checkpoint: {_count(shapes.values())}"
    )
    assert vit_count == visual
    assert lm_count + vit_count == _count(shapes.values())


def _record_reads(monkeypatch, module):
    """Wrap ``module.safe_open`` so every tensor actually read is recorded."""
    read = []

    class Recorder:
        def __init__(self, path, framework):
            self._inner = safe_open(path, framework=framework)

        def __enter__(self):
            self._file = self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def keys(self):
            return self._file.keys()

        def get_tensor(self, name):
            read.append(name)
            return self._file.get_tensor(name)

    monkeypatch.setattr(module, "safe_open", Recorder)
    return read


def test_language_loader_never_reads_a_visual_tensor(tiny_model_dir, monkeypatch):
    read = _record_reads(monkeypatch, language_server.engines.weights)
    Qwen3MoeForCausalLMWithDeepStack.from_pretrained(tiny_model_dir)
    assert read and not [n for n in read if "visual" in n]
    assert "lm_head.weight" in read


def test_encoder_loader_reads_only_visual_tensors(tiny_model_dir, monkeypatch):
    read = _record_reads(monkeypatch, encode_server.weights)
    VisionEncoder.from_pretrained(tiny_model_dir)
    assert read and all(n.startswith("model.visual.") for n in read)
