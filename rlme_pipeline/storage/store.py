"""Run storage on any fsspec URL (local path, file://, s3://), with the write rules the commit protocol needs.

Every write is whole-or-nothing: local files go to a temporary name and are renamed (or hard-linked,
for exclusive creation); an S3 PUT is atomic by itself, and an interrupted multipart upload leaves no
object. Writers return a `FileEntry` (sha256, bytes, rows) computed from the exact bytes written, so
manifests never re-read what they describe.

Store operations retry transient faults (timeouts, 5xx, dropped connections) with backoff, on top of
botocore's own per-request retries; permanent faults (no bucket, access denied) raise `StorageError`
at once. Credentials never pass through here: s3fs/botocore read them from the environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...), so nothing we log or write can hold them.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

import fsspec
import polars as pl
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel

from rlme_pipeline.storage.schemas import SCHEMA_VERSION, TABLES, conform

log = logging.getLogger(__name__)
T = TypeVar("T")


class FileEntry(BaseModel):
    path: str  # where the bytes are, relative to the run directory (attempt-unique, e.g. rollouts.3f9a2c1b.parquet)
    sha256: str
    bytes: int
    rows: int | None = None
    schema_version: int | None = None
    name: str | None = None  # the logical name readers ask for (iter-000003/rollouts.parquet); None: same as path

    @property
    def logical(self) -> str:
        return self.name or self.path


class StorageError(RuntimeError):
    pass


# --- options ---------------------------------------------------------------------------------------

# Keys that would put a credential into run.json (storage options are part of the config snapshot).
SECRET_OPTION_KEYS = {
    "key",
    "secret",
    "token",
    "password",
    "session_token",
    "security_token",
    "account_key",
    "sas_token",
    "client_secret",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "credentials",
}

# botocore retries each request (connection errors, throttling, 5xx) in "standard" mode; the timeouts
# turn a hung connection into a retryable error instead of a stalled stage.
S3_DEFAULTS = {
    "use_listings_cache": False,  # another process (a lease taker, gc) may write between our calls
    "config_kwargs": {"retries": {"max_attempts": 8, "mode": "standard"}, "connect_timeout": 10, "read_timeout": 120},
}


def secret_option_keys(options: dict, prefix: str = "") -> list[str]:
    """Dotted names of option keys that look like credentials (nested dicts included)."""
    found = []
    for k, v in options.items():
        if str(k).lower() in SECRET_OPTION_KEYS:
            found.append(prefix + str(k))
        if isinstance(v, dict):
            found += secret_option_keys(v, f"{prefix}{k}.")
    return found


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def fs_options(url: str, storage_options: dict | None) -> dict:
    protocol = fsspec.utils.get_protocol(url)
    opts = storage_options or {}
    return _merge(S3_DEFAULTS, opts) if protocol in ("s3", "s3a") else dict(opts)


# --- retries ---------------------------------------------------------------------------------------


def _credential_errors() -> tuple[type[BaseException], ...]:
    """botocore's "this machine is not set up for S3" errors. They subclass BotoCoreError, which is
    transient (connection faults), but no retry finds credentials that are not there."""
    try:
        from botocore.exceptions import NoCredentialsError, NoRegionError, PartialCredentialsError, ProfileNotFound
    except ImportError:  # pragma: no cover - only local storage installed
        return ()
    return (NoCredentialsError, PartialCredentialsError, ProfileNotFound, NoRegionError)


CREDENTIALS = _credential_errors()

# Faults that retrying cannot fix. s3fs translates NoSuchBucket/NoSuchKey to FileNotFoundError and
# AccessDenied to PermissionError; everything else it raises as OSError (5xx, dropped connections).
PERMANENT = (
    FileNotFoundError,
    PermissionError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
    *CREDENTIALS,
)


def _transient_types() -> tuple[type[BaseException], ...]:
    """Connection-level faults; botocore's and aiohttp's own types when s3fs lets them through."""
    types: list[type[BaseException]] = [OSError, TimeoutError, ConnectionError]
    try:
        from botocore.exceptions import BotoCoreError

        types.append(BotoCoreError)
    except ImportError:  # pragma: no cover - only local storage installed
        pass
    try:
        from aiohttp import ClientError

        types.append(ClientError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


TRANSIENT = _transient_types()


def retrying(what: str, fn: Callable[[], T], attempts: int | None = None, base_delay: float = 0.5) -> T:
    """Call fn, retrying transient faults with exponential backoff and jitter."""
    attempts = attempts or int(os.environ.get("RLME_STORE_ATTEMPTS", 5))
    for k in range(attempts):
        try:
            return fn()
        except CREDENTIALS as e:  # one line, as a StorageError, from reads and writes alike
            raise permanent_error(what, e) from None
        except PERMANENT:
            raise
        except TRANSIENT as e:
            if k == attempts - 1:
                raise StorageError(f"{what} failed after {attempts} attempts: {type(e).__name__}: {e}") from e
            delay = min(base_delay * 2**k, 20) * (0.5 + random.random())
            log.warning("%s: transient %s (%s); retrying in %.1fs", what, type(e).__name__, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def permanent_error(what: str, e: Exception) -> StorageError:
    hint = {
        FileNotFoundError: "the bucket or directory does not exist",
        PermissionError: "access denied: check the credentials in the environment and the bucket policy",
    }.get(type(e), "")
    if isinstance(e, CREDENTIALS):
        hint = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment; not retried"
    return StorageError(f"{what} failed: {type(e).__name__}: {e}" + (f" ({hint})" if hint else ""))


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


class Store:
    """A directory in some filesystem; all paths given to it are relative ('iter-000001/scores.parquet')."""

    part_size = 64 * 2**20  # S3: files above twice this go up as a multipart upload of parts this size

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.options = dict(storage_options or {})  # as given: what another process opens this store with
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **fs_options(self.url, storage_options))
        self.root = self.root.rstrip("/")
        # the one place that asks "is it local?"; everything outside asks `local_path`
        self._local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:  # the URL only: options may name an endpoint, never print them wholesale
        return f"Store({self.url!r})"

    def child(self, rel: str) -> Store:
        """The directory rel of this store, on the same filesystem connection (same options, same retries)."""
        sub = copy.copy(self)
        sub.url, sub.root = f"{self.url}/{rel}", f"{self.root}/{rel}"
        return sub

    @property
    def protocol(self) -> str:
        p = self.fs.protocol
        return p[0] if isinstance(p, (tuple, list)) else p

    def local_path(self, rel: str = "") -> str | None:
        """rel as a path on this machine when the store is a local directory (to read or write in place,
        without a copy); None when it is remote."""
        return self.abs(rel) if self._local else None

    def abs(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def where(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    # --- reads -----------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return retrying(f"stat {self.where(rel)}", lambda: self.fs.exists(self.abs(rel)))

    def read_bytes(self, rel: str) -> bytes:
        return retrying(f"read {self.where(rel)}", lambda: self.fs.cat_file(self.abs(rel)))

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def read_parquet(self, rel: str) -> pl.DataFrame:
        # One GET into memory, then polars: a retry repeats the whole read, and pyarrow never touches
        # a Python file object (it can abort at exit after threaded reads through one).
        return pl.read_parquet(io.BytesIO(self.read_bytes(rel)))

    def ls(self, rel: str = "") -> list[str]:
        """Names directly under rel; empty when it does not exist."""

        def _ls():
            self.fs.invalidate_cache(self.abs(rel))
            try:
                return self.fs.ls(self.abs(rel), detail=False)
            except FileNotFoundError:
                return []

        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in retrying(f"list {self.where(rel)}", _ls))

    def find(self, rel: str = "") -> list[str]:
        """Every file below rel, as paths relative to this store."""

        def _find():
            self.fs.invalidate_cache(self.abs(rel))
            return self.fs.find(self.abs(rel))

        n = len(self.root) + 1
        return sorted(p[n:] for p in retrying(f"list {self.where(rel)}", _find))

    def size(self, rel: str) -> int:
        return retrying(f"stat {self.where(rel)}", lambda: self.fs.size(self.abs(rel)))

    def sha256(self, rel: str) -> str:
        def _hash():
            h = hashlib.sha256()
            with self.fs.open(self.abs(rel), "rb") as f:
                while b := f.read(1 << 22):
                    h.update(b)
            return h.hexdigest()

        return retrying(f"read {self.where(rel)}", _hash)

    # --- writes ----------------------------------------------------------------------------------
    def _write(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return retrying(what, fn)
        except FileExistsError:
            raise
        except PERMANENT as e:
            raise permanent_error(what, e) from None

    def _local_tmp(self, path: str, data: bytes | None = None) -> str:
        """A temp name beside path; with data, the bytes are written and fsynced there first."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        if data is not None:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        return tmp

    def write_bytes(
        self, rel: str, data: bytes, rows: int | None = None, schema_version: int | None = None, name: str | None = None
    ) -> FileEntry:
        path = self.abs(rel)

        def _put():
            if self._local:
                os.replace(self._local_tmp(path, data), path)
            else:
                self.fs.pipe_file(path, data)

        self._write(f"write {self.where(rel)}", _put)
        return FileEntry(
            path=rel,
            sha256=hashlib.sha256(data).hexdigest(),
            bytes=len(data),
            rows=rows,
            schema_version=schema_version,
            name=name,
        )

    @contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        """A binary file to stream into: its bytes appear at rel whole when the block ends, or not at all
        if it raises. Local: a temp name beside rel, fsynced and renamed. Object stores: the upload is
        completed on exit and aborted on error (s3fs discards the open multipart upload; parts of
        `part_size`). Not retried:
        the caller's bytes are streamed once."""
        path = self.abs(rel)
        if self._local:
            tmp = self._local_tmp(path)
            try:
                with open(tmp, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        parts = {"block_size": self.part_size} if self.protocol in ("s3", "s3a") else {}
        f = self.fs.open(path, "wb", **parts)
        try:
            yield f
        except BaseException:
            f.discard()  # nothing becomes visible; closing would complete a partial upload
            f.closed = True
            raise
        f.close()
        self.fs.invalidate_cache(os.path.dirname(path))

    def create_bytes(self, rel: str, data: bytes) -> bool:
        """Write rel only if it does not exist yet (False if it does): the commit point of a manifest or a
        lease. Local: complete temp file, then link(2), which fails atomically if the name exists.
        S3: PUT with If-None-Match: * (AWS, MinIO, moto); other fsspec stores: their mode='create'."""
        path = self.abs(rel)

        def _create():
            if self._local:
                tmp = self._local_tmp(path, data)
                try:
                    os.link(tmp, path)
                finally:
                    os.unlink(tmp)
            else:
                self.fs.pipe_file(path, data, mode="create")

        # A retried create whose first attempt landed (reply lost) sees its own object and returns False:
        # callers compare what is there with what they meant to write (manifest, lease token).
        try:
            self._write(f"create {self.where(rel)}", _create)
        except FileExistsError:
            return False
        return True

    def create_json(self, rel: str, obj) -> bool:
        return self.create_bytes(rel, _json_bytes(obj))

    def write_json(self, rel: str, obj, name: str | None = None) -> FileEntry:
        return self.write_bytes(rel, _json_bytes(obj), name=name)

    def write_table(self, rel: str, df: pl.DataFrame, table: str, name: str | None = None) -> FileEntry:
        """Conform to the table's schema, serialise once in memory, write atomically."""
        assert table in TABLES
        df = conform(df, table)
        buf = io.BytesIO()
        df.write_parquet(buf, compression="zstd", statistics=True)
        return self.write_bytes(rel, buf.getvalue(), rows=df.height, schema_version=SCHEMA_VERSION, name=name)

    def put_file(self, local: str | Path, rel: str, name: str | None = None) -> FileEntry:
        """Upload one local file (s3fs uploads large ones in parts, and aborts the upload on failure) and
        describe it."""
        local = Path(local)
        digest, size = sha256_file(local), local.stat().st_size
        path = self.abs(rel)

        def _put():
            if self._local:
                tmp = self._local_tmp(path)
                self.fs.put_file(str(local), tmp)
                os.replace(tmp, path)
            elif fsspec.utils.get_protocol(self.url) in ("s3", "s3a"):
                self.fs.put_file(str(local), path, chunksize=self.part_size)
            else:
                self.fs.put_file(str(local), path)

        self._write(f"upload {self.where(rel)}", _put)
        return FileEntry(path=rel, sha256=digest, bytes=size, name=name)

    def write_stream(self, rel: str, fill: Callable[[HashingWriter], None], name: str | None = None) -> FileEntry:
        """Write rel from `fill(file)`, hashing the bytes on their way out: for files too big to hold twice
        in memory (checkpoints), never read back. Whole-or-nothing like write_bytes: a local file goes to a
        temporary name, is fsynced and renamed; on S3 the multipart upload completes only when fill returns
        and is aborted if it raises. A transient fault reruns fill from the start: fill must be repeatable."""
        path = self.abs(rel)

        def _put() -> HashingWriter:
            if self._local:
                tmp = self._local_tmp(path)
                try:
                    with open(tmp, "wb") as raw:
                        out = HashingWriter(raw)
                        fill(out)
                        raw.flush()
                        os.fsync(raw.fileno())
                    os.replace(tmp, path)
                except BaseException:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                    raise
                return out
            raw = self.fs.open(path, "wb", block_size=self.part_size)
            out = HashingWriter(raw)
            try:
                fill(out)
            except BaseException:
                raw.discard()  # S3: aborts the multipart upload
                raw.closed = True  # and nothing may complete it when the object is collected
                raise
            raw.close()
            return out

        out = self._write(f"write {self.where(rel)}", _put)
        return FileEntry(path=rel, sha256=out.sha256.hexdigest(), bytes=out.size, name=name)

    def adopt(self, rel: str, name: str | None = None) -> FileEntry:
        """Describe a file written in place under this local store, once it is durable (fsynced)."""
        assert self._local
        path = self.abs(rel)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return FileEntry(path=rel, sha256=sha256_file(path), bytes=os.path.getsize(path), name=name)

    def get_file(self, rel: str, local: str | Path) -> None:
        retrying(f"download {self.where(rel)}", lambda: self.fs.get_file(self.abs(rel), str(local)))

    def rm(self, rel: str, recursive: bool = False) -> None:
        if self.exists(rel):
            self._write(f"delete {self.where(rel)}", lambda: self.fs.rm(self.abs(rel), recursive=recursive))

    def check_writable(self) -> None:
        """Write and remove a probe file, so a bad root fails before any work is done."""
        probe = f".rlme-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.write_bytes(probe, b"ok")
            self.rm(probe)
        except Exception as e:  # the concrete error differs by filesystem
            raise StorageError(
                f"run.storage {self.url!r} is not writable ({type(e).__name__}: {e}); "
                "point run.storage (or --storage) at a directory or bucket you can write"
            ) from None


class HashingWriter:
    """A binary file (write/flush) that passes its bytes on to `raw` and to sha256 as they go by."""

    def __init__(self, raw):
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.raw.write(data)
        self.sha256.update(data)
        n = memoryview(data).nbytes
        self.size += n
        return n

    def flush(self) -> None:
        self.raw.flush()


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
