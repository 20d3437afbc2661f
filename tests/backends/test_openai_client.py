"""The openai backend's failure handling, against a scripted transport (no server needed)."""

from __future__ import annotations

import httpx
import pytest

from rlme_pipeline.backends import BackendError
from rlme_pipeline.backends.openai import Client, OpenAIGenerator, OpenAIJudge


def _client(replies: list, **kw) -> tuple[Client, list]:
    """Each request takes the next scripted reply: an int status (error body), an exception, or a dict."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        r = replies.pop(0) if len(replies) > 1 else replies[0]
        if isinstance(r, Exception):
            raise r
        if isinstance(r, int):
            return httpx.Response(r, json={"error": {"message": "scripted", "code": r}})
        return httpx.Response(200, json=r)

    kw = {"retries": 2, "backoff_s": 0.0, **kw}
    return Client(url="http://test", transport=httpx.MockTransport(handler), **kw), seen


def _judge_reply(k: int, yes: int, no: int) -> dict:
    top = {f"token_id:{yes}": -0.5, f"token_id:{no}": -1.5}
    return {"choices": [{"index": i, "logprobs": {"top_logprobs": [top]}} for i in range(k)]}


def test_transient_errors_are_retried():
    client, seen = _client([503, httpx.ConnectError("refused"), _judge_reply(2, 5, 6)])
    res = OpenAIJudge(client, 1024).judge([[1, 2, 3]], [[7], [8]], [5], [6])
    assert [j.status for j in res[0]] == ["ok", "ok"] and res[0][1].logp_yes == pytest.approx(-0.5)
    assert len(seen) == 3 and client.stats["retries"] == 2


def test_a_judgement_that_still_fails_has_an_error_status_not_a_number():
    client, seen = _client([500])
    res = OpenAIJudge(client, 1024).judge([[1, 2, 3]], [[7]], [5], [6])
    assert res[0][0].status == "backend_error" and res[0][0].logp_yes is None and res[0][0].logp_no is None
    assert len(seen) == 3  # one try + 2 retries


def test_client_errors_are_not_retried_and_overflow_is_not_sent():
    client, seen = _client([400])
    res = OpenAIJudge(client, 4).judge([[1, 2], [1, 2, 3, 4]], [[7]], [5], [6])
    assert res[0][0].status == "backend_error" and res[1][0].status == "context_overflow"
    assert len(seen) == 1


def test_generation_that_still_fails_fails_the_stage():
    client, _ = _client([httpx.ReadTimeout("slow")])
    with pytest.raises(BackendError, match="ReadTimeout"):
        OpenAIGenerator(client).sample([[1, 2]], [3], max_new_tokens=2, temperature=1.0, top_p=1.0)


def test_generation_request_shape():
    reply = {"choices": [{"token_ids": [9, 2], "finish_reason": "stop", "logprobs": {"token_logprobs": [-1.0, -2.0]}}]}
    client, seen = _client([reply])
    s = OpenAIGenerator(client).sample([[1, 2]], [1234], max_new_tokens=5, temperature=0.7, top_p=0.9)
    assert s[0].token_ids == [9, 2] and s[0].logprobs == [-1.0, -2.0] and s[0].finish_reason == "stop"
    import json

    body = json.loads(seen[0].content)
    assert body["prompt"] == [1, 2] and body["n"] == 1 and body["seed"] == 1234 and body["logprobs"] == 0
    assert body["return_token_ids"] is True and body["max_tokens"] == 5


def test_works_from_inside_a_running_event_loop():
    """Prefect may call a sync stage from a thread that runs an event loop."""
    import asyncio

    async def main():
        client, _ = _client([_judge_reply(1, 5, 6)])
        return OpenAIJudge(client, 1024).judge([[1]], [[7]], [5], [6])

    assert asyncio.run(main())[0][0].status == "ok"
