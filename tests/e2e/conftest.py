"""Fixtures for end-to-end tests: real server processes on loopback, and request helpers."""

from __future__ import annotations

import base64
import io

import pytest

from epd.cluster import LocalCluster


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="session")
def cluster(tiny_model_dir, tmp_path_factory):
    """Two encode servers and one language server (mooncake over TCP), small blocks, and a
    staging arena of four 16-row chunks: concurrent jobs wait for room in it, and the long
    image (70 rows) is larger than all of it (fresh memory). Image paths are read from
    ``cluster.media_dir`` only."""
    logs = tmp_path_factory.mktemp("cluster-logs")
    with LocalCluster(
        tiny_model_dir, n_encoders=2, transport="mooncake", log_dir=logs,
        language_args=["--num-blocks", "64", "--block-tokens", "16"],
        encoder_args=["--staging-tokens", "64"], media_dir=tmp_path_factory.mktemp("media"),
    ) as c:  # fmt: skip
        yield c
