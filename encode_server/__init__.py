"""encode_server: the encoder half of disaggregated Qwen3-VL-MoE.

Flow v3: gets one image's (or video's) encoded bytes per encode job (the language side prepares the prompt and
never sends its text here); owns the pixels and the ViT; never loads a decoder layer and never
imports ``language_server``.

- ``images``: ``decode_image`` (untrusted bytes -> RGB, EXIF-transposed, size-checked PIL image).
- ``videos``: ``decode_frames`` (untrusted container bytes -> the sampled frames, PyAV, bounded).
- ``vision``: ``VisionEncoder`` (``preprocess`` -> ``PreprocessedImage`` patches and grid;
  ``run_vision``: one ViT forward per batch -> per image ``embeds [n, H]`` and
  ``deepstack [n, 3H]``).
- ``weights``: reads only ``model.visual.*`` from a (sharded) safetensors checkpoint.
- ``front`` (socket and heartbeats), ``server`` (the worker loop), ``scheduler`` (preprocessing,
  ViT batching), ``transfers`` (writes and their reports), ``staging`` (the registered arena).
"""
