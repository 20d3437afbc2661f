"""rlme_train through a real Prefect server: tasks run, artifacts land, a second call continues the run."""

from __future__ import annotations

import json

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from rlme_flows.train import artifact_key, rlme_train

from tests.conftest import DEMO


def test_flow_trains_publishes_metrics_and_continues(prefect_server, tiny_models, tmp_path):
    storage = str(tmp_path / "runs")
    first = rlme_train(config=str(DEMO), iterations=2, storage=storage, run_id="flow-test")
    assert first["committed"] == [0, 1] and first["trained_now"] == [0, 1]
    second = rlme_train(config=str(DEMO), iterations=3, storage=storage, run_id="flow-test")
    assert second["committed"] == [0, 1, 2] and second["trained_now"] == [2]

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key("flow-test")]))
        )
        runs = client.read_flow_runs()
        task_runs = client.read_task_runs()
    assert len(arts) == 3  # one metrics table per trained iteration
    # sent from a background thread, still linked to the flow run that trained the iteration
    assert {a.flow_run_id for a in arts} <= {r.id for r in runs} and None not in {a.flow_run_id for a in arts}
    metrics = {row["metric"] for row in json.loads(arts[0].data)}
    assert {"reward_mean", "loss", "clip_ratio", "failed_share", "completion_tokens_mean", "seconds/update"} <= metrics
    assert any(m.startswith("other/correct/") for m in metrics)
    assert sum(r.state.is_completed() for r in runs if r.name) >= 2
    names = sorted(t.name for t in task_runs if t.name.endswith("iter-2"))
    # the demo's held-out eval runs every iteration: a task of its own
    assert names == [
        "aggregate-iter-2",
        "commit-iter-2",
        "eval-iter-2",
        "generate-iter-2",
        "score-iter-2",
        "update-iter-2",
    ]
