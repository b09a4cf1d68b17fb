"""Prompt preparation: chat messages -> input ids with image pads expanded, each image's grid (read
from its header, never decoding pixels) and M-RoPE positions ``[3, seq]``.

- ``builder.py``: ``PromptBuilder``, ``PromptLimits``, ``PromptError``.

Imports none of the other subpackages.
"""
