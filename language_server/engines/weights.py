"""Read the language half of a Qwen3-VL-MoE safetensors checkpoint (never a ``visual.*`` tensor).

Names go from ``model.language_model.X`` to ``model.X`` (``lm_head.weight`` stays). Fused experts
are accepted in the published layout (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``) and in
transformers' internal layout (``[E, 2I, H]``, ``[E, H, I]``), told apart by shape, and returned
in the internal layout that transformers' modules use.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
LANGUAGE_PREFIX = "model.language_model."
LM_HEAD = "lm_head.weight"
EXPERT_LAYOUTS = ("auto", "published", "internal")


def weight_files(model_dir: Path) -> dict[str, str]:
    """Map every tensor name in the checkpoint to the file (name inside model_dir) holding it."""
    index = model_dir / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        return dict(weight_map)
    single = model_dir / SINGLE
    if not single.is_file():
        raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {model_dir}")
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), SINGLE)


def _local_name(name: str) -> str | None:
    if name.startswith(LANGUAGE_PREFIX):
        return "model." + name[len(LANGUAGE_PREFIX) :]
    return name if name == LM_HEAD else None


def load_language_state(
    model_dir: str | Path,
    hidden: int,
    moe_intermediate: int,
    device: str | torch.device,
    dtype: torch.dtype,
    expert_layout: str = "auto",
) -> dict[str, torch.Tensor]:
    """The language model's tensors, under our module names, in ``dtype`` on ``device``."""
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout must be one of {EXPERT_LAYOUTS}, got {expert_layout!r}")
    model_dir = Path(model_dir)
    wanted: dict[str, list[str]] = {}
    for name, file in weight_files(model_dir).items():
        if _local_name(name) is not None:
            wanted.setdefault(file, []).append(name)
    if not wanted:
        raise ValueError(f"no {LANGUAGE_PREFIX}* tensor in the checkpoint at {model_dir}")
    out: dict[str, torch.Tensor] = {}
    for file, names in sorted(wanted.items()):
        with safe_open(str(model_dir / file), framework="pt") as f:
            for name in names:
                tensor = f.get_tensor(name)
                tensor = to_internal(name, tensor, hidden, moe_intermediate, expert_layout)
                local = _local_name(name)
                assert local is not None  # filtered above
                out[local] = tensor.to(device=device, dtype=dtype).contiguous()
    return out


def to_internal(
    name: str, tensor: torch.Tensor, hidden: int, inter: int, layout: str = "auto"
) -> torch.Tensor:
    """Return a fused expert tensor in transformers' internal layout; other tensors unchanged."""
    if name.endswith("experts.gate_up_proj"):
        published, internal = (hidden, 2 * inter), (2 * inter, hidden)
    elif name.endswith("experts.down_proj"):
        published, internal = (inter, hidden), (hidden, inter)
    else:
        return tensor
    shape = tuple(tensor.shape[1:])
    if layout == "auto":
        if published == internal:
            raise ValueError(
                f"{name}: shape {tuple(tensor.shape)} fits both expert layouts (H == 2I or I == H);"
                " pass expert_layout='published' or 'internal'"
            )
        layout = "published" if shape == published else "internal" if shape == internal else ""
    expected = published if layout == "published" else internal
    if tensor.ndim != 3 or shape != expected:
        raise ValueError(
            f"{name}: shape {tuple(tensor.shape)} matches neither [E, {published[0]}, "
            f"{published[1]}] (published) nor [E, {internal[0]}, {internal[1]}] (internal)"
        )
    return tensor.transpose(1, 2) if layout == "published" else tensor
