"""Backend selection and configuration, without a vLLM server."""

from __future__ import annotations

import os

import pytest

from rlme_pipeline.backends import BackendError
from rlme_pipeline.backends.select import TRAINER_FILES, open_generator, serving_dir
from rlme_pipeline.config import VllmConfig, load_config
from rlme_pipeline.lineage import ModelRef
from tests.conftest import DEMO


def test_backend_choice_is_hashed_and_the_vllm_section_is_not():
    cfg = load_config(DEMO)
    d = cfg.model_dump(mode="json")
    with_vllm = cfg.model_validate({**d, "vllm": {"python": "/x/bin/python", "keep_alive": True, "retries": 9}})
    assert with_vllm.hash() == cfg.hash()
    other = cfg.model_validate({**d, "generation": {**d["generation"], "backend": "openai"}})
    assert other.hash() != cfg.hash()
    with pytest.raises(ValueError):
        cfg.model_validate({**d, "scoring": {**d["scoring"], "backend": "sglang"}})


def test_checkpoints_are_served_without_trainer_files(tmp_path):
    ck = tmp_path / "checkpoint.abc"
    ck.mkdir()
    for name in ["model.safetensors", "config.json", "tokenizer.json", *TRAINER_FILES]:
        (ck / name).write_text(name)
    view = serving_dir(str(ck))
    assert sorted(os.listdir(view)) == ["config.json", "model.safetensors", "tokenizer.json"]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_text("x")
    assert serving_dir(str(plain)) == str(plain)


def test_managed_server_needs_an_interpreter(monkeypatch, tmp_path):
    monkeypatch.delenv("RLME_VLLM_PYTHON", raising=False)
    ref = ModelRef(str(tmp_path), "v", "float32", "cpu")
    with pytest.raises(BackendError, match="RLME_VLLM_PYTHON"):
        with open_generator(VllmConfig(), ref, "openai"):
            pass
    with pytest.raises(BackendError, match="does not exist"):
        with open_generator(VllmConfig(python=str(tmp_path / "nope" / "python")), ref, "openai"):
            pass


def test_a_relative_interpreter_is_found_next_to_the_config_without_leaving_the_venv(tmp_path):
    import yaml

    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to("/usr/bin/env")
    d = yaml.safe_load(DEMO.read_text())
    d["data"]["path"] = str(DEMO.parent / d["data"]["path"])
    d["vllm"] = {"python": "venv/bin/python"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    assert load_config(tmp_path / "c.yaml").vllm_settings().python == str(venv_bin / "python")


def test_the_vllm_demo_config_loads():
    cfg = load_config(DEMO.parent / "demo-vllm.yaml")
    assert cfg.generation.backend == cfg.scoring.backend == "openai"
    assert cfg.vllm_settings().python.endswith(".venv-vllm/bin/python")
