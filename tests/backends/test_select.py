"""Backend selection, configuration and lifetimes, without a vLLM server."""

from __future__ import annotations

import os

import pytest

from rlme_pipeline.backends import BackendError
from rlme_pipeline.backends.session import TRAINER_FILES, Backends, serving_dir
from rlme_pipeline.config import VllmConfig, load_config
from rlme_pipeline.models.weights_at import ModelRef
from tests.conftest import DEMO, demo_dict


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
        with Backends(VllmConfig()).generator(ref, "openai"):
            pass
    with pytest.raises(BackendError, match="does not exist"):
        with Backends(VllmConfig(python=str(tmp_path / "nope" / "python"))).generator(ref, "openai"):
            pass


def test_a_relative_interpreter_is_found_next_to_the_config_without_leaving_the_venv(tmp_path):
    import yaml

    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to("/usr/bin/env")
    d = demo_dict()
    d["data"]["path"] = str(DEMO.parent / d["data"]["path"])
    d["vllm"] = {"python": "venv/bin/python"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    assert load_config(tmp_path / "c.yaml").vllm_settings().python == str(venv_bin / "python")


def test_the_vllm_demo_config_loads():
    cfg = load_config(DEMO.parent / "demo-vllm.yaml")
    assert cfg.generation.backend == cfg.scoring.backend == "openai"
    assert cfg.vllm_settings().python.endswith(".venv-vllm/bin/python")


class _Server:
    """Stands in for a managed server in the lifetime rules below: it only records being stopped."""

    def __init__(self, name: str, log: list):
        self.name, self.log, self.up = name, log, True

    def alive(self) -> bool:
        return self.up

    def stop(self) -> None:
        self.up = False
        self.log.append(f"stop {self.name}")


def _use(b: Backends, name: str, log: list, fail: bool = False) -> None:
    def make():
        log.append(f"start {name}")
        b._started(1.5)
        return _Server(name, log)

    with b._resource(("server", name), make) as srv:
        assert b.in_use == [srv] and srv.name == name
        if fail:
            raise RuntimeError("stage failed")
    assert b.in_use == []


def test_servers_live_as_long_as_their_owner_says():
    log = []
    with Backends(VllmConfig()) as b:  # no keep_alive: a server lives for one stage
        with b.starts() as started:
            _use(b, "a", log)
            _use(b, "a", log)
        assert log == ["start a", "stop a", "start a", "stop a"] and started == [("start", 1.5), ("start", 1.5)]
    log.clear()
    with Backends(VllmConfig(keep_alive=True)) as b:  # kept for the next stage on the same weights, one at a time
        _use(b, "a", log)
        _use(b, "a", log)
        with b.starts() as started:
            _use(b, "b", log)  # other weights: a goes first
        assert started == [("start", 1.5)]
        with pytest.raises(RuntimeError):
            _use(b, "b", log, fail=True)  # a stage that fails stops the server it used
        _use(b, "c", log)
        assert log == ["start a", "stop a", "start b", "stop b", "start c"]
    assert log[-1] == "stop c"  # closing the owner stops what it kept alive


def test_each_owner_has_its_own_models(tiny_models):
    path = str(tiny_models["policy"])
    ref = ModelRef(path, "v", "float32", "cpu")
    with Backends() as one, Backends() as two:
        with one.generator(ref) as (gen1, _), two.generator(ref) as (gen2, _):
            assert gen1.model is not gen2.model
        with one.judge(ref) as (judge, _):
            assert judge.model is gen1.model  # the stages of one owner share a loaded model
    assert not one.pool._items and not two.pool._items
