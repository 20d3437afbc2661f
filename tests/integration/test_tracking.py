"""Experiment trackers for real: a run trains with TensorBoard, MLflow and W&B (offline) on, resumes, and each
tracker's own files are read back with its own reader: every committed iteration's numbers at step =
iteration, the sample completions, and one tracker run continued across the resume."""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest

from rlme_pipeline.config import ConfigError, load_config
from rlme_pipeline.jobs.preflight import preflight
from rlme_pipeline.jobs.tracking import SAMPLE_COLUMNS, metrics_of
from rlme_pipeline.jobs.train import train
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.store import Store
from tests.conftest import DEMO, ROOT, demo_variant, write_config

SAMPLES = 3


def _config_file(tmp_path, backends: list[str], iterations: int = 2) -> str:
    """The demo, made small (2 prompts x 2 samples, 1 judge, 1 question; the probe on), tracking on."""
    tracking = {"backends": backends, "dir": str(tmp_path / "tracking"), "project": "rlme-test", "samples": SAMPLES}
    probe = {"every": 1}  # every iteration carries the probe's metrics
    d = demo_variant(
        tmp_path / "runs", iterations=iterations, run_id="tracked", micro=True, probe=probe, tracking=tracking
    )
    return str(write_config(d, tmp_path, "tracked"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models):
    """Two iterations, then a resume to three: two train() calls, so two tracker sessions on one run.
    W&B offline with every folder it writes in the temp dir; MLflow on its default local store."""
    tmp = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        for k in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            mp.setenv(k, str(tmp / k.lower()))
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = load_config(_config_file(tmp, ["tensorboard", "mlflow", "wandb"]))
        run = Run.for_config(cfg)
        preflight(cfg, run.root)
        first = train(cfg, run)
        resumed = train(cfg.with_overrides(iterations=3), run)
    assert [m.iteration for m in first + resumed] == [0, 1, 2]
    return cfg, run, first + resumed, tmp


def _expected(manifests) -> dict[int, dict[str, float]]:
    return {m.iteration: metrics_of(m) for m in manifests}


def test_metrics_of_takes_every_number_of_the_manifest(trained):
    _, _, manifests, _ = trained
    m = manifests[0]
    got = metrics_of(m)
    for key in (
        "reward_mean",
        "loss",
        "clip_ratio",
        "behavior_mismatch",
        "completion_tokens_mean",
        "other/correct/mean",
        "other/correct/p_yes",
        "probe/share_max",
        "probe/alarm",
    ):
        assert got[key] == pytest.approx(float(m.metrics[key])), key
    for stage, seconds in m.timings.items():
        assert got[f"seconds/{stage}"] == seconds
    assert "kl" not in got and m.metrics["kl"] is None  # no KL term: not a number, so not a zero either


def test_tensorboard_event_files_hold_every_iteration(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _, manifests, tmp_path = trained
    logdir = tmp_path / "tracking" / "tensorboard" / cfg.run.id
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2, "one event file per train() call, in one folder"
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    for i, metrics in _expected(manifests).items():
        for key, value in metrics.items():
            events = [e for e in acc.Scalars(key) if e.step == i]
            assert len(events) == 1, (key, i)
            assert events[0].value == pytest.approx(value, rel=1e-6, abs=1e-6), (key, i)
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("samples/text_summary")}
    assert sorted(texts) == [0, 1, 2]
    rollouts = {r["completion"].replace("|", "\\|").replace("\n", " ") for r in _rollouts(trained, 2)}
    table_rows = texts[2].splitlines()[2:]
    assert len(table_rows) == SAMPLES
    assert all(any(c in row for c in rollouts) for row in table_rows), "a sample that is not from iteration 2"


def test_mlflow_store_holds_one_run_continued_across_the_resume(trained):
    from mlflow.tracking import MlflowClient

    cfg, run, manifests, tmp_path = trained
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rlme-test")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == [cfg.run.id], "the resume started a second MLflow run"
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert r.data.tags["rlme.run_url"] == run.url and r.data.tags["rlme.config_hash"] == cfg.hash()
    for key in ("reward_mean", "loss", "other/correct/p_yes", "probe/share_max", "seconds/update"):
        history = client.get_metric_history(r.info.run_id, key)
        got = {h.step: h.value for h in history}
        assert got == pytest.approx({i: m[key] for i, m in _expected(manifests).items()}), key
    local = client.download_artifacts(r.info.run_id, "samples/iter-000002.json", str(tmp_path / "dl"))
    table = json.loads(open(local).read())
    assert table["columns"] == list(SAMPLE_COLUMNS) and len(table["data"]) == SAMPLES
    completions = {row["completion"] for row in _rollouts(trained, 2)}
    assert all(row[0] == 2 and row[2] in completions for row in table["data"])


def test_wandb_offline_run_files_continue_one_run_id(trained):
    from wandb.proto import wandb_internal_pb2

    cfg, _, manifests, tmp_path = trained
    run_dirs = sorted(glob.glob(str(tmp_path / "tracking" / "wandb" / f"offline-run-*-{cfg.run.id}")))
    assert len(run_dirs) == 2, "one offline run folder per train() call, both with the run's id"
    history, run_ids = {}, set()
    for d in run_dirs:
        for record in _wandb_records(f"{d}/run-{cfg.run.id}.wandb", wandb_internal_pb2.Record):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_ids.add((record.run.run_id, record.run.project))
            elif kind == "history":
                items = record.history.item
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
                history[row["_step"]] = row
    assert run_ids == {(cfg.run.id, "rlme-test")}
    assert sorted(history) == [0, 1, 2]
    for i, metrics in _expected(manifests).items():
        for key, value in metrics.items():
            assert history[i][key] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, i)
        assert history[i]["samples/nrows"] == SAMPLES
    table_file = glob.glob(f"{run_dirs[1]}/files/{history[2]['samples/path']}")
    data = json.loads(open(table_file[0]).read())
    assert data["columns"] == list(SAMPLE_COLUMNS)
    assert {row[2] for row in data["data"]} <= {r["completion"] for r in _rollouts(trained, 2)}


def test_a_tracker_whose_sdk_is_missing_is_refused_by_preflight(tmp_path, tiny_models, monkeypatch):
    """Python's own way to make a package unimportable (sys.modules[name] = None): the run is refused
    with the extra to install, before anything is loaded or written."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = load_config(_config_file(tmp_path, ["tensorboard", "wandb"]))
    message = r"tracking.backends: 'wandb' needs the wandb package.*pip install 'rlme\[wandb\]'"
    with pytest.raises(ConfigError, match=message):
        preflight(cfg, Store(cfg.run.storage))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "tracking").exists()


def test_tracking_is_not_part_of_the_experiment(tmp_path):
    plain = load_config(_config_file(tmp_path, []))
    tracked = load_config(_config_file(tmp_path, ["tensorboard", "mlflow"]))
    assert plain.hash() == tracked.hash()
    with pytest.raises(ConfigError, match="tracking.backends"):
        load_config(_config_file(tmp_path, ["tensorbored"]))


def test_trackio_local_run_is_read_back(tmp_path, tiny_models):
    """trackio reads $TRACKIO_DIR when it is first imported, so this runs in a fresh process."""
    pytest.importorskip("trackio", reason="trackio is an optional extra: pip install 'rlme[trackio]'")
    config, result_file = _config_file(tmp_path, ["trackio"]), tmp_path / "trackio-result.json"
    script = textwrap.dedent(f"""
        import json
        from rlme_pipeline.config import load_config
        from rlme_pipeline.storage.run import Run
        from rlme_pipeline.jobs.train import train
        from rlme_pipeline.jobs.tracking import metrics_of
        cfg = load_config({config!r})
        run = Run.for_config(cfg)
        made = train(cfg, run) + train(cfg.with_overrides(iterations=3), run)
        from trackio.sqlite_storage import SQLiteStorage
        logs = SQLiteStorage.get_logs("rlme-test", cfg.run.id)
        result = {{"runs": SQLiteStorage.get_runs("rlme-test"), "logs": logs,
                  "expected": {{m.iteration: metrics_of(m) for m in made}}}}
        open({str(result_file)!r}, "w").write(json.dumps(result, default=str))
    """)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(result_file.read_text())  # trackio prints to stdout
    assert result["runs"] == ["tracked"], "the resume started a second trackio run"
    by_step = {}
    for row in result["logs"]:  # the numbers and the samples table are two rows of one step
        by_step.setdefault(row["step"], {}).update(row)
    assert sorted(by_step) == [0, 1, 2]
    for i, metrics in result["expected"].items():
        for key in ("reward_mean", "loss", "probe/share_max", "seconds/update"):
            assert by_step[int(i)][key] == pytest.approx(metrics[key]), (key, i)
        rows = by_step[int(i)]["samples"]["_value"]
        assert len(rows) == SAMPLES and {r["iteration"] for r in rows} == {int(i)}


# --- helpers --------------------------------------------------------------------------------------------


def _rollouts(trained, i: int) -> list[dict]:
    _, run, _, _ = trained
    return run.read_table(i, "rollouts.parquet").to_dicts()


def _wandb_records(path: str, record_type):
    """The records of a .wandb file, parsed with W&B's own protobuf: a ':W&B' header (7 bytes), then the
    LevelDB log format (32 KiB blocks of chunks with a crc32, a length and a type: full/first/middle/last)."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last chunk: a record ends here
            record = record_type()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_demo_tracked_is_the_demo_with_trackers_on():
    """configs/demo_tracked.yaml must not drift from the demo: the same experiment, its own run id."""
    demo, tracked = load_config(DEMO), load_config(DEMO.parent / "demo_tracked.yaml")
    assert tracked.tracking.backends and not demo.tracking.backends
    assert tracked.with_overrides(id=demo.run.id).hash() == demo.hash()
    assert tracked.run.id != demo.run.id
