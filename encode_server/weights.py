"""Read one half of a Hugging Face safetensors checkpoint: only the tensors under a name prefix.

Works with a single ``model.safetensors`` or a sharded checkpoint with
``model.safetensors.index.json``. Files that hold no wanted tensor are never opened, and unwanted
tensors in the other files are never read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def weight_files(model_dir: Path) -> dict[str, str]:
    """Map every tensor name in the checkpoint to the file (name inside model_dir) that holds it."""
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


def load_prefixed(
    model_dir: str | Path, prefix: str, device: str | torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Tensors named ``prefix + rest``, keyed by ``rest``, cast to ``dtype`` on ``device``.

    Raises ValueError when no tensor has the prefix.
    """
    model_dir = Path(model_dir)
    wanted: dict[str, list[str]] = {}
    for name, file in weight_files(model_dir).items():
        if name.startswith(prefix):
            wanted.setdefault(file, []).append(name)
    if not wanted:
        raise ValueError(f"no tensor named {prefix}* in the checkpoint at {model_dir}")
    out = {}
    for file, names in sorted(wanted.items()):
        with safe_open(str(model_dir / file), framework="pt") as f:
            for name in names:
                out[name[len(prefix) :]] = f.get_tensor(name).to(device=device, dtype=dtype)
    return out
