"""Start a vLLM OpenAI server as a managed subprocess, time its start, then kill it mid-request.

Usage (client side needs only the stdlib; httpx is tried too if importable):
    python dev/vllm_probe_kill.py --python /tmp/vllm-venv/bin/python --model-dir /tmp/tinyllm \
        [--signal KILL|TERM] [--extra-args "--enforce-eager"]

Reports: seconds until /health answers 200, and the exception type each client sees when the
server dies while a long /v1/completions request is in flight, and on the next request.
"""

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

try:
    import httpx
except ImportError:  # optional second client
    httpx = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe(e: BaseException) -> str:
    return f"{type(e).__module__}.{type(e).__qualname__}: {e}"


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLLM_TARGET_DEVICE="cpu",
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB; default would be 4
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", default="/tmp/vllm-venv/bin/python")
    ap.add_argument("--model-dir", default="/tmp/tinyllm")
    ap.add_argument("--signal", default="KILL", choices=["KILL", "TERM"])
    ap.add_argument("--extra-args", default="")
    ap.add_argument("--log", default="/tmp/vllm_probe_kill.log")
    a = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        a.python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        a.model_dir,
        "--dtype",
        "float32",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *shlex.split(a.extra_args),
    ]
    log = open(a.log, "w")
    t0 = time.time()
    # own session/process group: the API server forks EngineCore + Worker processes
    proc = subprocess.Popen(cmd, env=server_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                sys.exit(f"server exited rc={proc.returncode}; see {a.log}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.time() - t0 > 300:
                sys.exit("server did not start in 300 s")
            time.sleep(0.5)
        print(f"startup: /health 200 after {time.time() - t0:.1f}s (args: {a.extra_args!r})")

        body = json.dumps(
            {"prompt": [0, 5, 6, 7], "n": 16, "max_tokens": 1000, "ignore_eos": True, "temperature": 1.0, "seed": 0}
        ).encode()
        results: dict[str, str] = {}
        t_sig = time.time() + 3.0  # approximate signal time, corrected below

        def via_urllib() -> None:
            req = urllib.request.Request(
                url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=90) as r:
                    r.read()
                results["urllib"] = "completed (not killed in time)"
            except urllib.error.HTTPError as e:
                results["urllib"] = f"after {time.time() - t_sig:.1f}s HTTPError {e.code} {e.read()[:200]!r}"
            except Exception as e:  # noqa: BLE001 - we want the type
                results["urllib"] = f"after {time.time() - t_sig:.1f}s {describe(e)}"

        def via_httpx() -> None:
            if httpx is None:
                results["httpx"] = "not installed"
                return
            try:
                r = httpx.post(
                    url + "/v1/completions", content=body, headers={"Content-Type": "application/json"}, timeout=90
                )
                results["httpx"] = f"after {time.time() - t_sig:.1f}s HTTP {r.status_code} {r.text[:200]}"
            except Exception as e:  # noqa: BLE001
                results["httpx"] = f"after {time.time() - t_sig:.1f}s {describe(e)}"

        threads = [threading.Thread(target=f) for f in (via_urllib, via_httpx)]
        for t in threads:
            t.start()
        time.sleep(3.0)
        sig = getattr(signal, "SIG" + a.signal)
        print(f"sending SIG{a.signal} to the API server pid {proc.pid} only")
        t_sig = time.time()
        proc.send_signal(sig)
        proc.wait(120)
        dt = time.time() - t_sig
        print(f"API server exited {dt:.1f}s after the signal, rc={proc.returncode}")
        for t in threads:
            t.join(120)
        for k, v in results.items():
            print(f"in-flight request, {k}: {v}")
        time.sleep(1)
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            print("next request: server still answers")
        except Exception as e:  # noqa: BLE001
            print(f"next request, urllib: {describe(e)}")
        for wait_s in (5, 30):
            time.sleep(wait_s)
            left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
            print(f"processes left in the server's group +{wait_s}s after reaping it:", left.stdout.split() or "none")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


if __name__ == "__main__":
    main()
