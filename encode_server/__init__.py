"""encode_server: the encoder half of disaggregated Qwen3-VL-MoE.

Owns the processor (chat template, tokenizer, image preprocessing, M-RoPE positions) and the ViT;
never loads a decoder layer and never imports ``language_server``.

- ``images``: untrusted chat messages -> validated template messages and PIL images.
- ``preprocess``: messages -> ``PreprocessedPrompt`` (ids, positions, pixel patches); no weights.
- ``vision``: ``VisionEncoder`` (``preprocess`` / ``run_vision`` / ``encode`` / ``encode_batch``)
  producing ``EncodedPrompt`` with ``embeds [n_vis, H]`` and ``deepstack [n_vis, 3H]``.
- ``weights``: reads only ``model.visual.*`` from a (sharded) safetensors checkpoint.
"""
