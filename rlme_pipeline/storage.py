"""Run storage on any fsspec URL (local path, file://, s3://), with the write rules the commit protocol needs.

Every write is whole-or-nothing: local files go to a temporary name and are renamed; an S3 PUT is
atomic by itself. Writers return a `FileEntry` (sha256, bytes, rows) computed from the exact bytes
written, so manifests never re-read what they describe.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from pathlib import Path

import fsspec
import polars as pl
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel

from rlme_pipeline.schemas import SCHEMA_VERSION, TABLES, conform


class FileEntry(BaseModel):
    path: str  # relative to the run directory
    sha256: str
    bytes: int
    rows: int | None = None
    schema_version: int | None = None


class StorageError(RuntimeError):
    pass


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


class Store:
    """A directory in some filesystem; all paths given to it are relative ('iter-000001/scores.parquet')."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def child(self, rel: str) -> Store:
        sub = Store.__new__(Store)
        sub.url, sub.fs, sub.root, sub.is_local = f"{self.url}/{rel}", self.fs, f"{self.root}/{rel}", self.is_local
        return sub

    def abs(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    # --- reads -----------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.abs(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.abs(rel))

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def read_parquet(self, rel: str) -> pl.DataFrame:
        # polars reads fsspec file objects safely (pyarrow can abort at exit after threaded reads).
        with self.fs.open(self.abs(rel), "rb") as f:
            return pl.read_parquet(f)

    def ls(self, rel: str = "") -> list[str]:
        """Names directly under rel; empty when it does not exist."""
        try:
            self.fs.invalidate_cache(self.abs(rel))
            entries = self.fs.ls(self.abs(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(self.abs(rel), "rb") as f:
            while b := f.read(1 << 22):
                h.update(b)
        return h.hexdigest()

    # --- writes ----------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes, rows: int | None = None, schema_version: int | None = None) -> FileEntry:
        path = self.abs(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)
            self.fs.invalidate_cache(os.path.dirname(path))
        return FileEntry(path=rel, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), rows=rows, schema_version=schema_version)

    def write_json(self, rel: str, obj) -> FileEntry:
        return self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def write_table(self, rel: str, df: pl.DataFrame, table: str) -> FileEntry:
        """Conform to the table's schema, serialise once in memory, write atomically."""
        assert table in TABLES
        df = conform(df, table)
        buf = io.BytesIO()
        df.write_parquet(buf, compression="zstd", statistics=True)
        return self.write_bytes(rel, buf.getvalue(), rows=df.height, schema_version=SCHEMA_VERSION)

    def put_file(self, local: str | Path, rel: str) -> FileEntry:
        """Upload one local file (s3fs does multipart for large ones) and describe it."""
        local = Path(local)
        digest, size = sha256_file(local), local.stat().st_size
        path = self.abs(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            self.fs.put_file(str(local), tmp)
            os.replace(tmp, path)
        else:
            self.fs.put_file(str(local), path)
        return FileEntry(path=rel, sha256=digest, bytes=size)

    def get_file(self, rel: str, local: str | Path) -> None:
        self.fs.get_file(self.abs(rel), str(local))

    def rm(self, rel: str, recursive: bool = False) -> None:
        if self.exists(rel):
            self.fs.rm(self.abs(rel), recursive=recursive)

    def check_writable(self) -> None:
        """Write and remove a probe file, so a bad root fails before any work is done."""
        probe = f".rlme-probe-{uuid.uuid4().hex[:8]}"
        try:
            if self.is_local:
                os.makedirs(self.root, exist_ok=True)
            self.write_bytes(probe, b"ok")
            self.rm(probe)
        except Exception as e:  # the concrete error differs by filesystem
            raise StorageError(
                f"run.storage {self.url!r} is not writable ({type(e).__name__}: {e}); "
                "point run.storage (or --storage) at a directory or bucket you can write"
            ) from None
