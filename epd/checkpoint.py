"""Write a state dict as a Hugging Face safetensors checkpoint in the published Qwen3-VL-MoE layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

EXPERT_SUFFIXES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def published_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors under published names, experts transposed to [E, H, 2I] / [E, I, H]."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(EXPERT_SUFFIXES):
            tensor = tensor.transpose(1, 2)
        out[name] = tensor.to(dtype).contiguous()
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, shards: int) -> list[Path]:
    """Write ``tensors`` as one file or ``shards`` files plus model.safetensors.index.json."""
    names = sorted(tensors)
    if shards == 1:
        path = out_dir / "model.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        return [path]
    groups = [names[i::shards] for i in range(shards)]
    if any(not g for g in groups):
        raise ValueError(f"cannot cut {len(names)} tensors into {shards} non-empty shards")
    weight_map, paths = {}, []
    for i, group in enumerate(groups):
        path = out_dir / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(path), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, path.name))
        paths.append(path)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index_path = out_dir / "model.safetensors.index.json"
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    return [*paths, index_path]
