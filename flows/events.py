"""Prefect events for the alarms of a committed iteration, so that an automation can act on them.

    rlme.probe.alarm          the judge-hacking probe: an evaluator judged content-free answers positive
                              (share above probe.alarm_share)
    rlme.judgements.failed    more than alerts.failed_share of the iteration's judgements failed

Each event concerns the resource `rlme.run.{run_id}`; its payload names the run, the iteration, the
threshold and the metric values. Emitted inside a flow run, Prefect adds that flow run, its flow and (for
a deployment's run) its deployment as related resources: that is how the example automation
(infra/automations/pause-on-probe-alarm.yaml, `source: inferred`) finds the deployment to pause.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect.events import Event, emit_event

from rlme_pipeline.config import Config
from rlme_pipeline.storage.run import Manifest

PROBE_ALARM = "rlme.probe.alarm"
FAILED_JUDGEMENTS = "rlme.judgements.failed"


def resource_id(run_id: str) -> str:
    return f"rlme.run.{run_id}"


@dataclass(frozen=True)
class Alarm:
    event: str
    threshold: float
    metrics: dict[str, float]  # the values that raised it (manifest metric names)

    def describe(self) -> str:
        if self.event == PROBE_ALARM:
            return (
                f"judge-hacking probe alarm: max share of master-key / vacuous answers judged positive "
                f"{self.metrics['probe/share_max']:.2f} > probe.alarm_share {self.threshold} ({self.metrics})"
            )
        return f"{self.metrics['failed_share']:.1%} of the judgements failed > alerts.failed_share {self.threshold}"


def alarms(cfg: Config, manifest: Manifest) -> list[Alarm]:
    """The alarms an iteration's metrics raise (none for an iteration without a probe or judgements)."""
    m, out = manifest.metrics, []
    if m.get("probe/alarm"):
        probe = {k: float(v) for k, v in m.items() if k.startswith("probe/")}
        out.append(Alarm(PROBE_ALARM, cfg.probe.alarm_share, probe))
    failed = m.get("failed_share")
    if failed is not None and failed > cfg.alerts.failed_share:
        out.append(Alarm(FAILED_JUDGEMENTS, cfg.alerts.failed_share, {"failed_share": float(failed)}))
    return out


def emit(alarm: Alarm, cfg: Config, run_url: str, iteration: int) -> Event | None:
    """Send the alarm to the Prefect API (queued; sent by Prefect's events worker). None when Prefect
    sends no events (no API configured)."""
    return emit_event(
        alarm.event,
        resource={"prefect.resource.id": resource_id(cfg.run.id), "prefect.resource.name": cfg.run.id},
        payload={
            "run_id": cfg.run.id,
            "run": run_url,
            "iteration": iteration,
            "threshold": alarm.threshold,
            "metrics": alarm.metrics,
            "message": alarm.describe(),
        },
    )
