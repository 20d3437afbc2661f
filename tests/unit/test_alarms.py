"""Which committed iterations raise an alarm event (flows/events.py), and the config that sets them.

The events themselves go to a real Prefect server in tests/e2e/test_flow_events.py."""

from __future__ import annotations

import pytest
import yaml
from rlme_flows.events import FAILED_JUDGEMENTS, PROBE_ALARM, alarms

from rlme_pipeline.config import ConfigError, load_config, validate_config
from rlme_pipeline.storage.run import Manifest
from tests.conftest import DEMO, ROOT


def manifest(**metrics) -> Manifest:
    return Manifest(
        files=[], run_id="demo", iteration=3, committed_at="", config_hash="", lineage={}, code={}, timings={},
        metrics=metrics,
    )  # fmt: skip


def with_alerts(**alerts):
    return validate_config({**load_config(DEMO).model_dump(mode="json"), "alerts": alerts})


def test_failed_share_above_the_threshold_only():
    cfg = with_alerts(failed_share=0.25)
    assert alarms(cfg, manifest(failed_share=0.25, reward_mean=-1.0)) == []  # at the threshold: not above
    [alarm] = alarms(cfg, manifest(failed_share=0.5))
    assert (alarm.event, alarm.threshold, alarm.metrics) == (FAILED_JUDGEMENTS, 0.25, {"failed_share": 0.5})
    assert alarm.describe() == "50.0% of the judgements failed > alerts.failed_share 0.25"
    assert alarms(cfg, manifest()) == []  # an iteration without the metric (none recorded) raises nothing


def test_probe_alarm_carries_the_probe_metrics():
    cfg = load_config(DEMO)
    probe = {"probe/other/share": 0.75, "probe/self0/share": 0.25, "probe/share_max": 0.75}
    assert alarms(cfg, manifest(**probe, **{"probe/alarm": 0.0})) == []
    [alarm] = alarms(cfg, manifest(**probe, **{"probe/alarm": 1.0}, failed_share=0.0, loss=0.1))
    assert alarm.event == PROBE_ALARM and alarm.threshold == cfg.probe.alarm_share
    assert alarm.metrics == {**probe, "probe/alarm": 1.0}
    assert "0.75 > probe.alarm_share 0.5" in alarm.describe()


def test_alerts_section_is_operational_and_checked():
    cfg = load_config(DEMO)
    assert cfg.alerts.failed_share == 0.05
    assert with_alerts(failed_share=0.5).hash() == cfg.hash()  # may be changed on an existing run
    with pytest.raises(ConfigError, match="alerts.failed_share"):
        with_alerts(failed_share=1.5)
    with pytest.raises(ConfigError, match="alerts.failed_shar"):
        with_alerts(failed_shar=0.5)


def test_example_automation_pauses_on_the_probe_alarm():
    """What `prefect automation create --from-file` reads (created for real in tests/e2e/test_flow_events.py)."""
    from prefect.automations import AutomationCore

    auto = AutomationCore.model_validate(
        yaml.safe_load((ROOT / "infra/automations/pause-on-probe-alarm.yaml").read_text())
    )
    assert auto.trigger.expect == {PROBE_ALARM} and [a.type for a in auto.actions] == ["pause-deployment"]


def test_the_probe_alarms_above_alarm_share_only():
    """The boundary, per evaluator: the share of probe answers judged positive, alarm when it exceeds."""
    import polars as pl

    from rlme_pipeline.judging.probe import probe_metrics

    def table(positive: dict[str, int]):
        return pl.DataFrame(
            {"evaluator": list(positive), "positive": list(positive.values()), "n": [20] * len(positive)}
        )

    at = probe_metrics(table({"other": 10, "self0": 4}), alarm_share=0.5)
    assert at == {"probe/other/share": 0.5, "probe/self0/share": 0.2, "probe/share_max": 0.5, "probe/alarm": 0.0}
    assert probe_metrics(table({"other": 11, "self0": 4}), alarm_share=0.5)["probe/alarm"] == 1.0  # 0.55 > 0.5
    assert probe_metrics(table({"other": 3}), alarm_share=0.1)["probe/alarm"] == 1.0  # 0.15 > 0.1
    assert probe_metrics(table({"other": 2}), alarm_share=0.1)["probe/alarm"] == 0.0
