"""The runner's background checkpoint writer (jobs/background.py): one write at a time, joined before
anything reads it, and a write that failed is written again (into a new directory) by the next join, which
is what a retried commit task does."""

from __future__ import annotations

import threading

import pytest
import torch

from rlme_pipeline.jobs.background import CheckpointWriter
from rlme_pipeline.models import checkpoint
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.store import StorageError, Store


def taken(run: Run) -> checkpoint.Checkpoint:
    return checkpoint.Checkpoint(run, 0, {checkpoint.WEIGHTS: {"w": torch.arange(6.0)}}, {checkpoint.STATE: b"{}"})


def test_a_failed_background_write_is_written_again_by_the_next_join(tmp_path, monkeypatch):
    run = Run(Store(str(tmp_path / "runs")), "w")
    threads, real = [], Store.write_stream

    def flaky(self, rel, fill, name=None):
        threads.append(threading.current_thread().name)
        if len(threads) == 1:
            raise StorageError("connection dropped")
        return real(self, rel, fill, name=name)

    monkeypatch.setattr(Store, "write_stream", flaky)
    writer = CheckpointWriter()
    writer.submit(0, taken(run), lambda files: (files, {"n": len(files)}, {"why": "test"}))
    with pytest.raises(RuntimeError, match="while update 0 is unjoined"):
        writer.submit(1, taken(run), lambda files: (files, {}, {}))
    with pytest.raises(StorageError, match="connection dropped"):
        writer.join()
    assert writer.pending is not None  # kept: the commit task's retry joins again
    files, metrics, info = writer.join()
    assert writer.pending is None and writer.join() is None
    assert {f.logical for f in files} == {
        "iter-000000/checkpoint/model.safetensors",
        "iter-000000/checkpoint/trainer_state.json",
    }
    assert run.check_files(files) == [] and metrics["n"] == 2 and info == {"why": "test"}
    assert metrics["checkpoint_write_seconds"] >= metrics["checkpoint_wait_seconds"] >= 0
    assert any(t.startswith("rlme-checkpoint") for t in threads[:2])  # the first attempt ran in the background
    writer.close()


def test_close_waits_for_a_write_and_records_nothing(tmp_path):
    run = Run(Store(str(tmp_path / "runs")), "w")
    writer = CheckpointWriter()
    deferred = writer.submit(0, taken(run), lambda files: pytest.fail("closing must not record the write"))
    writer.close()
    assert deferred.future.done() and writer.pending is None
    assert run.store.exists(deferred.future.result()[0].path)  # written, and unreferenced: gc's to collect
