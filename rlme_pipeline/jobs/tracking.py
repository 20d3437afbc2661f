"""Experiment trackers: every committed iteration's numbers, and a few of its completions, in TensorBoard,
MLflow, W&B or trackio (config `tracking`, docs/tracking.md).

Each tracker is an optional extra whose SDK is imported only when a run asks for it; `check_installed`
(called by preflight) names the extra to install before anything starts. The runner opens the trackers
for one `train` call (`Trackers`) and hands them each manifest it commits. The manifest is the source:
a tracker shows what the run recorded, at step = iteration. A tracker run is named by the run id, so a
resumed run continues the same tracker run. A tracker that fails to log an iteration is a warning, not
a failed run: the iteration is committed already, and `rlme status` / `rlme audit` read the manifests.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from rlme_pipeline.config import Config, ConfigError, TrackingConfig

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("iteration", "prompt", "completion", "reward")


class Tracker(ABC):
    """One tracker run: numbers and sample tables at step = iteration, closed once."""

    backend: str  # its name in tracking.backends, which is also its extra: pip install 'rlme[{backend}]'
    module: str  # the SDK's import name

    @abstractmethod
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    @abstractmethod
    def log_samples(self, step: int, rows: list[dict]) -> None:
        """rows: dicts with SAMPLE_COLUMNS."""

    @abstractmethod
    def close(self, ok: bool = True) -> None:
        """ok=False: training stopped on an error (trackers with a run status mark the run failed)."""

    @classmethod
    def sdk(cls):
        """The SDK module, imported now: the extras are optional, and a run without trackers loads none."""
        try:
            return importlib.import_module(cls.module)
        except ImportError as e:
            raise ConfigError(missing_message(cls)) from e


class TensorBoardTracker(Tracker):
    """Event files under {dir}/tensorboard/{run id}; a resumed run writes a new event file in the same folder."""

    backend, module = "tensorboard", "tensorboard"

    def __init__(self, cfg: Config, run_url: str):
        self.sdk()
        from torch.utils.tensorboard import SummaryWriter  # torch's writer; it needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(Path(cfg.tracking.dir) / "tensorboard" / cfg.run.id))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def log_samples(self, step: int, rows: list[dict]) -> None:
        self.writer.add_text("samples", markdown_table(rows), global_step=step)
        self.writer.flush()

    def close(self, ok: bool = True) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    """An MLflow run named by the run id in experiment `project`: found again by that name on resume."""

    backend, module = "mlflow", "mlflow"

    def __init__(self, cfg: Config, run_url: str):
        self.sdk()
        from mlflow.tracking import MlflowClient

        t = cfg.tracking
        uri, artifacts = t.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI"), None
        if uri is None:  # a local store beside the other trackers' files, not mlflow's cwd-relative default
            root = Path(t.dir).resolve()
            root.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{root / 'mlflow.db'}", (root / "mlflow-artifacts").as_uri()
        self.client = client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(t.project)
        exp_id = exp.experiment_id if exp else client.create_experiment(t.project, artifact_location=artifacts)
        found = client.search_runs([exp_id], filter_string=f"attributes.run_name = '{cfg.run.id}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {"rlme.run_url": run_url, "rlme.config_hash": cfg.hash()}
            self.run_id = client.create_run(exp_id, run_name=cfg.run.id, tags=tags).info.run_id
            client.log_dict(self.run_id, cfg.model_dump(mode="json"), "config.json")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), v, now, step) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_samples(self, step: int, rows: list[dict]) -> None:
        columns = {c: [r[c] for r in rows] for c in SAMPLE_COLUMNS}
        self.client.log_table(self.run_id, data=columns, artifact_file=f"samples/iter-{step:06d}.json")

    def close(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class WandbTracker(Tracker):
    """A W&B run with id = run id and resume="allow"; files under {dir}/wandb. WANDB_MODE=offline (or
    `wandb offline`) keeps it on disk for a later `wandb sync`."""

    backend, module = "wandb", "wandb"

    def __init__(self, cfg: Config, run_url: str):
        wandb = self.sdk()
        self.table = wandb.Table
        root = Path(cfg.tracking.dir)
        root.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.tracking.project,
            id=cfg.run.id,
            name=cfg.run.id,
            resume="allow",
            dir=str(root),
            config=cfg.model_dump(mode="json"),
            notes=run_url,
        )

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        data = [[r[c] for c in SAMPLE_COLUMNS] for r in rows]
        self.run.log({"samples": self.table(columns=list(SAMPLE_COLUMNS), data=data)}, step=step)

    def close(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class TrackioTracker(Tracker):
    """A trackio run named by the run id (resume="allow") in project `project`. Its local database lives
    where trackio keeps it: $TRACKIO_DIR, read when trackio is first imported."""

    backend, module = "trackio", "trackio"

    def __init__(self, cfg: Config, run_url: str):
        trackio = self.sdk()
        self.table = trackio.Table
        self.run = trackio.init(
            project=cfg.tracking.project,
            name=cfg.run.id,
            resume="allow",
            embed=False,
            config=cfg.model_dump(mode="json"),
            auto_log_cpu=False,
            auto_log_gpu=False,
        )

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        import pandas as pd  # trackio's tables take a DataFrame; pandas comes with trackio's dependencies

        self.run.log({"samples": self.table(dataframe=pd.DataFrame(rows, columns=list(SAMPLE_COLUMNS)))}, step=step)

    def close(self, ok: bool = True) -> None:
        self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {
    t.backend: t for t in (TensorBoardTracker, MLflowTracker, WandbTracker, TrackioTracker)
}


def missing_message(tracker: type[Tracker]) -> str:
    return (
        f"tracking.backends: {tracker.backend!r} needs the {tracker.module} package, which is not installed: "
        f"pip install 'rlme[{tracker.backend}]' (or remove {tracker.backend!r} from tracking.backends)"
    )


def check_installed(tracking: TrackingConfig) -> None:
    """Preflight: every tracker the config asks for can be imported (found, not imported: that is slow)."""
    for name in tracking.backends:
        if importlib.util.find_spec(TRACKERS[name].module) is None:
            raise ConfigError(missing_message(TRACKERS[name]))


def metrics_of(manifest) -> dict[str, float]:
    """Everything numeric a manifest records: its metrics (nested dicts joined with '/'; booleans as 0/1;
    None, e.g. kl without a KL term, left out) and its stage seconds as seconds/{stage}."""
    out: dict[str, float] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}/", v)
        elif isinstance(value, (int, float)):
            out[prefix.removesuffix("/")] = float(value)

    walk("", manifest.metrics)
    walk("seconds/", manifest.timings)
    return out


def mlflow_key(key: str) -> str:
    """MLflow accepts letters, digits, _ - . / and spaces in metric names; anything else becomes _."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def markdown_table(rows: list[dict]) -> str:
    """TensorBoard's text tab renders markdown: one row per sample, cells on one line."""

    def cell(v) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")

    lines = ["| " + " | ".join(SAMPLE_COLUMNS) + " |", "|" + " --- |" * len(SAMPLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in SAMPLE_COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


class Trackers:
    """The trackers of one `train` call: opened on entry, closed on exit (marked failed where the tracker
    has a run status, when training raised). `read_samples(iteration, n)` gives the sample rows."""

    def __init__(
        self,
        cfg: Config,
        run_url: str,
        read_samples: Callable[[int, int], list[dict]],
        logger: logging.Logger | logging.LoggerAdapter = log,
    ):
        self.cfg, self.run_url, self.read_samples, self.log = cfg, run_url, read_samples, logger
        self.open: list[Tracker] = []

    def __enter__(self) -> Trackers:
        try:
            for name in self.cfg.tracking.backends:
                self.open.append(TRACKERS[name](self.cfg, self.run_url))
        except BaseException:
            self.__exit__(Exception, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for t in self.open:
            try:
                t.close(ok=exc_type is None)
            except Exception as e:
                self.log.warning("tracker %s did not close cleanly: %r", t.backend, e)
        self.open = []

    def record(self, manifest) -> None:
        """Log a committed iteration to every tracker, if it is due (tracking.every)."""
        i, t = manifest.iteration, self.cfg.tracking
        if not self.open or i % t.every:
            return
        metrics = metrics_of(manifest)
        try:
            rows = self.read_samples(i, t.samples) if t.samples else []
        except Exception as e:  # the numbers still go out
            self.log.warning("iteration %d: sample completions not read for the trackers: %r", i, e)
            rows = []
        for tracker in self.open:
            try:
                tracker.log_metrics(i, metrics)
                if rows:
                    tracker.log_samples(i, rows)
            except Exception as e:
                self.log.warning(
                    "tracker %s: iteration %d not logged (it is committed; rlme status shows it): %r",
                    tracker.backend,
                    i,
                    e,
                )
