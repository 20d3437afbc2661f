"""Parquet on any Store, without holding a whole file in memory.

polars reads a Python file object whole, so for streaming we read through pyarrow's ParquetFile on the
fsspec handle, batch by batch and with threads off (threaded pyarrow reads through Python file objects
can abort at interpreter exit). For lazy queries (the audit) `scan` hands polars paths it can read
itself: local files, or s3:// with the Store's credentials translated to polars' object-store options.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from rlme_pipeline.storage.schemas import SCHEMA_VERSION, TABLES, conform
from rlme_pipeline.storage.store import FileEntry, Store


def iter_batches(store: Store, rel: str, columns: list[str], batch_rows: int = 4096) -> Iterator[pl.DataFrame]:
    with store.fs.open(store.abs(rel), "rb") as f:
        pf = pq.ParquetFile(f)
        for b in pf.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False):
            yield pl.from_arrow(b)


class _HashingWriter(io.RawIOBase):
    """Counts and hashes the bytes on their way out, so the manifest entry needs no second read."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        self.f.write(b)
        return len(b)


def write_stream(
    store: Store, rel: str, frames: Iterable[pl.DataFrame], table: str, name: str | None = None
) -> FileEntry:
    """Write frames one row group at a time: memory is one frame, whatever the file's size. The file
    appears whole or not at all (the Store's `open_write`)."""
    rows = 0
    with store.open_write(rel) as raw:
        out = _HashingWriter(raw)
        writer = None
        for df in frames:
            t = conform(df, table).to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(out, t.schema, compression="zstd")
            writer.write_table(t)
            rows += t.num_rows
        if writer is None:  # no frames: still a valid, empty file with the table's schema
            writer = pq.ParquetWriter(out, arrow_schema(table), compression="zstd")
        writer.close()
    return FileEntry(
        path=rel, sha256=out.h.hexdigest(), bytes=out.n, rows=rows, schema_version=SCHEMA_VERSION, name=name
    )


def arrow_schema(table: str) -> pa.Schema:
    return conform(pl.DataFrame(schema=TABLES[table]), table).to_arrow().schema


def write_frame(store: Store, rel: str, df: pl.DataFrame) -> FileEntry:
    """Any small frame (audit outputs), written whole and atomically."""
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd", statistics=True)
    return store.write_bytes(rel, buf.getvalue(), rows=df.height)


def polars_options(store: Store) -> dict | None:
    """s3fs settings as polars/object_store options; None lets polars use its environment defaults."""
    so = dict(getattr(store.fs, "storage_options", {}) or {})
    ck = so.get("client_kwargs") or {}
    opts = {
        "aws_access_key_id": so.get("key"),
        "aws_secret_access_key": so.get("secret"),
        "aws_session_token": so.get("token"),
        "aws_endpoint_url": so.get("endpoint_url") or ck.get("endpoint_url"),
        "aws_region": ck.get("region_name") or so.get("region_name"),
    }
    opts = {k: v for k, v in opts.items() if v}
    if str(opts.get("aws_endpoint_url", "")).startswith("http://"):
        opts["aws_allow_http"] = "true"
    return opts or None


def scan(store: Store, rels: list[str]) -> pl.LazyFrame:
    """A lazy frame over several files of one store (projection and filters reach the reader)."""
    if not rels:
        raise ValueError("nothing to scan")
    if store.local_path() is not None:
        return pl.scan_parquet([store.local_path(r) for r in rels])
    if store.protocol in ("s3", "s3a"):
        return pl.scan_parquet([f"s3://{store.abs(r)}" for r in rels], storage_options=polars_options(store))
    # Other filesystems (memory://, ...) polars cannot open itself: read each file through fsspec.
    return pl.concat([store.read_parquet(r).lazy() for r in rels], how="vertical_relaxed")
