"""Prefect events and retries of rlme_train, on a real Prefect server (the test harness's, on 127.0.0.1).

The alarm events are read back from the server's events API; the example automation of
infra/automations/ is created with `prefect automation create` and pauses a real deployment whose flow run
raised the probe alarm. Retries: a stage step that fails on a config error runs once, one that meets a
refused connection runs again.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentScheduleCreate
from prefect.client.schemas.schedules import CronSchedule
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.flow_engine import run_flow
from rlme_flows.events import FAILED_JUDGEMENTS, PROBE_ALARM, resource_id
from rlme_flows.train import rlme_train
from rlme_tasks.steps import as_tasks

from rlme_pipeline.config import ConfigError, load_config
from tests.conftest import DEMO, ROOT

AUTOMATION = ROOT / "infra" / "automations" / "pause-on-probe-alarm.yaml"


def config(micro_config, tmp_path: Path, run_id: str, **sections) -> str:
    """A one-iteration micro config with some sections changed."""
    path = micro_config(str(tmp_path / "runs"), iterations=1, run_id=run_id)
    d = yaml.safe_load(path.read_text())
    for name, fields in sections.items():
        d[name] = {**d.get(name, {}), **fields}
    path.write_text(yaml.safe_dump(d))
    return str(path)


def events(client, name: str, run_id: str, want: int = 1, timeout: float = 60) -> list:
    """The events `name` of the run, once `want` of them are stored (the server persists them in batches)."""
    end = time.time() + timeout
    while True:
        page = client.read_events(
            EventFilter(event=EventNameFilter(name=[name]), resource=EventResourceFilter(id=[resource_id(run_id)])),
            limit=50,  # the client's default (100) is above the server's maximum page
        )
        if len(page.events) >= want or time.time() > end:
            return page.events
        time.sleep(1)


def test_probe_alarm_event_pauses_the_scheduled_deployment(prefect_server, micro_config, tmp_path):
    # alarm_share 0: any content-free answer judged positive raises it (the tiny judge says yes to some)
    cfg = config(micro_config, tmp_path, "alarmed", probe={"every": 1, "prompts": 2, "alarm_share": 0.0})
    created = subprocess.run(
        [sys.executable, "-m", "prefect", "automation", "create", "--from-file", str(AUTOMATION)],
        env={**os.environ, "PREFECT_API_URL": prefect_server},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(rlme_train)
        deployment_id = client.create_deployment(
            flow_id,
            "scheduled",
            schedules=[DeploymentScheduleCreate(schedule=CronSchedule(cron="0 0 1 1 *"), active=True)],
        )
        params = {"config": cfg}
        flow_run = client.create_flow_run_from_deployment(deployment_id, parameters=params)
        assert client.read_automations_by_name("rlme-pause-on-probe-alarm")[0].enabled
        assert not client.read_deployment(deployment_id).paused

    result = run_flow(rlme_train, flow_run=flow_run, parameters=params)  # as a worker would run it
    assert result["trained_now"] == [0]

    with get_client(sync_client=True) as client:
        [alarm] = events(client, PROBE_ALARM, "alarmed")
        # the run trained without failed judgements: no failed-judgement event beside the probe's
        assert events(client, FAILED_JUDGEMENTS, "alarmed", timeout=0) == []
        end = time.time() + 60
        while not (paused := client.read_deployment(deployment_id).paused) and time.time() < end:
            time.sleep(1)
    assert alarm.resource.id == "rlme.run.alarmed" and alarm.resource.name == "alarmed"
    p = alarm.payload
    assert p["run_id"] == "alarmed" and p["run"] == result["run"] and p["iteration"] == 0 and p["threshold"] == 0.0
    assert p["metrics"]["probe/alarm"] == 1.0 and p["metrics"]["probe/share_max"] > 0
    assert "probe/other/share" in p["metrics"] and "probe alarm" in p["message"]
    related = {r.role: r.id for r in alarm.related}
    assert related["flow-run"] == f"prefect.flow-run.{flow_run.id}"
    assert related["deployment"] == f"prefect.deployment.{deployment_id}"
    assert paused, "the automation did not pause the deployment whose run raised the probe alarm"


def test_failed_judgements_event(prefect_server, micro_config, tmp_path):
    # A judging template longer than the tiny evaluator's context: every judgement is context_overflow.
    template = "{prompt}\n{completion}\n" + "pad " * 1100
    cfg = config(micro_config, tmp_path, "overflowing", scoring={"template": template}, alerts={"failed_share": 0.5})
    result = rlme_train(config=cfg)
    assert result["trained_now"] == [0]
    with get_client(sync_client=True) as client:
        [failed] = events(client, FAILED_JUDGEMENTS, "overflowing")
        assert events(client, PROBE_ALARM, "overflowing", timeout=0) == []  # the probe is off
    assert failed.payload["metrics"] == {"failed_share": 1.0} and failed.payload["threshold"] == 0.5
    assert failed.payload["iteration"] == 0 and failed.payload["run"] == result["run"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_stage_retries_transient_faults_only(prefect_server):
    """A config error fails the step's task at its first try; a refused connection is tried again."""
    calls = {"config": 0, "network": 0}
    port = closed_port()

    def bad_config(iteration: int):
        calls["config"] += 1
        return load_config(DEMO).with_overrides(stage_timeout_s={"updat": 10})  # raises ConfigError

    def flaky_network(iteration: int):
        calls["network"] += 1
        if calls["network"] == 1:
            socket.create_connection(("127.0.0.1", port), timeout=5)  # ConnectionRefusedError
        return {"iteration": iteration}

    from prefect import flow

    @flow
    def one_step(step, iteration: int):
        return as_tasks()("score", step)(iteration)

    assert one_step(flaky_network, 7) == {"iteration": 7}
    with pytest.raises(ConfigError, match="stage_timeout_s"):
        one_step(bad_config, 8)
    assert calls == {"config": 1, "network": 2}
    with get_client(sync_client=True) as client:
        runs = {t.name: t for t in client.read_task_runs() if t.name in ("score-iter-7", "score-iter-8")}
    assert runs["score-iter-7"].run_count == 2 and runs["score-iter-7"].state.is_completed()
    assert runs["score-iter-8"].run_count == 1 and runs["score-iter-8"].state.is_failed()


def test_fanned_out_pieces_retry_transient_faults_only(prefect_server):
    """The fan-out hook of the flows (tasks/fan_out.py): each item a task run, in order, a refused
    connection tried again, a config error failing at its first try."""
    from prefect import flow
    from rlme_tasks.fan_out import submitted

    calls = {}
    port = closed_port()

    def piece(k: int, fail: str | None):
        calls[k] = calls.get(k, 0) + 1
        if fail == "network" and calls[k] == 1:
            socket.create_connection(("127.0.0.1", port), timeout=5)  # ConnectionRefusedError
        if fail == "config":
            load_config(DEMO).with_overrides(stage_timeout_s={"updat": 10})  # raises ConfigError
        return k * 10

    @flow
    def fan(items):
        return submitted("piece")(piece, items)

    assert fan([(0, None), (1, "network"), (2, None)]) == [0, 10, 20]
    assert calls == {0: 1, 1: 2, 2: 1}
    with pytest.raises(ConfigError):
        fan([(3, "config")])
    assert calls[3] == 1
