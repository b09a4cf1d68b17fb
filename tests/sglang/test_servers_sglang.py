"""The end-to-end server tests of ``tests/e2e/test_servers.py``, with ``epd-language --engine sglang``.

The same test functions run against a cluster whose language server generates with SGLang's
engine (``Qwen3MoeForCausalLMWithDeepStack`` from ``language_server.sglang_models``) instead of
the transformers reference: two encode servers, Mooncake over TCP, 16-token blocks. The greedy
tokens must still equal transformers' monolithic model, through the HTTP API.
"""

from __future__ import annotations

import importlib.util

import pytest

from epd.cluster import LocalCluster
from tests.e2e.test_servers import (  # noqa: F401 - collected here, against the SGLang cluster
    test_bad_input_gets_400_with_a_reason,
    test_metrics_and_health,
    test_openai_client_library,
    test_served_greedy_tokens_equal_monolithic,
    test_sixteen_concurrent_requests_use_both_encoders_and_free_every_block,
    test_streaming_equals_non_streaming,
    test_three_images_are_spread_over_both_encoders_and_equal_monolithic,
    test_too_many_images_and_bad_params,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("sglang") is None,
        reason="SGLang is not installed: bash scripts/setup_sglang.sh",
    ),
]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    """Like tests/e2e's cluster, with ``--engine sglang`` (module scope: SGLang's processes stop
    when this module is done)."""
    logs = tmp_path_factory.mktemp("sglang-cluster-logs")
    with LocalCluster(
        tiny_model_dir, n_encoders=2, transport="mooncake", log_dir=logs, startup_timeout_s=240,
        language_args=["--engine", "sglang", "--num-blocks", "64", "--block-tokens", "16"],
    ) as c:  # fmt: skip
        yield c


def test_the_language_server_runs_sglang(cluster):
    log = (cluster.log_dir / "language.log").read_text(errors="replace")
    assert "starting SGLang's engine" in log
    assert "type=Qwen3MoeForCausalLMWithDeepStack" in log  # SGLang's "Load weight end" line


def test_a_dead_sglang_scheduler_stops_the_language_server(tiny_model_dir, tmp_path):
    """SGLang's watchdog SIGQUITs the server when its scheduler dies; the server exits with 70."""
    import psutil

    with LocalCluster(tiny_model_dir, n_encoders=0, transport="shm", log_dir=tmp_path,
                      startup_timeout_s=240, language_args=["--engine", "sglang"]) as c:  # fmt: skip
        language = c.procs["language"]
        children = psutil.Process(language.pid).children()
        schedulers = [p for p in children if "scheduler" in " ".join(p.cmdline() + [p.name()])]
        assert schedulers, [(p.pid, p.name(), p.cmdline()) for p in children]
        schedulers[0].kill()
        assert language.wait(timeout=60) == 70
        assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_cpu_defaults_keep_an_idle_scheduler_asleep(tiny_model_dir):
    from language_server.config import LanguageConfig
    from language_server.sglang_engine import engine_args

    args = engine_args(LanguageConfig(model=tiny_model_dir, engine="sglang"))
    assert args["sleep_on_idle"] is True and args["device"] == "cpu"
