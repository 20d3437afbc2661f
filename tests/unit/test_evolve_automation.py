"""The example automation infra/automations/evolve-on-probe-alarm.yaml: what `prefect deploy --trigger` reads,
and the evolve flow's parameters it renders from an `rlme.probe.alarm` event."""

from __future__ import annotations

import uuid

import jinja2
import yaml
from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes
from pydantic import TypeAdapter
from rlme_flows.events import PROBE_ALARM
from rlme_flows.evolve import rlme_evolve

from rlme_pipeline.config import RUN_ID
from rlme_pipeline.scoreset import parse_iterations
from tests.conftest import ROOT


def render(value, event: dict):
    """Prefect renders each string parameter that holds a template with the triggering event."""
    if isinstance(value, str) and "{{" in value:
        return jinja2.Template(value).render(event=event)
    return value


def test_evolve_automation_runs_the_evolve_flow_on_the_probe_alarm():
    spec = yaml.safe_load((ROOT / "infra/automations/evolve-on-probe-alarm.yaml").read_text())
    [trigger] = [TypeAdapter(DeploymentTriggerTypes).validate_python(t) for t in spec["triggers"]]
    trigger.set_deployment_id(uuid.uuid4())
    auto = trigger.as_automation()
    assert auto.trigger.expect == {PROBE_ALARM} and [a.type for a in auto.actions] == ["run-deployment"]

    # the payload flows/events.py emits (run URL, iteration, ...)
    event = {"event": PROBE_ALARM, "payload": {"run_id": "exp-1", "run": "s3://b/runs/exp-1", "iteration": 7}}
    params = {k: render(v, event) for k, v in trigger.parameters.items()}
    assert params["run_uri"] == "s3://b/runs/exp-1" and RUN_ID.match(params["name"])
    assert parse_iterations(params["iterations"], [5, 6, 7, 8]) == [7, 8]
    assert set(params) <= set(rlme_evolve.validate_parameters(params))  # the flow takes each of them
