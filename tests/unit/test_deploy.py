"""prefect.yaml and the scheduling knobs of rlme_train, checked without a server."""

from __future__ import annotations

import inspect

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint
from rlme_tasks.steps import as_tasks

from rlme_pipeline.config import ConfigError, load_config
from rlme_pipeline.steps import STEPS
from rlme_pipeline.storage.run import split_run_url
from tests.conftest import DEMO, ROOT


def test_prefect_yaml_deployments():
    d = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {x["name"]: x for x in d["deployments"]}
    assert set(deps) == {"scheduled", "rescore", "audit", "evolve", "judge-check"}
    train = deps["scheduled"]
    assert train["entrypoint"] == "flows/train.py:rlme_train" and train["work_pool"]["name"] == "rlme-process"
    assert train["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert train["schedules"][0]["cron"] and set(train["parameters"]) == {"config", "run_uri", "advance"}
    assert d["definitions"]["work_pools"]["gpu"]["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"]
    for dep in deps.values():  # every entrypoint names a flow of this repository, taking those parameters
        flow = load_flow_from_entrypoint(str(ROOT / dep["entrypoint"]))
        assert flow.name.startswith("rlme_")
        assert set(dep.get("parameters", {})) <= set(inspect.signature(flow.fn).parameters), dep["name"]


def test_stage_timeouts_from_config_and_not_in_the_hash():
    cfg = load_config(DEMO)

    def tasks(c):  # each step as the flow runs it: a task with the step's timeout and the retry policy
        wrap = as_tasks(c.run.stage_timeout_s)
        return {name: wrap(name, lambda iteration: None) for name in STEPS}

    assert all(t.timeout_seconds is None for t in tasks(cfg).values())
    timed = tasks(cfg.with_overrides(stage_timeout_s={"update": 600, "score": 120.5, "evolve": 30}))
    assert timed["update"].timeout_seconds == 600 and timed["score"].timeout_seconds == 120.5
    assert timed["evolve"].timeout_seconds == 30  # every step may have one (it was missing from the keys)
    assert timed["generate"].timeout_seconds is None and timed["update"].retries == 2
    assert timed["probe"].task_run_name == "probe-iter-{iteration}"
    timed = cfg.with_overrides(stage_timeout_s={"update": 600, "score": 120.5})
    assert timed.hash() == cfg.hash()  # operational, like iterations: an existing run may add timeouts
    with pytest.raises(ConfigError, match="stage_timeout_s"):
        cfg.with_overrides(stage_timeout_s={"updat": 10})
    with pytest.raises(ConfigError, match="stage_timeout_s"):
        cfg.with_overrides(stage_timeout_s={"update": 0})


def test_split_run_url():
    """The one parser of {storage}/{run_id}: the deployment's run_uri, `rlme status RUN`, audit's keys."""
    assert split_run_url("s3://bucket/runs/exp-42/") == ("s3://bucket/runs", "exp-42")
    assert split_run_url("./runs/demo") == ("./runs", "demo")
    for bad in ("demo", "s3://bucket", "./runs/../x/.."):
        with pytest.raises(ValueError, match="is not a run URL|not a safe run id"):
            split_run_url(bad)


def test_rescore_questions_file_from_s3(s3):
    from rlme_pipeline.scoreset import load_questions

    uri = f"s3://{s3.name}/defs/questions.yaml"
    s3.fs.pipe(uri.removeprefix("s3://"), b"- id: brief\n  text: Is the answer brief?\n")
    assert [q.id for q in load_questions(uri)] == ["brief"]
    with pytest.raises(ConfigError, match="missing.yaml: no such file"):
        load_questions(f"s3://{s3.name}/defs/missing.yaml")


def test_local_prefect_turns_heartbeats_off_only_without_an_api_url():
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
    from rlme_flows.local_prefect import local_prefect

    default = get_current_settings().flows.heartbeat_frequency
    assert default  # Prefect's default: a heartbeat every few minutes
    with temporary_settings(restore_defaults=[PREFECT_API_URL]), local_prefect():
        # the temporary server exits with the process: nobody reads heartbeats, and each costs a flow run ~1 s
        assert get_current_settings().flows.heartbeat_frequency is None
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}), local_prefect():
        assert get_current_settings().flows.heartbeat_frequency == default  # a real server marks crashed runs
    assert get_current_settings().flows.heartbeat_frequency == default


def test_background_reports_keep_order_and_a_failed_report_is_a_warning(caplog):
    import logging

    from rlme_flows.train import background_reports

    done = []

    def report(n: int) -> None:
        if n == 2:
            raise ConnectionError("API unreachable")
        done.append(n)

    log = logging.getLogger("rlme-test-reports")
    with caplog.at_level(logging.WARNING, logger=log.name), background_reports(log) as send:
        for n in range(4):
            send(report, n=n)
    assert done == [0, 1, 3]  # one thread: artifact versions stay in iteration order; all sent before exit
    assert "API unreachable" in caplog.text  # the failure is reported, training is not failed
