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
        (
            lambda d: d["scoring"].update(template="{prompt} only"),
            "scoring.template: the template must contain {completion}",
        ),
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


# --- the hash: an allow-list every field declares itself into ----------------------------------------

import types  # noqa: E402
import typing  # noqa: E402

from pydantic import BaseModel  # noqa: E402

from rlme_pipeline.config import Config, Section, hash_rule, sha256_json  # noqa: E402


def _sections(annotation) -> list[type[BaseModel]]:
    """Section classes inside an annotation: X, list[X], X | None, dict[str, X], Annotated[...]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [s for a in typing.get_args(annotation) for s in _sections(a)]


def undeclared(model: type[BaseModel], seen: set | None = None) -> list[str]:
    """Every field, in any section reachable from model, that does not say whether it is hashed."""
    seen = set() if seen is None else seen
    if model in seen:
        return []
    seen.add(model)
    out = []
    for name, f in model.model_fields.items():
        try:
            hash_rule(model, name)
        except TypeError:
            out.append(f"{model.__name__}.{name}")
        if not f.description:
            out.append(f"{model.__name__}.{name} (no description)")
        for sub in _sections(f.annotation):
            out += undeclared(sub, seen)
    return out


def test_every_config_field_declares_whether_it_is_part_of_the_experiment():
    assert undeclared(Config) == []


def test_an_undeclared_field_is_caught_by_the_walk_and_by_the_hash():
    from pydantic import Field

    from rlme_pipeline.config import experiment

    class Inner(Section):
        declared: int = experiment(1, "a declared field")
        silent: int = Field(2, description="declares nothing")

    class Outer(Section):
        inner: list[Inner] | None = experiment(None, "a nested section")

    assert undeclared(Outer) == ["Inner.silent"]
    cfg = load_config(DEMO)
    Planted = types.new_class(
        "Planted",
        (Config,),
        exec_body=lambda ns: ns.update(
            __annotations__={"extra_knob": int}, extra_knob=Field(0, description="declares nothing")
        ),
    )
    with pytest.raises(TypeError, match="Planted.extra_knob does not say whether it is part of the experiment"):
        Planted.model_validate(cfg.model_dump(mode="json")).hash()


def legacy_hash(cfg) -> str:
    """Config.hash as it was: a hand-kept list of fields popped by name. Runs made with it must resume."""
    d = cfg.model_dump(mode="json")
    d["run"] = {
        k: v for k, v in d["run"].items() if k not in ("iterations", "storage", "storage_options", "stage_timeout_s")
    }
    d.pop("vllm")
    d.pop("probe")
    if d.get("label_reward") is None:
        d.pop("label_reward", None)
    if d["policy"].get("lora") is None:  # added after the legacy hash; hashed only when set
        d["policy"].pop("lora", None)
    d["optimizer"].pop("logprob_chunk_tokens")
    d["optimizer"].pop("gradient_checkpointing")  # added after the legacy hash; operational
    for k, default in (("lr_decay_iterations", 0), ("lr_final_ratio", 0.1)):  # added later; hashed only when set
        if d["optimizer"][k] == default:
            d["optimizer"].pop(k)
    d.pop("tracking")  # added after the legacy hash; operational
    d.pop("alerts")  # added after the legacy hash; operational
    d.pop("distributed")  # added after the legacy hash; operational
    d.pop("checkpoint")  # added after the legacy hash; operational (retention)
    d.pop("eval")  # added after the legacy hash; operational
    if d.get("evolve") is None:  # added after the legacy hash; hashed only when set
        d.pop("evolve", None)
    for k in ("config", "revision", "prompt_template"):  # added after the legacy hash; hashed only when set
        if d["data"][k] is None:
            d["data"].pop(k)
    if d.get("answers") is None:  # added after the legacy hash; hashed only when set
        d.pop("answers", None)
    if d["scoring"]["chat_template"] == "auto":  # added after the legacy hash; hashed only when set
        d["scoring"].pop("chat_template")
    return sha256_json(d)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: None,
        lambda d: d.update(label_reward={"share": 0.1}),
        lambda d: d.update(label_reward={"share": 1.0, "extractor": "boxed", "weight": 2.0}, evaluators=[]),
        lambda d: d.update(vllm={"url": "http://x:8000", "max_concurrency": 3}, probe={"every": 0}),
        lambda d: d["run"].update(
            storage="s3://b/p", storage_options={"endpoint_url": "http://m:9000"}, stage_timeout_s={"score": 9}
        ),
        lambda d: d["optimizer"].update(logprob_chunk_tokens=1024, lr=3e-4),
        lambda d: d["data"].update(system_prompt="Be brief.", id_column=None),
        lambda d: d["evaluators"][0].update(dtype="bfloat16", device="cuda"),
        lambda d: d["policy"].update(lora={"r": 8, "target_modules": ["q_proj"]}),
        lambda d: d.update(distributed={"processes": 4, "backend": "gloo"}),
        lambda d: d["optimizer"].update(lr_decay_iterations=30),
        lambda d: d["scoring"].update(chat_template="off"),
        lambda d: d["scoring"].update(chat_template="auto"),
    ],
)
def test_hash_is_the_legacy_hash_so_existing_runs_resume(mutate):
    d = _demo()
    d["data"]["path"] = "data.jsonl"  # the path as written is what is hashed; it need not exist to validate
    mutate(d)
    cfg = validate_config(d)
    assert cfg.hash() == legacy_hash(cfg)


def test_demo_hash_is_pinned():
    """Changing it makes every existing demo run refuse to resume: do it only on purpose."""
    assert load_config(DEMO).hash() == "432816bdd51155e741286827e6e37fb6c1f2c82b38a6317b9bbfb4e54f1dec03"


def test_hash_covers_nested_experiment_fields_and_skips_operational_ones():
    d = _demo()
    base = validate_config(d).hash()
    for path, value, same in [
        (("questions", 0, "positive"), [" Yes"], False),
        (("evaluators", 1, "weight"), 0.25, False),
        (("scoring", "logp_floor"), -5.0, False),
        (("scoring", "chat_template"), "auto", True),  # the default: configs written before it keep their hash
        (("scoring", "chat_template"), "off", False),
        (("scoring", "chat_template"), "on", False),
        (("vllm", "timeout_s"), 5.0, True),
        (("probe", "alarm_share"), 0.9, True),
        (("run", "iterations"), 50, True),
        (("eval", "temperature"), 0.7, True),
    ]:
        e = _demo()
        node = e
        for k in path[:-1]:
            node = node.setdefault(k, {}) if isinstance(node, dict) else node[k]
        node[path[-1]] = value
        assert (validate_config(e).hash() == base) is same, path


# --- the one answer format, and the data fields added with it ----------------------------------------


def _lr(d, **fields):
    d["label_reward"] = {"share": 0.1, **fields}


@pytest.mark.parametrize(
    "mutate, fmt",
    [
        (lambda d: None, "auto"),
        (lambda d: _lr(d), "answer_is"),  # the label reward's default: what such runs computed
        (lambda d: _lr(d, extractor="boxed"), "boxed"),
        (lambda d: d["eval"].update(extractor="last_number"), "last_number"),
        (lambda d: (_lr(d), d["eval"].update(extractor="boxed")), "answer_is"),  # the label reward's wins
        (lambda d: (_lr(d), d.update(answers={"format": "gsm8k"})), "gsm8k"),  # its default extractor means nothing
        (lambda d: (_lr(d, extractor="boxed"), d.update(answers={"format": "boxed"})), "boxed"),
        (lambda d: (d["eval"].update(extractor="auto"), d.update(answers={"format": "auto"})), "auto"),
        (lambda d: d.update(answers={}), "auto"),
    ],
)
def test_one_answer_format_for_every_reader(mutate, fmt):
    d = _demo()
    mutate(d)
    cfg = validate_config(d)
    assert cfg.answer_format() == fmt
    assert cfg.with_overrides(iterations=3).answer_format() == fmt  # a dump read back means the same


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda d: (_lr(d, extractor="boxed"), d.update(answers={"format": "gsm8k"})),
            "label_reward.extractor: 'boxed' contradicts answers.format 'gsm8k'; one format serves the label "
            "reward, eval, the audit and evolve: remove the deprecated label_reward.extractor",
        ),
        (
            lambda d: (d["eval"].update(extractor="auto"), d.update(answers={"format": "math"})),
            "eval.extractor: 'auto' contradicts answers.format 'math'; one format serves the label reward, eval, "
            "the audit and evolve: remove the deprecated eval.extractor",
        ),
        (lambda d: d.update(answers={"format": "regex"}), "answers.format: Input should be 'auto', 'gsm8k', 'math'"),
        (lambda d: d["data"].update(prompt_template="Solve."), "data.prompt_template: 'Solve.' has no {prompt}"),
        (lambda d: d["eval"].update(revision="abc"), "eval.revision: applies to eval.path only"),
    ],
)
def test_answer_and_data_errors_name_the_field(mutate, message):
    d = _demo()
    mutate(d)
    if "eval.revision" in message:
        d["eval"].pop("path")
        d["eval"]["split"] = "test"
    assert message in _error(d)


def test_deprecated_extractors_warn_from_the_file_only(tmp_path):
    d = _demo()
    d["data"]["path"] = str(DEMO.parent / d["data"]["path"])
    d["eval"]["path"] = str(DEMO.parent / d["eval"]["path"])
    _lr(d, extractor="boxed")
    d["eval"]["extractor"] = "auto"
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.warns(FutureWarning) as caught:
        cfg = load_config(path)
    said = [str(w.message) for w in caught]
    assert said == [
        f"{path}: label_reward.extractor is deprecated: set answers.format: boxed instead (one format for the label "
        "reward, eval, the audit and evolve); while answers is unset it is still read",
        f"{path}: eval.extractor is deprecated: set answers.format instead; this config reads answers as 'boxed' "
        "(label_reward.extractor)",
    ]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(DEMO)  # sets neither
        validate_config(cfg.model_dump(mode="json"))  # a dump holds every default: it says nothing


def test_new_data_and_answer_fields_are_hashed_when_set_and_eval_fields_never():
    base = validate_config(_demo()).hash()
    for mutate, same in [
        (lambda d: d["data"].update(config="main"), False),
        (lambda d: d["data"].update(revision="e53f048"), False),
        (lambda d: d["data"].update(prompt_template="{prompt} Put the final answer after ####."), False),
        (lambda d: d.update(answers={"format": "auto"}), False),  # set, even to its default: hashed
        (lambda d: d["data"].update(config=None, revision=None, prompt_template=None), True),
        (lambda d: d["eval"].update(samples=8, sample_temperature=0.7), True),
        (lambda d: d["eval"].update(extractor="boxed"), True),
    ]:
        d = _demo()
        mutate(d)
        assert (validate_config(d).hash() == base) is same, d
    a, b = _demo(), _demo()
    a["answers"], b["answers"] = {"format": "gsm8k"}, {"format": "math"}
    assert validate_config(a).hash() != validate_config(b).hash()


@pytest.mark.parametrize("text, value", [("on", "on"), ("off", "off"), ("'on'", "on"), ("auto", "auto"), ("yes", "on")])
def test_chat_template_reads_yaml_on_and_off_as_words(tmp_path, text, value):
    """PyYAML reads a bare `on`/`off` (and yes/no) as booleans; `scoring.chat_template: on` must still mean on."""
    d = _demo()
    d["data"]["path"] = "data.jsonl"
    path = tmp_path / "c.yaml"
    d["scoring"]["chat_template"] = "PLACEHOLDER"
    path.write_text(yaml.safe_dump(d).replace("chat_template: PLACEHOLDER", f"chat_template: {text}"))
    assert load_config(path).scoring.chat_template == value
