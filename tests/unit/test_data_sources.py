"""Where prompts come from: every kind of `data.path` read through `datasets`, on directories that `datasets`
itself writes here (save_to_disk, to_parquet into a folder, a README with configurations as a hub repository
has, a glob), never downloaded; each mistake is one line naming the field and the fix; the prompt template;
the prompts kept by their holder, not by the module."""

from __future__ import annotations

import datasets
import polars as pl
import pytest

from rlme_pipeline import data as data_module
from rlme_pipeline.algorithm.answers import is_correct
from rlme_pipeline.config import ConfigError, validate_config
from rlme_pipeline.data import Prompts, heldout_prompts, load_prompts

GSM8K = {  # GSM8K's columns and label style
    "question": [
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many?",
        "Weng earns $12 an hour for babysitting. Yesterday, she did 50 minutes of babysitting. How much did she earn?",
        "Betty needs $100 for a wallet. She has half of it; her parents give $15 and grandparents twice as much. "
        "How much more does she need?",
    ],
    "answer": [
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
        "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\n#### 10",
        "Betty has 100 / 2 = $<<100/2=50>>50.\nShe gets 15 + 30 = 45.\nShe needs 100 - 50 - 45 = <<5>>5 more.\n#### 5",
    ],
}


def _cfg(tmp_path, **data):
    cfg = validate_config(
        {
            "data": {"prompt_column": "question", "label_column": "answer", "prompts_per_iteration": 1, **data},
            "policy": {"model": "tiny:policy"},
            "evaluators": [{"name": "e", "model": "tiny:evaluator"}],
            "questions": [{"id": "q", "text": "Is it right?"}],
        }
    )
    cfg._base_dir = tmp_path  # relative paths are relative to the config file's folder
    return cfg


def _error(cfg, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        load_prompts(cfg, **kw)
    message = str(e.value)
    assert "\n" not in message, message  # one line
    return message


@pytest.fixture(scope="module")
def gsm8k() -> datasets.Dataset:
    return datasets.Dataset.from_dict(GSM8K)


def test_save_to_disk_dataset_dict_reads_the_split(tmp_path, gsm8k):
    datasets.DatasetDict({"train": gsm8k, "test": gsm8k.select([2])}).save_to_disk(tmp_path / "gsm8k")
    test = load_prompts(_cfg(tmp_path, path="gsm8k", split="test"))
    assert test["prompt"].to_list() == [GSM8K["question"][2]] and test["prompt_id"].to_list() == ["0"]
    assert load_prompts(_cfg(tmp_path, path="gsm8k"))["label"].to_list() == GSM8K["answer"]
    message = _error(_cfg(tmp_path, path="gsm8k", split="validation"))
    assert message.startswith("data.split: 'validation' is not a split of ") and "['test', 'train']" in message


def test_save_to_disk_dataset_is_its_one_split(tmp_path, gsm8k):
    gsm8k.save_to_disk(tmp_path / "one")
    assert load_prompts(_cfg(tmp_path, path="one")).height == 3
    assert _error(_cfg(tmp_path, path="one", split="test")).startswith(
        "data.split: 'test' is not in " + str(tmp_path / "one") + ": it holds one data set, split 'train'; set "
        "data.split: train"
    )
    named = datasets.Dataset.from_dict(GSM8K, split=datasets.Split.TEST)  # as a hub split saves
    named.save_to_disk(tmp_path / "named")
    assert load_prompts(_cfg(tmp_path, path="named", split="test")).height == 3
    assert "split 'test'" in _error(_cfg(tmp_path, path="named"))


def test_folder_of_parquet_shards_split_by_file_name(tmp_path, gsm8k):
    (tmp_path / "shards").mkdir()
    gsm8k.select([0, 1]).to_parquet(tmp_path / "shards" / "train-00000-of-00002.parquet")
    gsm8k.select([2]).to_parquet(tmp_path / "shards" / "train-00001-of-00002.parquet")
    gsm8k.select([1]).to_parquet(tmp_path / "shards" / "test-00000-of-00001.parquet")
    assert load_prompts(_cfg(tmp_path, path="shards")).height == 3  # both train shards
    assert load_prompts(_cfg(tmp_path, path="shards", split="test"))["label"].to_list() == [GSM8K["answer"][1]]
    message = _error(_cfg(tmp_path, path="shards", split="validation"))
    assert message.startswith("data.split: 'validation' is not a split of ")


def test_folder_of_jsonl_files_without_split_names_is_train(tmp_path, gsm8k):
    (tmp_path / "plain").mkdir()
    gsm8k.select([0]).to_json(tmp_path / "plain" / "a.jsonl")
    gsm8k.select([1, 2]).to_json(tmp_path / "plain" / "b.jsonl")
    assert load_prompts(_cfg(tmp_path, path=str(tmp_path / "plain"))).height == 3


def test_glob_relative_to_the_config_folder(tmp_path, gsm8k, monkeypatch):
    (tmp_path / "parts").mkdir()
    for i in range(3):
        gsm8k.select([i]).to_parquet(tmp_path / "parts" / f"part-{i}.parquet")
    monkeypatch.chdir(tmp_path.parent)  # not the config's folder: the glob is found beside the config
    prompts = load_prompts(_cfg(tmp_path, path="parts/*.parquet"))
    assert sorted(prompts["prompt"]) == sorted(GSM8K["question"])
    assert _error(_cfg(tmp_path, path="parts/*.csv")).startswith(
        "data.path: the glob 'parts/*.csv' matches no file; check the pattern"
    )
    (tmp_path / "parts" / "notes.txt").write_text("x")
    assert "matches files of kinds ['.parquet', '.txt']" in _error(_cfg(tmp_path, path=str(tmp_path / "parts/*")))


def _hub_like_repo(root, gsm8k) -> str:
    """A data set laid out as openai/gsm8k is on the hub: two configurations, each with train and test files,
    declared in the README's metadata."""
    for config, rows in (("main", [0, 1]), ("socratic", [2])):
        (root / config).mkdir(parents=True)
        gsm8k.select(rows).to_parquet(root / config / "train-00000-of-00001.parquet")
        gsm8k.select(rows[:1]).to_parquet(root / config / "test-00000-of-00001.parquet")
    configs = "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train-*\n"
        f"  - split: test\n    path: {c}/test-*\n"
        for c in ("main", "socratic")
    )
    (root / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    return str(root)


def test_config_and_split_reach_load_dataset(tmp_path, gsm8k):
    """`load_dataset(path, config, split=...)` is the call a hub name gets too: here on a local repository."""
    repo = _hub_like_repo(tmp_path / "gsm8k", gsm8k)
    main = load_prompts(_cfg(tmp_path, path=repo, config="main", split="test"))
    socratic = load_prompts(_cfg(tmp_path, path=repo, config="socratic"))
    assert main["prompt"].to_list() == [GSM8K["question"][0]]
    assert socratic["prompt"].to_list() == [GSM8K["question"][2]]
    assert _error(_cfg(tmp_path, path=repo)).startswith(f"data.config: {repo} has several configurations; name one")
    assert "['main', 'socratic']" in _error(_cfg(tmp_path, path=repo))
    assert _error(_cfg(tmp_path, path=repo, config="mian")).startswith(
        f"data.config: 'mian' is not a configuration of {repo} (BuilderConfig 'mian' not found."
    )
    assert _error(_cfg(tmp_path, path=repo, config="main", split="dev")).startswith("data.split: 'dev' is not a split")
    assert _error(_cfg(tmp_path, path=repo, config="main", revision="v1")) == (
        f"data.revision: {repo!r} is a local folder, which has no revisions; remove it"
    )


def test_a_hub_name_offline_names_data_path(tmp_path):
    """The suite runs with HF_DATASETS_OFFLINE=1 (conftest): a hub name is refused without a download."""
    message = _error(_cfg(tmp_path, path="openai/gsm8k", config="main", revision="e53f048"))
    assert message.startswith(
        "data.path: 'openai/gsm8k' is neither a local file, folder or glob nor a hub data set that could be "
        "loaded at revision 'e53f048' (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set: the hub is not asked) "
        "(ConnectionError: "
    )
    assert message.endswith("Give a local path, or check the name, data.config, data.revision and the network")


@pytest.mark.parametrize(
    "path,what",
    [("one.jsonl", "a file"), ("parts/*.jsonl", "a glob"), ("saved", "a save_to_disk folder")],
)
@pytest.mark.parametrize("field", ["config", "revision"])
def test_config_and_revision_are_refused_where_they_mean_nothing(tmp_path, gsm8k, path, what, field):
    gsm8k.to_json(tmp_path / "one.jsonl")
    (tmp_path / "parts").mkdir()
    gsm8k.to_json(tmp_path / "parts" / "a.jsonl")
    gsm8k.save_to_disk(tmp_path / "saved")
    message = _error(_cfg(tmp_path, path=path, **{field: "main"}))
    assert message.startswith(f"data.{field}: ") and message.endswith(f"is {what}, which has no {field}s; remove data.{field}")  # fmt: skip


@pytest.mark.parametrize(
    "path,expected",
    [
        ("./missing.jsonl", "data.path: './missing.jsonl' is not a file, folder or glob that exists"),
        ("missing.parquet", "data.path: 'missing.parquet' is not a file, folder or glob that exists"),
        ("notes.txt", "has an unsupported extension; use .jsonl, .json, .parquet or .csv"),
    ],
)
def test_local_paths_that_do_not_load(tmp_path, path, expected):
    (tmp_path / "notes.txt").write_text("x")
    assert expected in _error(_cfg(tmp_path, path=path))


def test_a_folder_that_is_no_data_set(tmp_path):
    (tmp_path / "empty").mkdir()
    assert _error(_cfg(tmp_path, path=str(tmp_path / "empty"))).startswith(
        f"data.path: the folder {str(tmp_path / 'empty')!r} could not be read as a data set"
    )


def test_the_prompt_template_wraps_the_prompt_only(tmp_path, gsm8k):
    gsm8k.to_json(tmp_path / "g.jsonl")
    template = "{question}\nSolve the problem. Put the final answer after ####, not in \\boxed{}."
    prompts = load_prompts(_cfg(tmp_path, path="g.jsonl", prompt_template=template))
    assert prompts["prompt"][0] == GSM8K["question"][0] + template.removeprefix("{question}")
    assert prompts["label"].to_list() == GSM8K["answer"]  # labels untouched
    same = load_prompts(_cfg(tmp_path, path="g.jsonl", prompt_template=template.replace("{question}", "{prompt}")))
    assert same["prompt"].to_list() == prompts["prompt"].to_list()  # {prompt} and the column's name alike
    plain = load_prompts(_cfg(tmp_path, path="g.jsonl"))
    assert plain["prompt"].to_list() == GSM8K["question"]  # no template: the column's text


def test_the_template_substitutes_once():
    """A question that itself contains "{prompt}" is not substituted into again."""
    d = _cfg(None, path="x.jsonl", prompt_template="Q: {prompt} A: {question}").data
    assert d.templated("what is {prompt}?") == "Q: what is {prompt}? A: what is {prompt}?"


def test_a_template_without_the_prompt_is_refused():
    with pytest.raises(ConfigError, match=r"data\.prompt_template: 'Solve: \{problem\}' has no \{prompt\}: put "):
        _cfg(None, path="x.jsonl", prompt_template="Solve: {problem}")


def test_gsm8k_end_to_end_labels_are_read(tmp_path, gsm8k):
    """A GSM8K split as loaded, marked by the gsm8k format: the answers after #### decide."""
    datasets.DatasetDict({"train": gsm8k}).save_to_disk(tmp_path / "gsm8k")
    labels = load_prompts(_cfg(tmp_path, path="gsm8k"))["label"].to_list()
    said = ["So she sold 72 clips.\n#### 72", "The answer is $10.00.", "#### 4"]
    assert [is_correct(c, lab, "gsm8k") for c, lab in zip(said, labels)] == [True, True, False]


def test_heldout_reads_its_own_path_config_and_split(tmp_path, gsm8k):
    repo = _hub_like_repo(tmp_path / "repo", gsm8k)
    cfg = _cfg(tmp_path, path=repo, config="main")
    d = cfg.model_dump(mode="json")
    d["eval"] = {"every": 1, "split": "test"}
    same_source = validate_config(d)
    same_source._base_dir = tmp_path
    assert heldout_prompts(same_source)["prompt"].to_list() == [GSM8K["question"][0]]  # data's config, test
    d["eval"] = {"every": 1, "path": repo, "config": "socratic", "split": "test"}
    own = validate_config(d)
    own._base_dir = tmp_path
    assert heldout_prompts(own)["prompt"].to_list() == [GSM8K["question"][2]]
    d["eval"] = {"every": 1, "split": "test", "config": "socratic"}
    with pytest.raises(ConfigError, match=r"eval\.config: applies to eval\.path only; .* remove eval\.config"):
        validate_config(d)


def test_prompts_are_loaded_once_by_their_holder_and_afresh_by_a_new_one(tmp_path, gsm8k):
    gsm8k.to_json(tmp_path / "g.jsonl")
    held = Prompts(_cfg(tmp_path, path="g.jsonl"))
    first = held.train()
    assert held.train() is first  # kept: every iteration asks
    gsm8k.select([0]).to_json(tmp_path / "g.jsonl")  # the file changes between training calls
    assert held.train().height == 3 and Prompts(held.cfg).train().height == 1
    assert isinstance(first, pl.DataFrame)
    mutable = [k for k, v in vars(data_module).items() if isinstance(v, (dict, list, set)) and not k.startswith("__")]
    assert mutable == ["_BUILDERS"]  # a constant table; no cache lives in the module
