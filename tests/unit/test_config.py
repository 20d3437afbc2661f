"""Configuration errors name the field and the fix."""

from __future__ import annotations

import pytest
import yaml

from rlme_pipeline.config import ConfigError, load_config, validate_config
from tests.conftest import DEMO


def _demo() -> dict:
    return yaml.safe_load(DEMO.read_text())


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as e:
        validate_config(data)
    return str(e.value)


def test_demo_config_is_valid_and_hash_ignores_where_and_how_far():
    cfg = load_config(DEMO)
    assert cfg.algorithm.loss == "cispo" and cfg.algorithm.eps_high == 5.0 and cfg.algorithm.beta == 0.0
    assert cfg.hash() == cfg.with_overrides(iterations=99, storage="s3://b/p").hash()
    assert cfg.hash() != cfg.with_overrides(seed=1).hash()


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d.update(questions=[]), "questions: List should have at least 1 item"),
        (lambda d: d.update(evaluators=[]), "evaluators: at least one is required (unless label_reward.share is 1"),
        (lambda d: d["generation"].update(temprature=0.7), "generation.temprature: unknown field"),
        (lambda d: d["optimizer"].update(lr=-1), "optimizer.lr: Input should be greater than 0"),
        (lambda d: d["algorithm"].update(loss="ppo"), "algorithm.loss"),
        (lambda d: d["run"].update(id="../escape"), "run.id: '../escape' is not a safe run id"),
        (lambda d: d["run"].update(id="a/b"), "run.id: 'a/b' is not a safe run id"),
        (lambda d: d["questions"][0].update(positive=[""]), "questions.0.positive: an answer string is empty"),
        (lambda d: d["questions"].append(dict(d["questions"][0])), "questions: duplicate names ['correct']"),
        (lambda d: d["scoring"].update(template="{prompt} only"), "scoring.template: the template must contain {completion}"),
        (lambda d: d.pop("policy"), "policy: required field is missing"),
        (lambda d: d["generation"].update(group_size=1), "generation.group_size"),
    ],
)
def test_errors_name_the_field(mutate, expected):
    d = _demo()
    mutate(d)
    assert expected in _error(d)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
