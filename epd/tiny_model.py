"""Write a tiny, randomly initialised Qwen3-VL-MoE checkpoint directory (``epd-make-tiny-model``).

The directory has the layout of the published Qwen3-VL-MoE checkpoints: ``config.json``,
safetensors weights named ``model.visual.*``, ``model.language_model.*`` and ``lm_head.weight``
with fused experts stored as ``gate_up_proj [E, H, 2I]`` and ``down_proj [E, I, H]`` (transformers'
``save_pretrained`` writes the transposed internal layout, so we convert), a byte-level tokenizer
whose chat template knows the vision tokens, and the processor config. transformers'
``AutoProcessor.from_pretrained(DIR)`` and ``Qwen3VLMoeForConditionalGeneration.from_pretrained``
load it offline. The same seed always gives the same bytes.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

from epd.checkpoint import published_state_dict, write_safetensors
from epd.tiny_tokenizer import build_processor

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TinySpec:
    """Dimensions of the tiny model; the defaults are the tiny configuration of NOTES.md."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    moe_intermediate: int = 48
    experts: int = 4
    top_k: int = 2
    vocab: int = 1000
    vision_depth: int = 4
    vision_hidden: int = 32
    vision_heads: int = 2
    seed: int = 0
    dtype: str = "float32"
    shards: int = 1
    init_std: float = 0.02

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid tiny model spec: {msg}")

        for f in fields(self):
            if f.type == "int" and f.name != "seed":
                need(getattr(self, f.name) >= 1, f"{f.name} must be >= 1")
        need(self.dtype in DTYPES, f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        need(self.heads % self.kv_heads == 0, "heads must be a multiple of kv_heads")
        need(self.head_dim % 2 == 0 and self.head_dim >= 8, "head_dim must be even and >= 8")
        need(self.top_k <= self.experts, "top_k must be <= experts")
        need(
            2 * self.moe_intermediate != self.hidden, "2 * moe_intermediate must differ from hidden"
        )
        need(self.moe_intermediate != self.hidden, "moe_intermediate must differ from hidden")
        need(self.vocab >= 512, "vocab must be >= 512 (256 byte tokens plus specials)")
        need(self.vision_depth >= 4, "vision_depth must be >= 4 (three deepstack layers)")
        need(self.vision_hidden % self.vision_heads == 0, "vision_hidden % vision_heads != 0")
        need((self.vision_hidden // self.vision_heads) % 4 == 0, "vision head dim must be % 4")
        need(self.init_std > 0, "init_std must be > 0")


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim / 2 rotary frequencies into (t, h, w) sections, like [24, 20, 20] at 128."""
    half = head_dim // 2
    hw = round(half * 3 / 8)
    return [half - 2 * hw, hw, hw]


def deepstack_indexes(depth: int) -> list[int]:
    """Three ViT block indexes spread over the depth: [1, 2, 3] for depth 4."""
    return [round(depth * k / 4) for k in (1, 2, 3)]


def build_config(spec: TinySpec, token_ids: dict[str, int]) -> Qwen3VLMoeConfig:
    """The Qwen3VLMoeConfig for ``spec``; ``token_ids`` are the tokenizer's special token ids."""
    text = {
        "vocab_size": spec.vocab,
        "hidden_size": spec.hidden,
        "intermediate_size": 2 * spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "moe_intermediate_size": spec.moe_intermediate,
        "num_experts": spec.experts,
        "num_experts_per_tok": spec.top_k,
        "max_position_embeddings": 8192,
        "initializer_range": spec.init_std,
        "tie_word_embeddings": False,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": mrope_section(spec.head_dim),
            "mrope_interleaved": True,
        },
    }
    vision = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": 2 * spec.vision_hidden,
        "num_heads": spec.vision_heads,
        "out_hidden_size": spec.hidden,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 256,
        "deepstack_visual_indexes": deepstack_indexes(spec.vision_depth),
        "initializer_range": spec.init_std,
    }
    config = Qwen3VLMoeConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen3VLMoeForConditionalGeneration"]
    config.dtype = spec.dtype
    return config


def make_tiny_model(out_dir: str | Path, **overrides) -> Path:
    """Write a complete tiny checkpoint into ``out_dir`` (created if needed) and return its path.

    ``overrides`` are TinySpec fields (hidden, layers, experts, vocab, vision_depth, seed, dtype,
    shards, ...). Deterministic: the same overrides always write the same weights.
    """
    spec = replace(TinySpec(), **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_processor(spec.vocab)
    token_ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in _SPECIALS}
    config = build_config(spec, token_ids)
    with torch.random.fork_rng():  # leave the caller's RNG state alone
        torch.manual_seed(spec.seed)
        model = Qwen3VLMoeForConditionalGeneration(config).eval()
    tensors = published_state_dict(model, DTYPES[spec.dtype])
    for stale in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
        stale.unlink()
    written = write_safetensors(tensors, out, spec.shards)
    config.save_pretrained(out)
    processor.save_pretrained(out)
    n_params = sum(t.numel() for t in tensors.values())
    log.info(
        "wrote tiny Qwen3-VL-MoE to %s: %d tensors, %d parameters, spec %s",
        out,
        len(tensors),
        n_params,
        asdict(spec),
    )
    for path in sorted(out.iterdir()):
        log.info(
            "  %s (%d bytes)%s",
            path.name,
            path.stat().st_size,
            " [weights]" if path in written else "",
        )
    return out


_SPECIALS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")

_HELP = {
    "hidden": "text hidden size H (also the ViT output width)",
    "layers": "number of decoder layers",
    "heads": "attention heads",
    "kv_heads": "key/value heads (GQA)",
    "head_dim": "attention head dimension (even)",
    "moe_intermediate": "expert intermediate size I (keep 2I != H and I != H)",
    "experts": "number of experts E",
    "top_k": "experts per token",
    "vocab": "vocabulary size (>= 512)",
    "vision_depth": "number of ViT blocks (>= 4)",
    "vision_hidden": "ViT hidden size",
    "vision_heads": "ViT attention heads",
    "seed": "random seed for the weights",
    "dtype": "dtype of the stored weights",
    "shards": "number of safetensors files (> 1 also writes model.safetensors.index.json)",
    "init_std": "standard deviation of the random weights",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="epd-make-tiny-model",
        description="Write a tiny random Qwen3-VL-MoE checkpoint directory (published layout).",
    )
    parser.add_argument("out_dir", help="directory to write (created if missing)")
    for f in fields(TinySpec):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str}[f.type]
        choices = sorted(DTYPES) if f.name == "dtype" else None
        parser.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=f.default,
            choices=choices,
            help=f"{_HELP[f.name]} (default: %(default)s)",
        )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``epd-make-tiny-model DIR [--hidden 64 ...]``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = vars(parse_args(argv))
    out_dir = args.pop("out_dir")
    try:
        make_tiny_model(out_dir, **args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
