"""Where a chunk's visual rows come from: SGLang's chunk arithmetic mapped onto pool runs."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sglang") is None,
    reason="SGLang is not installed: bash scripts/setup_sglang.sh",
)


def _rows_of(offsets, runs, chunk):
    """Every visual position of the request -> its pool row, assembled chunk by chunk."""
    from language_server.engines.sglang.models.qwen3_moe_deepstack import (
        _chunk_runs,
        _pool_segments,
    )

    placed, prefix, total = {}, 0, max(last for _, last in offsets) + 3
    while prefix < total:
        length = min(chunk, total - prefix)
        batch_start = 100  # the request's first token sits at batch row 100
        for dest, row, n in _chunk_runs(offsets, prefix, length, batch_start):
            for d, pool_row, m in _pool_segments(runs, dest, row, n):
                for k in range(m):
                    position = prefix + d + k - batch_start
                    assert position not in placed  # each row copied once
                    placed[position] = pool_row + k
        prefix += length
    return placed


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 1000])
def test_each_visual_position_gets_its_pool_row_once_whatever_the_chunks(chunk):
    offsets = [(2, 9), (12, 14), (20, 31)]  # three images: 8 + 3 + 12 rows
    runs = [[64, 5], [8, 4], [40, 14]]  # 23 rows scattered over three pool runs
    pool_rows = [r + k for r, n in runs for k in range(n)]
    positions = [p for first, last in offsets for p in range(first, last + 1)]
    assert _rows_of(offsets, runs, chunk) == dict(zip(positions, pool_rows, strict=True))


def test_a_descriptor_with_too_few_rows_is_refused():
    from language_server.engines.sglang.models.qwen3_moe_deepstack import _pool_segments

    with pytest.raises(RuntimeError, match="holds 4 rows"):
        _pool_segments([[0, 4]], dest=0, row=2, n=3)


def test_the_multimodal_hash_is_keyed_on_the_images_in_order_and_random_without_keys():
    from language_server.engines.sglang import engine

    a, b = bytes(range(32)), bytes(range(1, 33))
    h = engine.multimodal_hash((a, b))
    assert h == engine.multimodal_hash((a, b)) and 0 <= h < 1 << 62  # SGLang's 62-bit range
    assert h != engine.multimodal_hash((b, a)) != engine.multimodal_hash((a,))
    # keyed: the plain digest's bits are not the hash (a client cannot compute another's)
    import hashlib

    assert h != int.from_bytes(hashlib.sha256(a + b).digest()[:8], "big") >> 2
    randoms = {engine.multimodal_hash(()) for _ in range(8)}  # cache off: never shared
    assert len(randoms) == 8
