"""The encoder side of the control plane: one ZeroMQ link per encode server, and the jobs sent
over them.

- ``links.py``: ``EncoderLink`` / ``EncoderPool``: heartbeats, liveness, incarnations, load.
- ``dispatch.py``: ``Dispatcher``: each image's job to the least loaded live encoder, moved to
  another (with fresh blocks) when its encoder dies or restarts.

Imports ``pool`` (the receiver lends the blocks a job carries); never ``http`` or ``engines``.
"""
