"""Importing pretrained models: SmolLM2-135M-Instruct from its real GGUF file gives the GGUF-loaded model's
logits, tokens and chat template; `gguf:PATH` references resolve to the import and pass preflight; an import
is atomic (a killed one leaves nothing that looks finished, concurrent ones both end with a valid directory)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.tokenization_utils_base import BatchEncoding

from rlme_pipeline.config import ConfigError, load_config
from rlme_pipeline.jobs.preflight import preflight
from rlme_pipeline.models import importing
from rlme_pipeline.models.importing import RECORD, ImportFailed, import_model
from rlme_pipeline.models.loading import ModelPool, resolve_ref
from rlme_pipeline.storage.store import Store
from tests.conftest import ROOT, demo_dict

CHAT = [{"role": "user", "content": "Is 17 a prime number? Answer yes or no."}]


def test_smollm2_import_gives_the_gguf_models_logits_tokens_and_chat_template(smollm2_gguf, smollm2_dir):
    where = {"pretrained_model_name_or_path": smollm2_gguf.parent, "gguf_file": smollm2_gguf.name}
    gguf_model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
    gguf_tok = AutoTokenizer.from_pretrained(**where)
    lm = ModelPool().get(str(smollm2_dir))  # the pipeline's own loading path: from_pretrained on the directory

    assert lm.tokenizer.chat_template and lm.tokenizer.chat_template == gguf_tok.chat_template
    enc = lm.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    assert isinstance(enc, BatchEncoding)  # transformers 5
    ids = list(enc["input_ids"])
    assert ids == list(gguf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert lm.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert [lm.tokenizer.encode(w, add_special_tokens=False) for w in (" Yes", " No")] == [[9230], [2838]]

    with torch.no_grad():
        x = torch.tensor([ids])
        assert torch.equal(lm.model(x).logits, gguf_model(x).logits)

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152
    assert round(sum(p.numel() for p in lm.model.parameters()) / 1e6, 1) == 134.5
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "generation_config.json").is_file()
    record = json.loads((smollm2_dir / RECORD).read_text())
    assert record["source"]["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _config(tmp_path, policy: str, evaluator: str):
    d = demo_dict()
    d["run"].update(storage=str(tmp_path / "runs"))
    d["policy"]["model"] = policy
    d["evaluators"] = [{"name": "smol", "model": evaluator}]
    d.pop("eval", None)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(d))
    return load_config(path)


def test_gguf_references_resolve_to_the_import_and_pass_preflight(smollm2_gguf, smollm2_dir, tmp_path):
    # a path relative to the config file's folder, to a copy under another name: the import is keyed by content
    (tmp_path / "models").mkdir()
    os.symlink(smollm2_gguf, tmp_path / "models" / "smol.gguf")
    cfg = _config(tmp_path, "gguf:models/smol.gguf", f"gguf:{smollm2_gguf}")
    started = time.perf_counter()
    preflight(cfg, Store(cfg.run.storage))
    assert time.perf_counter() - started < 20, "preflight re-imported an imported GGUF file"
    assert resolve_ref(cfg.resolve(cfg.policy.model)) == str(smollm2_dir)
    assert resolve_ref(f"gguf:{smollm2_gguf}") == str(smollm2_dir)


def test_a_bad_gguf_reference_fails_preflight_naming_the_field_before_anything_loads(tmp_path, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("a model or tokenizer was loaded before the reference was checked")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_loading)
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a GGUF file")
    cases = [
        (f"gguf:{tmp_path / 'missing.gguf'}", "evaluators[0].model: 'gguf:", "no GGUF file at"),
        (f"gguf:{not_gguf}", "evaluators[0].model: 'gguf:", "is not a GGUF file"),
    ]
    for ref, field, what in cases:
        cfg = _config(tmp_path, "tiny:policy", ref)
        with pytest.raises(ConfigError) as e:
            preflight(cfg, Store(cfg.run.storage))
        assert str(e.value).startswith(field) and what in str(e.value) and "\n" not in str(e.value), e.value
    monkeypatch.undo()
    cfg = _config(tmp_path, "tiny:policy", str(not_gguf))  # a GGUF path without the prefix: the fix is named
    with pytest.raises(ConfigError, match=r"evaluators\[0\].model: .* for a GGUF file write 'gguf:"):
        preflight(cfg, Store(cfg.run.storage))


def test_hf_directory_import_is_the_same_model_and_refuses_pickles(tiny_models, tmp_path):
    out = import_model(str(tiny_models["evaluator"]))
    assert out.parent == importing.imports_dir() and json.loads((out / RECORD).read_text())["source"]["kind"] == "dir"
    src = AutoModelForCausalLM.from_pretrained(tiny_models["evaluator"]).eval()
    got = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.tensor([[1, 5, 9, 200, 17]])
    with torch.no_grad():
        assert torch.equal(src(x).logits, got(x).logits)
    assert import_model(str(tiny_models["evaluator"])) == out  # cached: the same directory, nothing redone
    mode = os.stat(out).st_mode & 0o777
    assert all(os.stat(f).st_mode & 0o044 == 0o044 for f in out.iterdir()) and mode & 0o055 == 0o055

    # --out: an existing import of the same source is reused; anything else there is refused, not overwritten
    assert import_model(str(tiny_models["evaluator"]), out=str(tmp_path / "mine")) == tmp_path / "mine"
    assert import_model(str(tiny_models["evaluator"]), out=str(tmp_path / "mine")) == tmp_path / "mine"
    with pytest.raises(ImportFailed, match=r"out .* exists and holds no import of"):
        import_model(str(tiny_models["policy"]), out=str(tmp_path / "mine"))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_models["evaluator"] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ImportFailed, match="never loads pickled"):
        import_model(str(pickled))


def test_a_hub_id_offline_fails_in_one_line_naming_the_fix():
    with pytest.raises(ImportFailed) as e:
        import_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # HF_HUB_OFFLINE=1 in the test-suite
    assert "downloading it from the hub failed" in str(e.value) and "\n" not in str(e.value)


def test_a_killed_import_leaves_nothing_that_looks_finished(tiny_models, tmp_path, monkeypatch):
    """`rlme models import` SIGKILLed half-way (weights written, tokenizer and record not): no directory that
    a later import or a model reference takes for finished; the next import makes it whole and removes the
    dead process's staging directory."""
    monkeypatch.setenv("RLME_CACHE", str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "rlme_flows.cli", "models", "import", str(tiny_models["evaluator"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RLME_CRASH_AT": "import:mid"}
    killed = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    left = list(importing.imports_dir().iterdir())
    assert [d.name.startswith(importing.STAGING) for d in left] == [True], left
    assert (left[0] / "model.safetensors").is_file() and not (left[0] / RECORD).exists()

    out = import_model(str(tiny_models["evaluator"]))
    assert AutoTokenizer.from_pretrained(out).chat_template and (out / RECORD).is_file()
    assert list(importing.imports_dir().iterdir()) == [out]


def test_two_imports_racing_both_end_with_the_one_valid_directory(tiny_models, tmp_path, monkeypatch):
    """Both imports finish converting before either installs (a barrier in front of the rename): the loser's
    rename fails on the winner's directory, and it returns that directory instead of failing."""
    monkeypatch.setenv("RLME_CACHE", str(tmp_path / "cache"))
    barrier, real_install = threading.Barrier(2, timeout=120), importing.install

    def install_together(staging, target, key):
        barrier.wait()
        real_install(staging, target, key)

    monkeypatch.setattr(importing, "install", install_together)
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda _: import_model(str(tiny_models["policy"])), range(2))
    assert a == b and list(importing.imports_dir().iterdir()) == [a]  # no staging directory left either
    got = AutoModelForCausalLM.from_pretrained(a).eval()
    src = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).eval()
    with torch.no_grad():
        assert torch.equal(got(torch.tensor([[1, 7, 42]])).logits, src(torch.tensor([[1, 7, 42]])).logits)


def test_install_keeps_the_first_finished_import_and_refuses_a_foreign_directory(tmp_path):
    def staged(name: str, key: str):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / RECORD).write_text(json.dumps({"key": key}))
        return d

    target = tmp_path / "target"
    importing.install(staged("first", "k1"), target, "k1")
    importing.install(staged("second", "k1"), target, "k1")  # lost the race: the winner's directory stands
    assert json.loads((target / RECORD).read_text())["key"] == "k1" and (tmp_path / "second").exists()
    with pytest.raises(ImportFailed, match="holds something else"):
        importing.install(staged("third", "k2"), target, "k2")
