"""The store on local disk and on a real S3 endpoint: exclusive creates, retried faults, clear permanent errors."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from rlme_pipeline.config import ConfigError, load_config
from rlme_pipeline.storage.run import Run, attempt_name
from rlme_pipeline.storage.store import StorageError, Store

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "root"))
    return Store(request.getfixturevalue("s3").url("root"))


def test_exclusive_create_and_write_once_names(store):
    assert store.create_bytes("a/MANIFEST.json", b"first")
    assert not store.create_bytes("a/MANIFEST.json", b"second")  # the first commit stands
    assert store.read_bytes("a/MANIFEST.json") == b"first"
    e = store.write_bytes("a/x.parquet", b"data", name="a/x.parquet")
    assert (e.sha256, e.bytes, e.logical) == (
        "3a6eb0790f39ac87c94f3856b2dd2c5d110e6811602261a9a923d3bb23adc8b7",
        4,
        "a/x.parquet",
    )
    assert store.find("a") == ["a/MANIFEST.json", "a/x.parquet"]
    assert attempt_name("iter-000001/rollouts.parquet", "ab12") == "iter-000001/rollouts.ab12.parquet"
    assert attempt_name("iter-000001/checkpoint", "ab12") == "iter-000001/checkpoint.ab12"


def test_missing_bucket_is_a_clear_permanent_error(s3):
    store = Store(f"s3://no-such-bucket-{s3.name}/runs")
    with pytest.raises(StorageError, match="does not exist"):
        store.write_bytes("x", b"1")
    with pytest.raises(StorageError, match="not writable"):
        store.check_writable()


@pytest.mark.parametrize("bad", ["a/b", "../up", "..", "a..b", "", "x" * 200, "s3://b"])
def test_unsafe_run_ids_are_rejected(tmp_path, bad):
    with pytest.raises(ValueError, match="not a safe run id"):
        Run(Store(str(tmp_path)), bad)


def test_unsafe_run_id_in_config_and_url(tmp_path, tiny_models):
    with pytest.raises(ConfigError, match="not a safe run id"):
        load_config(DEMO).with_overrides(id="../escape")
    with pytest.raises(ValueError, match="not a safe run id"):
        Run.from_url(str(tmp_path / "runs" / ".."))


def test_credentials_in_storage_options_are_refused(tiny_models):
    from rlme_pipeline.config import validate_config

    base = load_config(DEMO).model_dump(mode="json")
    for opts, key in (
        ({"secret": "x"}, "secret"),
        ({"client_kwargs": {"aws_secret_access_key": "x"}}, "client_kwargs.aws_secret_access_key"),
    ):
        with pytest.raises(ConfigError, match=f"{key}.*look like credentials"):
            validate_config({**base, "run": {"storage_options": opts}})
    ok = validate_config({**base, "run": {"storage_options": {"endpoint_url": "http://minio:9000"}}})
    assert ok.hash() == validate_config(base).hash()  # where a run is stored is not what it computes


# --- a real dropped connection: a TCP proxy in front of moto that cuts uploads mid-body --------------


class DroppingProxy:
    """Forwards 127.0.0.1:port to the S3 endpoint; the first `drops` PUT requests are cut off after
    `after` body bytes by closing both sockets, which the client sees as a connection reset mid-upload."""

    def __init__(self, upstream: str, drops: int, after: int = 256 * 1024):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.drops, self.after = drops, after
        self.doomed = self.dropped = self.puts = 0  # PUTs chosen to cut, actually cut, seen
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        up = socket.create_connection(self.upstream)
        threading.Thread(target=self._pump, args=(up, client, False), daemon=True).start()
        self._pump(client, up, True)

    def _pump(self, src, dst, from_client):
        sent, doomed = 0, False
        try:
            while data := src.recv(65536):
                if from_client and data.startswith(b"PUT "):
                    sent = 0
                    with self.lock:
                        self.puts += 1
                        doomed = self.doomed < self.drops
                        self.doomed += doomed
                if doomed and sent + len(data) > self.after:
                    dst.sendall(data[: max(self.after - sent, 0)])
                    with self.lock:
                        self.dropped += 1
                    raise ConnectionResetError("dropped on purpose")
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self):
        self.sock.close()


def test_uploads_survive_dropped_connections(s3, tmp_path):
    proxy = DroppingProxy(s3.endpoint, drops=3)
    try:
        # The endpoint comes from run.storage_options here (not the environment), as a config would give it.
        store = Store(s3.url("proxied"), {"endpoint_url": proxy.url, "skip_instance_cache": True})
        data = bytes(range(256)) * 4096  # 1 MiB
        entry = store.write_bytes("iter-000000/rollouts.parquet", data)
        big = tmp_path / "model.safetensors"
        big.write_bytes(data * 12)  # 12 MiB: uploaded in parts (5 MiB chunks)
        store.part_size = 5 * 2**20  # the S3 minimum, so this small file goes up in 3 parts
        ck = store.put_file(big, "iter-000000/checkpoint.x/model.safetensors")
        assert proxy.dropped == 3 and proxy.puts > 3
        s3.fs.invalidate_cache()
        assert s3.fs.cat_file(f"{s3.name}/proxied/iter-000000/rollouts.parquet") == data
        assert store.sha256("iter-000000/rollouts.parquet") == entry.sha256
        assert store.sha256("iter-000000/checkpoint.x/model.safetensors") == ck.sha256
    finally:
        proxy.close()


def test_gc_on_local_disk_finds_temp_files_and_unreferenced_attempts(tmp_path):
    from rlme_pipeline.storage import gc

    run = Run(Store(str(tmp_path / "runs")), "r1")
    run.store.write_json("run.json", {})
    kept = run.store.write_bytes("iter-000000/rollouts.aaaa1111.parquet", b"rows", name="iter-000000/rollouts.parquet")
    run.store.write_json(
        "iter-000000/stages/generate.json",
        {"stage": "generate", "iteration": 0, "files": [kept.model_dump()], "seconds": 1.0},
    )
    run.store.write_bytes("iter-000000/scores.bbbb2222.parquet", b"killed before its record")
    Path(run.store.abs("iter-000000/rewards.cccc3333.parquet.tmp-1234abcd")).write_bytes(b"killed mid-write")
    Path(run.store.abs("scoresets/v2")).mkdir(parents=True)
    Path(run.store.abs("scoresets/v2/scores.parquet")).write_bytes(
        b"a score set with no commit yet: a re-score may be writing it"
    )
    assert gc.plan(run).files == [
        "iter-000000/rewards.cccc3333.parquet.tmp-1234abcd",
        "iter-000000/scores.bbbb2222.parquet",
    ]
    assert gc.apply(run).bytes == 40
    assert run.store.find() == [
        "iter-000000/rollouts.aaaa1111.parquet",
        "iter-000000/stages/generate.json",
        "lease/00000001.json",
        "run.json",
        "scoresets/v2/scores.parquet",
    ]
    assert run.path(0, "rollouts.parquet") == "iter-000000/rollouts.aaaa1111.parquet"


def test_store_retries_after_botocore_gives_up(s3, caplog):
    """More cuts than botocore (per request) and s3fs (per call) retry: the store's own backoff retries the
    whole write. Both are turned down to a single attempt here, so cuts reach the outer layer."""
    proxy = DroppingProxy(s3.endpoint, drops=3, after=1024)
    try:
        opts = {
            "endpoint_url": proxy.url,
            "skip_instance_cache": True,
            "config_kwargs": {"retries": {"total_max_attempts": 1}},
        }
        store = Store(s3.url("proxied"), opts)
        store.fs.retries = 1  # s3fs's own retry loop (a class attribute, 5 by default)
        store.fs.retries = 1  # s3fs's own retry loop (a class attribute, 5 by default)
        with caplog.at_level("WARNING", logger="rlme_pipeline.storage.store"):
            entry = store.write_bytes("x.bin", b"y" * 300_000)
        assert proxy.dropped == 3
        assert "transient" in caplog.text and "retrying" in caplog.text
        assert store.sha256("x.bin") == entry.sha256
    finally:
        proxy.close()


# --- the write-once commit unit, on both stores ---------------------------------------------------------


def _rewards(reward: float):
    import polars as pl

    return pl.DataFrame(
        {
            "rollout_id": ["r0"],
            "prompt_id": ["p0"],
            "iteration": [0],
            "reward": [reward],
            "advantage": [0.0],
            "n_components": [1],
            "n_failed": [0],
        }
    )


def test_a_second_commit_of_an_iteration_or_a_shard_leaves_the_first_standing(store):
    from rlme_pipeline import scoreset
    from rlme_pipeline.storage.run import MANIFEST, CorruptRun, StageRecord, now

    run, cfg = Run(store, "r1"), load_config(DEMO)
    store = run.store
    rec = StageRecord(
        stage="aggregate",
        iteration=0,
        files=[run.write_table(0, "rewards.parquet", _rewards(1.0), "rewards")],
        seconds=1.0,
    )
    run.write_stage_record(rec)  # a record written after its data file
    assert run.path(0, "rewards.parquet") == rec.files[0].path != "iter-000000/rewards.parquet"
    first = run.commit(0, cfg, [rec])
    manifest_bytes = store.read_bytes(f"iter-000000/{MANIFEST}")
    # A stale writer redid the stage under a new attempt name and commits its own files: the first stands.
    rec2 = StageRecord(
        stage="aggregate",
        iteration=0,
        files=[run.write_table(0, "rewards.parquet", _rewards(2.0), "rewards")],
        seconds=2.0,
    )
    assert rec2.files[0].path != rec.files[0].path
    assert run.commit(0, cfg, [rec2]) == first == run.manifest(0)
    assert store.read_bytes(f"iter-000000/{MANIFEST}") == manifest_bytes
    assert run.read_table(0, "rewards.parquet")["reward"].to_list() == [1.0]

    shard = scoreset.shard_unit(run, "v2", 1, 3)
    assert not shard.committed()

    def mk(r):
        return scoreset.ShardManifest(
            files=[shard.write_table("rewards.parquet", _rewards(r), "rewards")],
            scoreset="v2",
            iteration=1,
            shard=3,
            rollouts=1,
            seconds=0.1,
            committed_at=now(),
        )

    m1 = shard.commit(mk(1.0))
    m2 = mk(2.0)
    assert shard.commit(m2) == m1 != m2 and shard.manifest() == m1
    assert shard.read_table("rewards.parquet", verify=True)["reward"].to_list() == [1.0]
    assert all(f.path.startswith("scoresets/v2/_shards/iter-000001/shard-00003/rewards.") for f in m1.files + m2.files)
    # A manifest in the wrong place is damage, not data.
    store.write_bytes(scoreset.shard_unit(run, "v2", 1, 4).rel(MANIFEST), store.read_bytes(shard.rel(MANIFEST)))
    with pytest.raises(CorruptRun, match="belongs to scoreset 'v2', iteration 1, shard 3, not shard 4"):
        scoreset.shard_unit(run, "v2", 1, 4).manifest()
    # A file whose bytes changed after commit is refused by a verifying read.
    store.write_bytes(m1.files[0].path, b"junk")
    with pytest.raises(CorruptRun, match="does not match its committed entry"):
        shard.read_table("rewards.parquet", verify=True)


def test_a_stream_that_fails_leaves_nothing(store):
    """open_write: whole or nothing, also when a multipart upload had already begun on S3."""
    store.part_size = 5 * 2**20  # the S3 minimum: 6 MiB starts a multipart upload before the error
    with pytest.raises(RuntimeError, match="killed"):
        with store.open_write("a/stream.bin") as f:
            f.write(b"x" * (6 * 2**20))
            raise RuntimeError("killed")
    assert store.find() == []
    if hasattr(store.fs, "list_multipart_uploads"):
        assert store.fs.list_multipart_uploads(store.root.partition("/")[0]) == []
    with store.open_write("a/stream.bin") as f:
        f.write(b"y" * (6 * 2**20))
    assert store.find() == ["a/stream.bin"] and store.size("a/stream.bin") == 6 * 2**20


def test_child_store_shares_the_connection_and_options(s3):
    store = Store(s3.url("root"), {"endpoint_url": s3.endpoint})
    sub = store.child("r1/iter-000000")
    assert (
        sub.fs is store.fs
        and sub.url == f"{s3.url('root')}/r1/iter-000000"
        and sub.root == f"{store.root}/r1/iter-000000"
    )
    sub.write_bytes("x", b"1")
    assert store.read_bytes("r1/iter-000000/x") == b"1"


@pytest.mark.parametrize(
    "url, expected",
    [
        ("./runs/demo", ("./runs", "demo")),
        ("s3://bucket/runs/exp-42/", ("s3://bucket/runs", "exp-42")),
        ("file:///data/runs/x", ("file:///data/runs", "x")),
    ],
)
def test_one_run_url_parser(url, expected):
    from rlme_pipeline.storage.run import split_run_url

    assert split_run_url(url) == expected


@pytest.mark.parametrize("url", ["demo", "s3://bucket", "s3://", "/", "./runs/a..b"])
def test_bad_run_urls_are_refused(url):
    from rlme_pipeline.storage.run import split_run_url

    with pytest.raises(ValueError, match="not a run URL|not a safe run id"):
        split_run_url(url)
