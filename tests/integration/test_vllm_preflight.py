"""A vLLM backend that cannot run here is refused at preflight, in one line naming the field and the fix.

It used to pass preflight and fail inside the generate task after ~43 s with a ModuleNotFoundError and 535
lines of traceback. The test virtualenv has no vllm (that is the point: the pipeline's venv need not).
"""

from __future__ import annotations

import importlib.util

import pytest
import yaml
from rlme_flows.cli import app
from typer.testing import CliRunner

from rlme_pipeline.config import ConfigError, validate_config
from rlme_pipeline.jobs.preflight import preflight
from rlme_pipeline.storage.store import Store
from tests.conftest import demo_dict

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is importable here")


def _dict(tmp_path, **sections) -> dict:
    d = demo_dict()
    d["run"].update(storage=str(tmp_path / "runs"))
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return d


@pytest.mark.parametrize("field", ["generation", "scoring"])
def test_vllm_backend_without_vllm_is_one_line_at_preflight(tmp_path, tiny_models, field):
    cfg = validate_config(_dict(tmp_path, **{field: {"backend": "vllm"}}))
    with pytest.raises(ConfigError) as e:
        preflight(cfg, Store(cfg.run.storage))
    assert str(e.value) == (
        f"{field}.backend: vllm runs vllm.LLM in this process, but the vllm package is not importable here; "
        f"pip install 'rlme[vllm]' (a GPU host), or set {field}.backend: openai with vllm.python naming an "
        f"interpreter that has vllm (make vllm-venv), or set {field}.backend: hf"
    )
    assert not (tmp_path / "runs").exists()


def test_with_vllm_python_set_the_fix_is_the_openai_backend(tmp_path, tiny_models):
    cfg = validate_config(_dict(tmp_path, generation={"backend": "vllm"}, vllm={"python": "/opt/vllm/bin/python"}))
    with pytest.raises(ConfigError, match=r"set generation.backend: openai to use the vLLM in vllm.python \(/opt/vllm"):
        preflight(cfg, Store(cfg.run.storage))


def test_openai_backend_needs_an_interpreter_or_a_url(tmp_path, tiny_models, monkeypatch):
    monkeypatch.delenv("RLME_VLLM_PYTHON", raising=False)
    cfg = validate_config(_dict(tmp_path, scoring={"backend": "openai"}))
    with pytest.raises(ConfigError, match=r"^scoring.backend: openai without vllm.url .* set vllm.python or RLME_VLLM_PYTHON"):  # fmt: skip
        preflight(cfg, Store(cfg.run.storage))
    monkeypatch.setenv("RLME_VLLM_PYTHON", "/opt/vllm/bin/python")
    preflight(cfg, Store(cfg.run.storage))  # a managed server can start: the stage starts it


def test_rlme_train_exits_2_with_the_line_before_prefect(tmp_path, tiny_models, monkeypatch):
    import rlme_flows.cli

    monkeypatch.setattr(rlme_flows.cli, "local_prefect", lambda *a, **k: pytest.fail("Prefect was started"))
    config = tmp_path / "vllm.yaml"
    config.write_text(yaml.safe_dump(_dict(tmp_path, generation={"backend": "vllm"})))
    r = CliRunner().invoke(app, ["train", str(config)], terminal_width=100)
    out = r.output.strip()
    assert r.exit_code == 2, out
    assert out.startswith("error: generation.backend: vllm runs vllm.LLM in this process") and "\n" not in out, out
    assert not (tmp_path / "runs").exists()
