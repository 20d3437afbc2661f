"""The runner's checkpoint writer: update i's checkpoint written in a background thread while iteration i+1's
rollouts are sampled from the weights in memory (`checkpoint.background_write`, docs/storage.md).

    writer.submit(i, taken, then)   the update step hands its taken checkpoint over and returns
    writer.join()                   the commit step (or eval, or the next update): (files, metrics, info)

The write reads the live weights and optimizer state (checkpoint.take copies nothing), so nothing may change
them before it is joined: the runner joins it before the next update at the latest. On CUDA the
device-to-host copies go through the pinned double buffers of checkpoint.host_bytes on a side stream that
first waits for the update's last kernel, so they neither read a half-finished step nor queue behind the
next iteration's generation on the default stream; hashing and fsync run in the writer's file threads
(Checkpoint.write), all of which release the GIL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from rlme_pipeline.models.checkpoint import Checkpoint
from rlme_pipeline.storage.store import FileEntry

# What the update's record gets once the files are known: (files, metrics, info) from the written files.
Then = Callable[[list[FileEntry]], tuple[list[FileEntry], dict, dict]]


@dataclass
class Deferred:
    """An update whose checkpoint is being written; `then` makes its record's parts from the files."""

    iteration: int
    future: Future
    taken: Checkpoint
    then: Then
    failed: bool = False
    started: float = field(default_factory=time.perf_counter)


class CheckpointWriter:
    """One write at a time, in one background thread, owned by the runner of one `train` call."""

    def __init__(self):
        self.pending: Deferred | None = None
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, iteration: int, taken: Checkpoint, then: Then) -> Deferred:
        if self.pending is not None:
            raise RuntimeError(f"update {iteration} was handed over while update {self.pending.iteration} is unjoined")
        ready = _after_current_kernels(taken)
        self._pool = self._pool or ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlme-checkpoint")
        self.pending = Deferred(iteration, self._pool.submit(_write, taken, ready), taken, then)
        return self.pending

    def join(self) -> tuple[list[FileEntry], dict, dict] | None:
        """Wait for the pending write: (files, metrics, info) for its update's record, None if none is pending.
        A write that failed raises here; joined again (a retried commit task) it is written once more, in
        this thread, into a new directory: nothing has trained since, so the weights are still the update's."""
        p = self.pending
        if p is None:
            return None
        t0 = time.perf_counter()
        try:
            files = p.taken.write() if p.failed else p.future.result()
        except BaseException:
            p.failed = True
            raise
        files, metrics, info = p.then(files)
        self.pending = None  # only now: a `then` that failed is run again by the next join
        waited = time.perf_counter() - t0
        timing = {"checkpoint_write_seconds": time.perf_counter() - p.started, "checkpoint_wait_seconds": waited}
        return files, {**metrics, **timing}, info

    def close(self) -> None:
        """Let a pending write finish (its files stay unreferenced: nothing records them) and stop the thread:
        a process leaving `train` with an error never has a write running behind it."""
        if self.pending is not None:
            self.pending.future.exception()  # waits; whatever it raised is the unrecorded attempt's
            self.pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _after_current_kernels(taken: Checkpoint) -> torch.cuda.Event | None:
    """An event on the update's stream, recorded now (after its last kernel), when a tensor is on a GPU."""
    device = next((t.device for ts in taken.big.values() for t in ts.values() if t.device.type == "cuda"), None)
    if device is None:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _write(taken: Checkpoint, ready: torch.cuda.Event | None) -> list[FileEntry]:
    if ready is None:
        return taken.write(background=True)
    side = torch.cuda.Stream(device=next(t.device for ts in taken.big.values() for t in ts.values() if t.is_cuda))
    side.wait_event(ready)  # a device-side wait: the host thread goes on queueing the copies
    return taken.write(stream=side, background=True)
