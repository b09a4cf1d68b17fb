"""``Qwen3MoeForCausalLMWithDeepStack`` for SGLang: Qwen3-VL-MoE's language half, no vision tower.

Built on SGLang's own Qwen3-MoE layers (``Qwen3MoeModel``: embedding, ``Qwen3MoeDecoderLayer``
with SGLang's attention backends, fused MoE and M-RoPE, final norm) and SGLang's multimodal input
path (``general_mm_embed_routine``): the visual rows and DeepStack features come precomputed
(``{"format": "processor_output", "precomputed_embeddings": [n, 4H]}``), SGLang scatters the first
H columns into the input embeddings and the other 3H into a zero ``[N, 3H]`` buffer, and
``Qwen3MoeModelWithDeepStack`` adds slice ``k`` to the hidden states after decoder layer ``k``
(absolute index, ``k < 3``); the buffer is zero at text positions, so only visual positions change.

Compared with SGLang's ``Qwen3VLMoeForConditionalGeneration`` (which builds and loads the ViT even
with ``--language-only``), this class never constructs a vision module and skips every
``model.visual.*`` tensor of the checkpoint by name. Weights load from the published Qwen3-VL-MoE
layout: ``model.language_model.*`` -> ``model.*``, ``lm_head.weight``; fused experts
``experts.gate_up_proj [E, H, 2I]`` / ``experts.down_proj [E, I, H]`` (transformers' internal
``[E, 2I, H]`` / ``[E, H, I]`` is told apart by shape) are split per expert, and per-expert
tensors (``experts.{e}.gate_proj.weight``...) load as well.

Registered through ``SGLANG_EXTERNAL_MODEL_PACKAGE=language_server.engines.sglang.models``; the engine
passes ``architectures = ["Qwen3MoeForCausalLMWithDeepStack", "Qwen3VLMoeForConditionalGeneration"]``
in ``json_model_override_args``: the first name selects this class, the second keeps SGLang's
Qwen3-VL multimodal processor (chosen by architecture name) for the precomputed inputs.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Iterable

import torch
from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder
from sglang.srt.eplb.expert_location import ModelConfigForExpertLocation
from sglang.srt.layers.layer_boundary.residual import batch as residual_batch
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
from sglang.srt.layers.quantization.base_config import QuantizationConfig
from sglang.srt.layers.utils import PPMissingLayer, get_layer_id
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead
from sglang.srt.managers.mm_utils import general_mm_embed_routine, pad_mm_tokens
from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem, MultimodalInputs
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, PPProxyTensors
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.models.qwen3_moe import Qwen3MoeModel
from sglang.srt.runtime_context import get_parallel
from sglang.srt.utils import add_prefix
from sglang.srt.utils.hf_transformers.common import get_rope_config
from torch import nn

from language_server.engines.sglang.models import pool_host
from language_server.engines.weights import LANGUAGE_PREFIX, LM_HEAD, to_internal

log = logging.getLogger(__name__)

VISUAL_PREFIXES = ("model.visual.", "visual.")
STACKED = [  # (our parameter, checkpoint name, shard id)
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),  # dense MLP layers, if any
    (".gate_up_proj.", ".up_proj.", 1),
]


class Qwen3MoeModelWithDeepStack(Qwen3MoeModel):
    """SGLang's ``Qwen3MoeModel`` plus the DeepStack additions after the first decoder layers.

    ``input_deepstack_embeds [N, k*H]`` (zero rows at text positions, ``None`` in decode) has its
    slice ``[:, j*H:(j+1)*H]`` added to the output of the decoder layer whose ABSOLUTE index is
    ``j``, so the placement stays right when pipeline stages hold only some layers.
    """

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        input_embeds: torch.Tensor | None = None,
        pp_proxy_tensors: PPProxyTensors | None = None,
        input_deepstack_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | PPProxyTensors:
        if self.pp_group.is_first_rank:
            hidden = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
            residual_batch.start(forward_batch)
        else:
            assert pp_proxy_tensors is not None
            hidden = self.layers[self.start_layer].attn_boundary.from_pp(
                pp_proxy_tensors, forward_batch
            )
        recorder = get_global_expert_distribution_recorder()
        for i in range(self.start_layer, self.end_layer):
            with recorder.with_current_layer(i):
                hidden = self.layers[i](positions, hidden, forward_batch)
            add = self._deepstack_slice(i, input_deepstack_embeds)
            if add is not None:
                # The layer's output before its residual add: (out + ds) + res == (out + res) + ds.
                hidden = residual_batch.add_to_output(hidden, forward_batch, add)
        if not self.pp_group.is_last_rank:
            return residual_batch.to_pp(hidden, forward_batch)
        return residual_batch.final_norm(hidden, forward_batch, self.norm, skip_empty=True)

    def _deepstack_slice(self, layer: int, deepstack: torch.Tensor | None) -> torch.Tensor | None:
        hidden = self.config.hidden_size
        if deepstack is None or (layer + 1) * hidden > deepstack.shape[-1]:
            return None
        return deepstack[:, layer * hidden : (layer + 1) * hidden]


class Qwen3MoeForCausalLMWithDeepStack(nn.Module):
    """The language half of Qwen3-VL-MoE for SGLang: ``Qwen3MoeModelWithDeepStack`` + LM head.

    Built from the checkpoint's top-level ``Qwen3VLMoeConfig`` (its ``text_config`` sizes the
    model; ``vision_config.deepstack_visual_indexes`` only gives the number of DeepStack slices).
    Holds no vision parameter; image features must arrive precomputed.
    """

    fall_back_to_pt_during_load = False
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(
        self, config, quant_config: QuantizationConfig | None = None, prefix: str = ""
    ) -> None:
        super().__init__()
        _set_torch_threads(getattr(config, "epd_torch_threads", 0))
        text = getattr(config, "text_config", config)
        if getattr(config, "tie_word_embeddings", None) is not None:
            text.tie_word_embeddings = config.tie_word_embeddings  # the top level is authoritative
        self.config = text
        self.quant_config = quant_config
        self.pp_group = get_parallel().pp_group
        vision = getattr(config, "vision_config", None)
        self.deepstack_visual_indexes = list(getattr(vision, "deepstack_visual_indexes", []) or [])
        self.num_deepstack_embeddings = len(self.deepstack_visual_indexes)
        self.use_deepstack = (
            {Modality.IMAGE: True, Modality.VIDEO: True} if self.num_deepstack_embeddings else {}
        )
        _, rope = get_rope_config(text)
        self.is_mrope_enabled = bool(rope) and "mrope_section" in rope
        self.model = Qwen3MoeModelWithDeepStack(
            text, quant_config, prefix=add_prefix("model", prefix)
        )
        self._check_pipeline_split()
        if not self.pp_group.is_last_rank:
            self.lm_head = PPMissingLayer()
        elif self.pp_group.world_size == 1 and text.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(
                text.vocab_size, text.hidden_size, quant_config=quant_config,
                use_attn_tp_group=get_parallel().enable_dp_lm_head,
                prefix=add_prefix("lm_head", prefix),
            )  # fmt: skip
        self.logits_processor = LogitsProcessor(text)
        self.pool: pool_host.PoolHost | None = None
        spec = getattr(config, "epd_pool", None)
        parallel = get_parallel()
        if spec and self.pp_group.is_first_rank and parallel.tp_group.rank_in_group == 0:
            # The receive pool where the model runs; not a parameter or buffer of the model.
            self.pool = pool_host.start_host(spec, text.hidden_size, torch.get_default_device())
        self.tp_group = parallel.tp_group

    def _check_pipeline_split(self) -> None:
        n = self.num_deepstack_embeddings
        if self.model.start_layer < n and not self.pp_group.is_first_rank:
            raise ValueError(f"the DeepStack layers 0..{n - 1} must be on the first pipeline stage")
        if self.pp_group.is_first_rank and self.model.end_layer < n:
            raise ValueError(f"the first pipeline stage must hold decoder layers 0..{n - 1}")

    @property
    def start_layer(self) -> int:
        return self.model.start_layer

    @property
    def end_layer(self) -> int:
        return self.model.end_layer

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_embed_and_head(self):
        return self.model.embed_tokens.weight, self.lm_head.weight

    # --- multimodal hooks SGLang calls ------------------------------------------------------

    def pad_input_ids(self, input_ids: array, mm_inputs: MultimodalInputs) -> array:
        return pad_mm_tokens(input_ids, mm_inputs)

    def separate_deepstack_embeds(self, embedding: torch.Tensor):
        """Split precomputed ``[n, (1+k)H]`` rows into ``[n, H]`` and ``[n, kH]`` (views)."""
        hidden = self.config.hidden_size
        if embedding.shape[-1] != hidden * (1 + self.num_deepstack_embeddings):
            raise ValueError(
                f"precomputed embeddings must be [n, {1 + self.num_deepstack_embeddings}*{hidden}]"
                f" (embeds | deepstack), got {tuple(embedding.shape)}"
            )
        return embedding[:, :hidden], embedding[:, hidden:]

    def get_image_feature(self, items: list[MultimodalDataItem]) -> torch.Tensor:
        raise RuntimeError(
            "Qwen3MoeForCausalLMWithDeepStack has no vision tower: send precomputed embeddings "
            '({"format": "processor_output", "precomputed_embeddings": [n, 4H]}), not pixels'
        )

    get_video_feature = get_image_feature

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        get_embedding: bool = False,
        pp_proxy_tensors: PPProxyTensors | None = None,
    ):
        if get_embedding:
            raise NotImplementedError("Qwen3MoeForCausalLMWithDeepStack is a generation model")
        if self.is_mrope_enabled:
            positions = forward_batch.mrope_positions
        if self.pool is not None and forward_batch.forward_mode.is_decode():
            self.pool.count_decode(forward_batch.batch_size)
        from_pool = self._inputs_from_pool(input_ids, forward_batch)
        if from_pool is not None:
            embeds, deepstack = from_pool
            hidden = self.model(
                input_ids=None, positions=positions, forward_batch=forward_batch,
                input_embeds=embeds, pp_proxy_tensors=pp_proxy_tensors,
                input_deepstack_embeds=deepstack,
            )  # fmt: skip
            if not self.pp_group.is_last_rank:
                return hidden
            return self.logits_processor(input_ids, hidden, self.lm_head, forward_batch)
        hidden = general_mm_embed_routine(
            input_ids=input_ids, forward_batch=forward_batch, language_model=self.model,
            multimodal_model=self, positions=positions, use_deepstack=self.use_deepstack,
            pp_proxy_tensors=pp_proxy_tensors,
        )  # fmt: skip
        if not self.pp_group.is_last_rank:
            return hidden
        return self.logits_processor(input_ids, hidden, self.lm_head, forward_batch)

    # --- visual rows straight from the receive pool ----------------------------------------

    def _inputs_from_pool(
        self, input_ids: torch.Tensor, forward_batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(input_embeds [N, H], deepstack [N, kH])`` for a prefill batch in which some image
        arrived as a pool descriptor (``epd_pool``), else None (SGLang's own routine runs).

        Each visual row is copied once, from the pool's views into the batch's inputs (the same
        chunk arithmetic as SGLang's ``get_embedding_chunk``: a chunked prefill copies each row
        in the chunk that holds its position). With TP > 1 only rank 0 holds the pool: it copies,
        then broadcasts each run of visual positions over the TP group into the other ranks'
        inputs, so each byte crossed the network once. Items with precomputed tensors (not
        from a pool) in the same batch are scattered the same way.
        """
        mode = forward_batch.forward_mode
        mm = forward_batch.mm_inputs
        if (mode.is_decode() or mode.is_target_verify() or not mm
                or not self.pp_group.is_first_rank
                or not any(_descriptor(x) is not None for m in mm if m is not None
                           for x in m.mm_items)):  # fmt: skip
            return None
        vocab = self.config.vocab_size
        embeds = self.model.embed_tokens(input_ids.clamp(0, vocab - 1))
        width = self.num_deepstack_embeddings * self.config.hidden_size
        deepstack = embeds.new_zeros(embeds.shape[0], width) if width else None
        start = 0
        lens = zip(
            mm, forward_batch.extend_prefix_lens_cpu, forward_batch.extend_seq_lens_cpu, strict=True
        )
        for mm_input, prefix, length in lens:
            for item in mm_input.mm_items if mm_input is not None else ():
                for dest, row, n in _chunk_runs(item.offsets or [], prefix, length, start):
                    self._place(item, embeds, deepstack, dest, row, n)
            start += length
        forward_batch.mm_inputs = None  # as SGLang's routine: consumed
        if forward_batch.input_embeds is not None:  # preallocated (CUDA graphs)
            forward_batch.input_embeds.copy_(embeds)
            embeds = forward_batch.input_embeds
        return embeds, deepstack

    def _place(self, item: MultimodalDataItem, embeds: torch.Tensor,
               deepstack: torch.Tensor | None, dest: int, row: int, n: int) -> None:  # fmt: skip
        """Rows ``row..+n`` of ``item`` into positions ``dest..+n`` of the batch."""
        desc = _descriptor(item)
        if desc is None:  # a precomputed [n, 4H] tensor (the tensor path)
            rows = item.precomputed_embeddings
            if rows is None:
                raise RuntimeError("an image item has neither a pool descriptor nor rows")
            e, d = self.separate_deepstack_embeds(rows.reshape(-1, rows.shape[-1]))
            embeds[dest : dest + n].copy_(e[row : row + n])
            if deepstack is not None:
                deepstack[dest : dest + n].copy_(d[row : row + n])
            return
        # on every rank, before any collective: a bad descriptor fails everywhere, no rank waits
        segments = _pool_segments(desc["runs"], dest, row, n)
        if self.pool is not None:
            for d, pool_row, m in segments:
                self.pool.copy_rows(embeds, deepstack, d, pool_row, m)
        if self.tp_group.world_size > 1:  # rank 0 holds the pool; the others receive
            self.tp_group.broadcast(embeds[dest : dest + n], src=0)
            if deepstack is not None:
                self.tp_group.broadcast(deepstack[dest : dest + n], src=0)
        elif self.pool is None:
            raise RuntimeError("an image arrived as a pool descriptor but no pool is here")

    # --- weights ----------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load language tensors from a Qwen3-VL-MoE checkpoint; skip every visual tensor."""
        params = dict(self.named_parameters())
        # Tied embeddings with a separate LM head (pipeline or TP > 1): the head loads the
        # checkpoint's embedding tensor too (named_parameters lists a shared tensor once).
        tied_head = self.config.tie_word_embeddings and "lm_head.weight" in params
        loaded: set[str] = set()
        for name, tensor in weights:
            local = _local_name(name)
            if local is None or "rotary_emb.inv_freq" in local:
                continue  # model.visual.* (and anything else that is not the language model)
            layer = get_layer_id(local)
            if layer is not None and not self.start_layer <= layer < self.end_layer:
                continue
            if local == "lm_head.weight" and local not in params:
                continue  # tied: lm_head is embed_tokens
            loaded |= self._load_one(params, local, tensor)
            if tied_head and local == "model.embed_tokens.weight":
                loaded |= self._load_one(params, "lm_head.weight", tensor)
        return loaded

    def _load_one(self, params: dict, name: str, tensor: torch.Tensor) -> set[str]:
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return self._load_fused_experts(params, name, tensor)
        if ".mlp.experts." in name:
            return self._load_expert(params, name, tensor)
        for param_name, ckpt_name, shard in STACKED:
            if ckpt_name in name:
                target = name.replace(ckpt_name, param_name)
                if target in params:
                    params[target].weight_loader(params[target], tensor, shard)
                    return {target}
                return set()
        if name not in params:
            quiet = name.endswith((".bias", "_bias")) or self.pp_group.world_size > 1
            (log.debug if quiet else log.warning)("tensor %s has no parameter here: skipped", name)
            return set()
        param = params[name]
        getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        return {name}

    def _load_fused_experts(self, params: dict, name: str, tensor: torch.Tensor) -> set[str]:
        """``gate_up_proj [E, H, 2I]`` / ``down_proj [E, I, H]`` (or internal) -> per expert."""
        cfg = self.config
        # SGLang pads moe_intermediate_size on CPU (adjust_config_with_unaligned_cpu_tp); the
        # checkpoint has the original size, and the expert weight loader pads on copy.
        inter = getattr(cfg, "original_moe_intermediate_size", cfg.moe_intermediate_size)
        internal = to_internal(name, tensor, cfg.hidden_size, inter)
        if name.endswith("gate_up_proj"):  # internal [E, 2I, H]: gate rows, then up rows
            target = name.replace("experts.gate_up_proj", "experts.w13_weight")
            gate, up = internal.chunk(2, dim=1)
            shards = [("w1", gate), ("w3", up)]
        else:  # internal [E, H, I]
            target = name.replace("experts.down_proj", "experts.w2_weight")
            shards = [("w2", internal)]
        param = params[target]
        for shard, weights in shards:
            for expert in range(weights.shape[0]):
                param.weight_loader(param, weights[expert], target, shard, expert)
        return {target}

    def _load_expert(self, params: dict, name: str, tensor: torch.Tensor) -> set[str]:
        for param_name, ckpt_name, expert, shard in _expert_mapping(self.config.num_experts):
            if ckpt_name in name:
                target = name.replace(ckpt_name, param_name)
                if target in params:  # else: an expert of another rank
                    params[target].weight_loader(
                        params[target], tensor, target, shard_id=shard, expert_id=expert
                    )
                    return {target}
                return set()
        log.warning("expert tensor %s not understood: skipped", name)
        return set()

    @classmethod
    def get_model_config_for_expert_location(cls, config) -> ModelConfigForExpertLocation:
        text = getattr(config, "text_config", config)  # called with the top-level config
        return ModelConfigForExpertLocation(
            num_layers=text.num_hidden_layers, num_logical_experts=text.num_experts, num_groups=None
        )


def _local_name(name: str) -> str | None:
    """Checkpoint name -> this model's name; None for vision (and any non-language) tensors."""
    if name.startswith(VISUAL_PREFIXES):
        return None
    if name.startswith(LANGUAGE_PREFIX):
        return "model." + name[len(LANGUAGE_PREFIX) :]
    if name == LM_HEAD or name.startswith("model."):  # also a plain Qwen3-MoE text checkpoint
        return name
    return None


def _descriptor(item: MultimodalDataItem) -> dict | None:
    """The ``epd_pool`` descriptor of an image item (from ``SGLangEngine.job_for_image``)."""
    return item.model_specific_data.get("epd_pool")


def _chunk_runs(offsets: list, prefix: int, length: int, start: int) -> list[tuple[int, int, int]]:
    """``(batch_position, item_row, rows)`` for the item's rows inside this request's chunk.

    ``offsets`` are the item's ``[first, last]`` token positions (inclusive) per image, in
    order; the request's chunk covers positions ``prefix..prefix+length-1`` and starts at
    ``start`` in the batch.
    """
    out, row, end = [], 0, prefix + length - 1
    for first, last in offsets:
        lo, hi = max(first, prefix), min(last, end)
        if lo <= hi:
            out.append((start + lo - prefix, row + lo - first, hi - lo + 1))
        row += last - first + 1
    return out


def _pool_segments(runs: list, dest: int, row: int, n: int) -> list[tuple[int, int, int]]:
    """Item rows ``row..+n`` mapped through the descriptor's ``runs`` (``[pool_row, rows]``
    in item order) to ``(batch_position, pool_row, rows)`` segments."""
    out, base = [], 0
    for pool_row, rows in runs:
        lo, hi = max(row, base), min(row + n, base + rows)
        if lo < hi:
            out.append((dest + lo - row, pool_row + lo - base, hi - lo))
        base += rows
    if sum(m for _, _, m in out) != n:
        raise RuntimeError(f"the pool descriptor holds {base} rows; rows {row}..{row + n} asked")
    return out


_EXPERT_MAPPINGS: dict[int, list] = {}


def _expert_mapping(num_experts: int) -> list:
    if num_experts not in _EXPERT_MAPPINGS:
        _EXPERT_MAPPINGS[num_experts] = FusedMoE.make_expert_params_mapping(
            ckpt_gate_proj_name="gate_proj", ckpt_down_proj_name="down_proj",
            ckpt_up_proj_name="up_proj", num_experts=num_experts,
        )  # fmt: skip
    return _EXPERT_MAPPINGS[num_experts]


EntryClass = Qwen3MoeForCausalLMWithDeepStack


def _set_torch_threads(threads: int) -> None:
    """The language server's ``--torch-threads`` in this process (SGLang's scheduler, where the
    model runs): SGLang's children start with torch's default, one intra-op thread per core,
    whatever the front door set for itself. On a host shared with encoders those threads
    oversubscribe the cores (their OpenMP workers spin between ops) and every decode step and
    ViT step slows down (issue 20)."""
    if threads and threads > 0 and torch.get_num_threads() != threads:
        log.info("torch intra-op threads in SGLang's scheduler: %d (was %d)", threads,
                 torch.get_num_threads())  # fmt: skip
        torch.set_num_threads(int(threads))
