"""Helpers shared by the benchmark scripts: fresh-subprocess measurements, own-process peak memory, tables.

Every measured case runs in its own subprocess (`python -m benchmarks.X --case JSON`) so that its peak
resident memory is its own: VmHWM from /proc/self/status, not ru_maxrss, which Linux carries over from a
forking parent. Cases of two variants alternate (A B A B ...) and ratios are medians of pairs measured
side by side: these machines are small and shared, and a neighbour's test run shifts absolute times.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def vm_kib(field: str = "VmHWM") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def process_seconds() -> float:
    """Wall seconds since this process started: interpreter start-up and every import included."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks after boot
    return float(Path("/proc/uptime").read_text().split()[0]) - started


def run_case(module: str, case: dict, env: dict | None = None, timeout: float = 1800) -> dict:
    """Run `python -m module --case JSON` in a fresh interpreter; its last stdout line is a JSON result.
    `env` overrides the environment; a None value removes the variable."""
    e = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    e = {k: v for k, v in e.items() if v is not None}  # None in env: unset the variable
    p = subprocess.run(
        [sys.executable, "-m", module, "--case", json.dumps(case)],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if p.returncode != 0:
        raise RuntimeError(f"{module} {case} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def emit(result: dict) -> None:
    print(json.dumps(result), flush=True)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs) -> str:
    """min-max as a share of the median: how noisy the repeats were."""
    if len(xs) < 2:
        return "-"
    m = median(xs)
    return f"±{100 * (max(xs) - min(xs)) / 2 / m:.0f}%" if m else "-"


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def machine() -> str:
    import platform

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    import torch

    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} torch threads"


@contextmanager
def local_ray_head(num_cpus: int, env: dict | None = None, timeout: float = 180) -> Iterator[str]:
    """A Ray head of `num_cpus` CPUs on 127.0.0.1 (`ray start --head --block` in a session of its own; no
    dashboard), yielding its GCS address "127.0.0.1:PORT". Its workers import this checkout. Stopped by
    signalling that session's process group only: SIGTERM (ray start stops what it started), then SIGKILL
    for what outlived it (a GCS server may). The caller's process must have RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    set before it imports ray, so that the driver too takes 127.0.0.1 for the node's address."""
    import signal
    import socket
    import tempfile
    import time

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port = free_port()
    temp = tempfile.mkdtemp(prefix="rlme-ray-")  # short: Ray's socket paths live under it
    e = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray on the loopback: one machine, no cluster across hosts
        "RAY_USAGE_STATS_ENABLED": "0",
        **(env or {}),
    }
    cmd = [
        *(sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats"),
        *("--port", str(port), "--num-cpus", str(num_cpus), "--include-dashboard", "false"),
        *("--ray-client-server-port", str(free_port()), "--temp-dir", temp),
    ]
    log_path = Path(temp) / "head.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the Ray head did not listen within {timeout} s") from None
                time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(5)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
