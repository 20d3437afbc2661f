"""The `openai` backend: an OpenAI-compatible /v1/completions server (vLLM's api_server), spoken to over
HTTP with token-id prompts, so no text round-trip can change what the policy saw.

Requests are async (httpx) under a semaphore of `max_concurrency`, each with a timeout; transport
errors, timeouts, 429 and 5xx are retried with exponential backoff, and before each retry a managed server
that died is restarted (within its restart budget). Other 4xx are not retried.

Sampling: one request per (prompt, seed) with n = 1 and vLLM's per-request `seed`, so a sample depends
only on its own seed, never on what else is in flight: a resumed stage reproduces an uninterrupted one
(given the same server build). Log-probs are the server's `logprobs: 0` values; start the server with
`--logprobs-mode processed_logprobs` (the managed server is) so they are log_softmax(logits / T).

Scoring: one request per rollout carrying its K prompts (prefix + question k); the K prompts share the
prefix, which vLLM's prefix cache computes once. The exact answer log-probs come from
`logprob_token_ids` (never from a top-k that may not contain them). A judgement whose request still fails
is recorded with status `backend_error` and no numbers.
"""

from __future__ import annotations

import asyncio
import math
import threading

import httpx

from rlme_pipeline.backends import (
    STATUS_BACKEND_ERROR,
    STATUS_NONFINITE,
    STATUS_OK,
    BackendError,
    Judgement,
    Sample,
    fitting_rows,
    logsumexp,
)
from rlme_pipeline.backends.server import ManagedServer

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class RequestFailed(Exception):
    pass


def _run(coro):
    """Run a coroutine to completion from sync code, also when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}

    def target():
        try:
            box["v"] = asyncio.run(coro)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["e"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["v"]


class Replica:
    """One server requests can go to: an external URL or a managed server (whose process can die)."""

    def __init__(self, url: str | None = None, server: ManagedServer | None = None):
        self._url, self.server = url, server
        self.inflight = 0  # requests sent and not yet answered: the load used to pick a replica
        self.suspect = False  # its last request failed: others go first until it answers again

    @property
    def url(self) -> str:
        return (self.server.url if self.server else self._url).rstrip("/")

    def dead(self) -> bool:
        return self.server is not None and not self.server.alive()


class Client:
    """Sends requests to one server or spreads them over replicas (several managed servers or external
    URLs serving the same model). Each request goes to the least-loaded replica (ties in turn); a request
    that fails is retried on another replica, so a replica dying mid-stage loses nothing and answers
    nothing twice (each body has exactly one result). A dead managed replica is left out; only when every
    replica is dead is one restarted, within its restart budget. Requests carry their seeds, so which
    replica answers does not change the answer."""

    def __init__(
        self,
        url: str | list[str] | None = None,
        server: ManagedServer | list[ManagedServer] | None = None,
        *,
        max_concurrency: int = 16,
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        model: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if (url is None) == (server is None):
            raise ValueError("give exactly one of url (external server) or server (managed)")
        if url is not None:
            self.replicas = [Replica(url=u) for u in ([url] if isinstance(url, str) else url)]
        else:
            self.replicas = [Replica(server=s) for s in ([server] if isinstance(server, ManagedServer) else server)]
        if not self.replicas:
            raise ValueError("no replica to send requests to")
        self.max_concurrency, self.timeout_s, self.retries, self.backoff_s = (
            max_concurrency,
            timeout_s,
            retries,
            backoff_s,
        )
        self.model, self.transport = model, transport  # transport: tests answer requests without a server
        self.stats = {"requests": 0, "retries": 0, "failed": 0, "restarts": 0, "failovers": 0}
        self._turn = 0

    def post_many(self, bodies: list[dict]) -> list[dict | RequestFailed]:
        """POST every body to /v1/completions; each result is the JSON reply or a RequestFailed."""
        return _run(self._post_many(bodies))

    async def _post_many(self, bodies):
        # every replica may hold max_concurrency requests: the servers batch what they hold
        sem = asyncio.Semaphore(self.max_concurrency * len(self.replicas))
        restart_lock = asyncio.Lock()
        n = self.max_concurrency * len(self.replicas)
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits, transport=self.transport) as http:

            async def one(body):
                async with sem:
                    return await self._post(http, body, restart_lock)

            return await asyncio.gather(*(one(b) for b in bodies))

    async def _pick(self, tried: set[int], restart_lock: asyncio.Lock) -> Replica:
        """The replica for the next attempt: alive, not yet tried by this request, not suspect, least
        loaded, ties in turn. With every managed replica dead, restart one (raises when none may)."""
        live = [i for i, r in enumerate(self.replicas) if not r.dead()]
        if not live:
            async with restart_lock:  # one restart for all the requests that saw the servers go
                live = [i for i, r in enumerate(self.replicas) if not r.dead()]
                if not live:
                    servers = [r.server for r in self.replicas]
                    budget = [s for s in servers if s.restarts < s.max_restarts] or servers[:1]
                    await asyncio.to_thread(budget[0].ensure_alive)  # the last one raises its "restarts spent"
                    self.stats["restarts"] += 1
                    live = [i for i, r in enumerate(self.replicas) if not r.dead()]
        n = len(self.replicas)
        i = min(
            live, key=lambda i: (i in tried, self.replicas[i].suspect, self.replicas[i].inflight, (i - self._turn) % n)
        )
        self._turn = (i + 1) % n
        return self.replicas[i]

    async def _post(self, http: httpx.AsyncClient, body: dict, restart_lock: asyncio.Lock):
        if self.model:
            body = {**body, "model": self.model}
        last = "no attempt"
        tried: set[int] = set()
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            rep = await self._pick(tried, restart_lock)  # raises BackendError when no server may restart
            if tried and self.replicas.index(rep) not in tried:
                self.stats["failovers"] += 1
            tried.add(self.replicas.index(rep))
            self.stats["requests"] += 1
            rep.inflight += 1
            try:
                r = await http.post(rep.url + "/v1/completions", json=body)
            except httpx.TransportError as e:  # connect/read errors, timeouts, a server gone mid-response
                last = f"{rep.url}: {type(e).__name__}: {e}"
                rep.suspect = True
                continue
            finally:
                rep.inflight -= 1
            if r.status_code == 200:
                rep.suspect = False
                return r.json()
            last = f"{rep.url}: HTTP {r.status_code}: {r.text[:500]}"
            if r.status_code not in RETRYABLE_STATUS:
                break
            rep.suspect = True
        self.stats["failed"] += 1
        return RequestFailed(last)


class OpenAIGenerator:
    def __init__(self, client: Client):
        self.client = client

    def sample(self, prompts, seeds, *, max_new_tokens, temperature, top_p) -> list[Sample]:
        bodies = [
            {
                "prompt": list(p),
                "n": 1,
                "seed": int(s),
                "temperature": temperature,
                "top_p": top_p,
                "max_tokens": max_new_tokens,
                "logprobs": 0,
                "return_token_ids": True,
                "return_tokens_as_token_ids": True,
                "skip_special_tokens": False,
            }
            for p, s in zip(prompts, seeds)
        ]
        out = []
        for reply in self.client.post_many(bodies):
            if isinstance(reply, RequestFailed):
                raise BackendError(f"generation request failed after {self.client.retries} retries: {reply}")
            c = reply["choices"][0]
            lps = [float(x) for x in c["logprobs"]["token_logprobs"]]
            ids = [int(t) for t in c["token_ids"]]
            if len(ids) != len(lps):
                raise BackendError(f"server returned {len(ids)} tokens but {len(lps)} log-probs")
            out.append(Sample(ids, lps, "stop" if c["finish_reason"] == "stop" else "length"))
        return out


class OpenAIJudge:
    def __init__(self, client: Client, max_positions: int):
        self.client, self.max_positions = client, max_positions

    def judge(self, prefixes, questions, yes_ids, no_ids) -> list[list[Judgement]]:
        K = len(questions)
        wanted = sorted(set(yes_ids) | set(no_ids))
        results, rows = fitting_rows(prefixes, questions, self.max_positions)
        bodies = [
            {
                "prompt": [list(prefixes[b]) + list(q) for q in questions],
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": len(wanted),
                "logprob_token_ids": wanted,
                "return_tokens_as_token_ids": True,
            }
            for b in rows
        ]
        for b, reply in zip(rows, self.client.post_many(bodies)):
            if isinstance(reply, RequestFailed):
                results[b] = [Judgement(None, None, STATUS_BACKEND_ERROR)] * K
                continue
            for c in reply["choices"]:
                top = c["logprobs"]["top_logprobs"][0]
                y = logsumexp([float(top[f"token_id:{t}"]) for t in yes_ids])
                n = logsumexp([float(top[f"token_id:{t}"]) for t in no_ids])
                ok = math.isfinite(y) and math.isfinite(n)
                results[b][c["index"]] = Judgement(y, n, STATUS_OK) if ok else Judgement(None, None, STATUS_NONFINITE)
        return results
