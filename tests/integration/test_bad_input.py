"""Bad input fails with an error naming the field and the fix, before any model loads or file is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rlme_pipeline.config import ConfigError, load_config
from rlme_pipeline.jobs.preflight import preflight
from rlme_pipeline.storage.store import StorageError, Store
from tests.conftest import ROOT, demo_variant, write_config


def _config(tmp_path, mutate) -> str:
    d = demo_variant(tmp_path / "runs", eval=None)  # no held-out eval: not what this test is about
    mutate(d)
    return str(write_config(d, tmp_path, "cfg"))


CASES = [
    (
        lambda d: d["data"].update(prompt_column="question_text"),
        ConfigError,
        "data.prompt_column: column 'question_text' is not in",
    ),
    (
        lambda d: d["evaluators"][0].update(model="./models/does-not-exist"),
        ConfigError,
        "evaluators[0].model: './models/does-not-exist' is not a model directory",
    ),
    (
        lambda d: d["evaluators"][0].update(model="tiny:judge"),
        ConfigError,
        "evaluators[0].model: unknown tiny model 'judge'",
    ),
    (
        lambda d: d["questions"][0].update(positive=[" Definitely yes"]),
        ConfigError,
        "questions[correct].positive (evaluator other): answer ' Definitely yes' is",
    ),
    (  # the tiny evaluator has a chat template: auto judges in it, and checks each answer where a reply starts
        lambda d: d["questions"][0].update(positive=["Yes."]),
        ConfigError,
        "questions[correct].positive (evaluator other): answer 'Yes.' is 2 tokens ['Yes', '.'] after the chat "
        "template's assistant header",
    ),
    (
        lambda d: d["data"].update(prompts_per_iteration=500),
        ConfigError,
        "data.prompts_per_iteration: 500 exceeds the 48 prompts",
    ),
    (
        lambda d: d["data"].update(path="/nonexistent/prompts.jsonl"),
        ConfigError,
        "data.path: '/nonexistent/prompts.jsonl' is not a file",
    ),
    (
        lambda d: d["data"].update(config="main"),
        ConfigError,
        "demo_prompts.jsonl' is a file, which has no configs; remove data.config",
    ),
    (
        lambda d: d["data"].update(path="openai/gsm8k", config="main"),  # the suite is offline (conftest)
        ConfigError,
        "data.path: 'openai/gsm8k' is neither a local file, folder or glob nor a hub data set that could be loaded",
    ),
]


@pytest.mark.parametrize("mutate, error, message", CASES)
def test_preflight_rejects_before_loading_or_writing(tmp_path, tiny_models, monkeypatch, mutate, error, message):
    from transformers import AutoModelForCausalLM

    loaded = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(a))
    cfg = load_config(_config(tmp_path, mutate))
    with pytest.raises(error) as e:
        preflight(cfg, Store(cfg.run.storage))
    assert message in str(e.value)
    assert not loaded, "a model was loaded before the input was checked"
    assert not (tmp_path / "runs" / "demo").exists(), "something was written for a run that cannot start"


def test_chat_template_on_for_an_evaluator_without_one(tmp_path, tiny_models, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = tmp_path / "plain-evaluator"  # the tiny evaluator's tokenizer without a chat template
    tok = AutoTokenizer.from_pretrained(str(tiny_models["evaluator"]))
    tok.chat_template = None
    tok.save_pretrained(plain)
    loaded = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(a))

    def mutate(d):
        d["evaluators"][0]["model"] = str(plain)
        d["scoring"] = {"chat_template": "on"}

    cfg = load_config(_config(tmp_path, mutate))
    with pytest.raises(ConfigError, match="scoring.chat_template: on, but evaluator 'other' has no chat template"):
        preflight(cfg, Store(cfg.run.storage))
    assert not loaded
    preflight(
        cfg.model_copy(update={"scoring": cfg.scoring.model_copy(update={"chat_template": "auto"})}),
        Store(cfg.run.storage),
    )


def test_unwritable_storage_root(tmp_path, tiny_models):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = load_config(_config(tmp_path, lambda d: d["run"].update(storage=str(blocker / "runs"))))
    with pytest.raises(StorageError, match="run.storage .* is not writable"):
        preflight(cfg, Store(cfg.run.storage))


def test_empty_question_list_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="questions: List should have at least 1 item"):
        load_config(_config(tmp_path, lambda d: d.update(questions=[])))


def test_cli_reports_and_exits_2_without_starting_prefect(tmp_path, tiny_models):
    path = _config(tmp_path, lambda d: d["data"].update(prompt_column="nope"))
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # any server contact would fail loudly
    out = subprocess.run(
        [sys.executable, "-m", "rlme_flows.cli", "train", path],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "data.prompt_column: column 'nope' is not in" in " ".join(out.stdout.split())
    assert not (tmp_path / "runs" / "demo").exists()


def test_changed_experiment_on_an_existing_run_is_refused(demo_cfg):
    from rlme_pipeline.storage.run import Run, RunMismatch

    run = Run(Store(demo_cfg.run.storage), demo_cfg.run.id)
    run.open(demo_cfg)
    before = json.loads(run.store.read_bytes("run.json"))
    with pytest.raises(RunMismatch, match="exists with another experiment: run.seed 0 -> 7; start a new --run-id"):
        run.open(demo_cfg.with_overrides(seed=7))
    assert json.loads(run.store.read_bytes("run.json")) == before


def test_a_gpu_index_the_machine_lacks_is_refused_before_loading(tmp_path, tiny_models, monkeypatch):
    """cuda:1 on a one-GPU machine. This machine may have no GPU, so its count is what is mocked."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = load_config(_config(tmp_path, lambda d: d["evaluators"][0].update(device="cuda:1")))
    with pytest.raises(ConfigError, match=r"^evaluators\[0\].device: 'cuda:1' but this machine has 1 CUDA device \("):
        preflight(cfg, Store(cfg.run.storage))
    ok = load_config(_config(tmp_path, lambda d: d["evaluators"][0].update(device="cuda:0")))
    preflight(ok, Store(ok.run.storage))  # cuda:0 exists: the device check lets it through
    assert not loaded and not (tmp_path / "runs" / "demo").exists()
