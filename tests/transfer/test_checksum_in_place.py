"""The pool's in-place checksum equals ``rows_checksum`` of the gathered rows, for scattered
blocks, partial last blocks and every dtype, and notices a changed sampled row."""

from __future__ import annotations

import pytest
import torch

from transfer import MultimodalDataBuffers, rows_checksum


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_tokens", [1, 4, 13, 64, 257])
def test_in_place_checksum_equals_the_gathered_one(dtype, n_tokens):
    pool = MultimodalDataBuffers(160, 4, 8, dtype)
    pool.embeds.copy_(torch.randn(pool.embeds.shape))
    pool.deepstack.copy_(torch.randn(pool.deepstack.shape))
    blocks = list(range(159, 159 - 2 * pool.blocks_for(n_tokens), -2))  # scattered, descending
    embeds, deepstack = pool.gather(blocks, n_tokens)
    expected = rows_checksum(embeds, deepstack, pool.block_tokens)
    assert pool.checksum(blocks, n_tokens) == expected
    pool.embeds[blocks[-1] * 4 + (n_tokens - 1) % 4] += 1  # the last row is always sampled
    assert pool.checksum(blocks, n_tokens) != expected
    with pytest.raises(ValueError):
        pool.checksum(blocks, len(blocks) * 4 + 1)
