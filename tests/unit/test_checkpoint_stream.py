"""Streamed checkpoint files: hashed on their way out, whole-or-nothing, loadable by the libraries."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors.torch import load_file

from rlme_pipeline.models.checkpoint import write_safetensors
from rlme_pipeline.storage.store import Store

DATA = bytes(range(256)) * 4096 * 3  # 3 MiB per chunk


def _fill(chunks: int, fail: bool = False):
    def fill(f):
        for _ in range(chunks):
            f.write(DATA)
        if fail:
            raise RuntimeError("killed mid-file")

    return fill


def _stores(tmp_path, s3):
    local = Store(str(tmp_path / "runs"))
    remote = Store(s3.url(), {"skip_instance_cache": True})
    remote.part_size = 5 * 2**20  # the S3 minimum: 12 MiB goes up as a multipart upload
    return local, remote


def test_write_stream_hashes_what_it_writes_and_leaves_nothing_when_it_fails(tmp_path, s3):
    for store in _stores(tmp_path, s3):
        entry = store.write_stream(
            "iter-000000/ck.x/optimizer.pt", _fill(4), name="iter-000000/checkpoint/optimizer.pt"
        )
        assert entry.bytes == 4 * len(DATA) and entry.sha256 == hashlib.sha256(DATA * 4).hexdigest()
        assert store.sha256(entry.path) == entry.sha256 and entry.logical == "iter-000000/checkpoint/optimizer.pt"

        with pytest.raises(RuntimeError, match="killed mid-file"):
            store.write_stream("iter-000000/ck.y/optimizer.pt", _fill(4, fail=True))
        assert not store.exists("iter-000000/ck.y/optimizer.pt")
        if store.local_path(""):
            assert os.listdir(store.local_path("iter-000000/ck.y")) == []  # no temp file left either
        else:
            bucket, _, prefix = store.abs("iter-000000/ck.y").partition("/")
            uploads = s3.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads", [])
            assert uploads == []  # the multipart upload was aborted, not left for gc


def test_streamed_safetensors_load_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(7, 3, generator=g),
        "a.bias": torch.randn(5, generator=g).bfloat16(),
        "c.steps": torch.arange(4),
        "d.scalar": torch.tensor(2.5),
        "e.empty": torch.zeros(0, 3),
    }
    with open(tmp_path / "model.safetensors", "wb") as f:
        write_safetensors(f, tensors)
    back = load_file(tmp_path / "model.safetensors")
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
