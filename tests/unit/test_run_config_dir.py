"""A run's stored config resolves its relative paths against the folder of the config it was created from,
so `rlme rescore/evolve/audit/export` of the run work from any directory (a `gguf:../models/x.gguf` judge
or LoRA base included), while the snapshot itself, and so the config hash, keeps the paths as written."""

from __future__ import annotations

import shutil

import yaml

from rlme_pipeline.config import load_config
from rlme_pipeline.storage.run import Run
from tests.conftest import demo_dict


def test_the_stored_config_resolves_relative_paths_from_its_own_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    (folder.parent / "models").mkdir()
    (folder.parent / "models" / "judge.gguf").write_bytes(b"GGUF")
    d = demo_dict()
    shutil.copy(d["data"]["path"], folder.parent / "prompts.jsonl")
    d["data"]["path"] = "../prompts.jsonl"
    d["evaluators"][0]["model"] = "gguf:../models/judge.gguf"
    d["run"]["storage"] = str(tmp_path / "runs")
    (folder / "run.yaml").write_text(yaml.safe_dump(d))
    cfg = load_config(folder / "run.yaml")
    run = Run.for_config(cfg)
    run.open(cfg)

    monkeypatch.chdir(tmp_path)  # elsewhere: the relative paths mean nothing here
    stored = run.config()
    assert stored.data.path == "../prompts.jsonl" and stored.hash() == cfg.hash()  # the snapshot as written
    assert stored.resolve(stored.data.path) == str(folder.parent / "prompts.jsonl")
    assert stored.resolve(stored.evaluators[0].model) == f"gguf:{folder.parent / 'models' / 'judge.gguf'}"

    shutil.rmtree(folder)  # the checkout moved: the current directory, as before
    monkeypatch.chdir(folder.parent.parent)
    assert run.config().resolve("project/prompts.jsonl") == str(folder.parent / "prompts.jsonl")
    assert run.config().resolve("../prompts.jsonl") == "../prompts.jsonl"
