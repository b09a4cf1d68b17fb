"""The language half of Qwen3-VL-MoE: a text-only MoE decoder, with and without DeepStack.

Built from transformers' Qwen3-VL-MoE text modules (decoder layers, RMSNorm, the M-RoPE rotary
embedding, ``create_causal_mask``, ``DynamicCache``); attention, MoE routing and M-RoPE are theirs.
Inputs are one unbatched sequence: ``input_ids [seq]``, ``positions [3, seq]`` (M-RoPE t/h/w).

``Qwen3MoeModel`` is the plain text model. ``Qwen3MoeModelWithDeepStack`` also takes
``input_deepstack_embeds [seq, k*H]`` (zero rows at text positions) and adds slice
``[:, j*H:(j+1)*H]`` to the hidden states after the decoder layer whose ABSOLUTE index is ``j``,
so the placement stays right when a stage holds only some layers. ``Qwen3MoeForCausalLMWithDeepStack``
adds the LM head and loads only the language tensors of a checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, DynamicCache, Qwen3VLMoeTextConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import (
    Qwen3VLMoeTextDecoderLayer,
    Qwen3VLMoeTextRMSNorm,
    Qwen3VLMoeTextRotaryEmbedding,
)

from language_server.engines.weights import load_language_state

log = logging.getLogger(__name__)


class Qwen3MoeModel(nn.Module):
    """Embedding, MoE decoder layers and final norm; returns hidden states [seq, H]."""

    def __init__(self, config: Qwen3VLMoeTextConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            Qwen3VLMoeTextDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = Qwen3VLMoeTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3VLMoeTextRotaryEmbedding(config)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        input_embeds: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """Hidden states [seq, H]; ``cache`` (if given) is extended in place."""
        hidden = self._embed(input_ids, input_embeds)
        return self._decode(hidden, positions, cache, deepstack=None, visual_mask=None)

    def _embed(self, input_ids: torch.Tensor | None, input_embeds: torch.Tensor | None):
        if (input_ids is None) == (input_embeds is None):
            raise ValueError("pass exactly one of input_ids [seq] and input_embeds [seq, H]")
        if input_embeds is None:
            assert input_ids is not None
            if input_ids.ndim != 1:
                raise ValueError(f"input_ids must be [seq], got {tuple(input_ids.shape)}")
            return self.embed_tokens(input_ids)
        if input_embeds.ndim != 2 or input_embeds.shape[1] != self.hidden_size:
            raise ValueError(f"input_embeds must be [seq, {self.hidden_size}]")
        return input_embeds.to(self.embed_tokens.weight.dtype)

    def _decode(self, hidden, positions, cache, deepstack, visual_mask) -> torch.Tensor:
        seq = hidden.shape[0]
        if positions.shape != (3, seq):
            raise ValueError(f"positions must be [3, {seq}], got {tuple(positions.shape)}")
        hidden = hidden[None]
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=None, cache=cache
        )
        rope = self.rotary_emb(hidden, positions[:, None, :].to(hidden.device))
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, cache=cache, position_embeddings=rope)
            layer_idx = int(layer.self_attn.layer_idx)  # type: ignore[union-attr,arg-type]
            hidden = self._after_layer(layer_idx, hidden, deepstack, visual_mask)
        return self.norm(hidden)[0]

    def _after_layer(self, layer_idx: int, hidden, deepstack, visual_mask) -> torch.Tensor:
        return hidden


class Qwen3MoeModelWithDeepStack(Qwen3MoeModel):
    """``Qwen3MoeModel`` plus the DeepStack additions after the first decoder layers."""

    def forward(  # type: ignore[override]  # DESIGN.md fixes this signature
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        input_embeds: torch.Tensor | None = None,
        input_deepstack_embeds: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        visual_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [seq, H].

        ``input_deepstack_embeds [seq, k*H]`` (k <= number of layers, 3 for Qwen3-VL) has zero rows
        at text positions. ``visual_mask [seq]`` (optional) restricts the additions to its rows,
        as transformers does; without it every row is added (zero rows change nothing).
        """
        hidden = self._embed(input_ids, input_embeds)
        deepstack = self._check_deepstack(input_deepstack_embeds, hidden.shape[0])
        if visual_mask is not None and (
            visual_mask.shape != (hidden.shape[0],) or visual_mask.dtype != torch.bool
        ):
            raise ValueError(f"visual_mask must be [{hidden.shape[0]}] bool")
        if visual_mask is not None:
            visual_mask = visual_mask.to(hidden.device)
        return self._decode(hidden, positions, cache, deepstack, visual_mask)

    def _check_deepstack(self, deepstack: torch.Tensor | None, seq: int) -> torch.Tensor | None:
        if deepstack is None:
            return None
        width = deepstack.shape[-1]
        if deepstack.ndim != 2 or deepstack.shape[0] != seq or width % self.hidden_size:
            raise ValueError(
                f"input_deepstack_embeds must be [{seq}, k*{self.hidden_size}], "
                f"got {tuple(deepstack.shape)}"
            )
        if width // self.hidden_size > self.config.num_hidden_layers:
            raise ValueError("more deepstack slices than decoder layers")
        return deepstack.to(self.embed_tokens.weight.dtype)

    def _after_layer(self, layer_idx: int, hidden, deepstack, visual_mask) -> torch.Tensor:
        if deepstack is None or (layer_idx + 1) * self.hidden_size > deepstack.shape[-1]:
            return hidden
        add = deepstack[:, layer_idx * self.hidden_size : (layer_idx + 1) * self.hidden_size]
        if visual_mask is None:
            return hidden + add[None]
        hidden = hidden.clone()
        hidden[0, visual_mask] = hidden[0, visual_mask] + add[visual_mask]
        return hidden


class Qwen3MoeForCausalLMWithDeepStack(nn.Module):
    """``Qwen3MoeModelWithDeepStack`` plus the LM head; holds no vision parameter."""

    def __init__(self, config: Qwen3VLMoeTextConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3MoeModelWithDeepStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        expert_layout: str = "auto",
        attn_implementation: str = "sdpa",
        experts_implementation: str = "grouped_mm",
    ) -> Qwen3MoeForCausalLMWithDeepStack:
        """Load ``model.language_model.*`` and ``lm_head.weight`` only (sharded or not).

        ``expert_layout``: "auto" tells published [E, H, 2I] from internal [E, 2I, H] by shape.
        """
        full = AutoConfig.from_pretrained(model_dir)
        config = getattr(full, "text_config", full)
        config._attn_implementation = attn_implementation
        config._experts_implementation = experts_implementation
        state = load_language_state(
            model_dir,
            config.hidden_size,
            config.moe_intermediate_size,
            device,
            dtype,
            expert_layout,
        )
        if "lm_head.weight" not in state and _tied(full, config):
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, strict=True, assign=True)
        with torch.device(device):
            model.model.rotary_emb = Qwen3VLMoeTextRotaryEmbedding(config)
        _check_materialised(model)
        log.info(
            "language model from %s: %d parameters, %s on %s",
            model_dir,
            sum(p.numel() for p in model.parameters()),
            dtype,
            device,
        )
        return model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self) -> DynamicCache:
        """An empty KV cache for one sequence."""
        return DynamicCache(config=self.config)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [seq, H] from the model's own table."""
        return self.model.embed_tokens(input_ids.to(self.device))

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        input_embeds: torch.Tensor | None = None,
        input_deepstack_embeds: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        visual_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [seq, vocab] (or [1, vocab] with ``last_only``); extends ``cache`` in place."""
        hidden = self.model(
            input_ids, positions, input_embeds, input_deepstack_embeds, cache, visual_mask
        )
        return self.lm_head(hidden[-1:] if last_only else hidden)


def _tied(full, text_config) -> bool:
    return bool(getattr(full, "tie_word_embeddings", False)) or bool(
        getattr(text_config, "tie_word_embeddings", False)
    )


def _check_materialised(model: nn.Module) -> None:
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"language tensors missing from the checkpoint: {leftover[:5]}")
