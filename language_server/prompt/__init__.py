"""Prompt preparation: chat messages -> input ids with image pads expanded, each image's grid (read
from its header, never decoding pixels) and M-RoPE positions ``[3, seq]``.

- ``builder.py``: ``PromptBuilder`` (and ``PreparedPrompt``, ``ImageSpec``).
- ``limits.py``: ``PromptLimits``, ``PromptError``.
- ``video.py``: a video's sampled frames, grid, timestamps and prompt text from its metadata,
  within the limits (``plan_source``).
- ``container.py``: a video container's metadata (PyAV, no frame decoded).

Imports none of the other subpackages.
"""
