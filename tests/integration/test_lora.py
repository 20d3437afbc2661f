"""LoRA policies end to end on the tiny demo: only the adapter trains, one base in memory serves the
policy, the frozen self and the KL reference; checkpoints are adapters; resume, re-score and audit work."""

from __future__ import annotations

import json

import polars as pl
import pytest
import transformers
import yaml
from safetensors.torch import load_file

from rlme_pipeline import scoreset
from rlme_pipeline.config import ConfigError, validate_config
from rlme_pipeline.jobs.audit import audit
from rlme_pipeline.jobs.preflight import preflight
from rlme_pipeline.jobs.rescore import rescore
from rlme_pipeline.jobs.train import train
from rlme_pipeline.models import checkpoint
from rlme_pipeline.models.loading import weights_version
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.store import Store
from tests.conftest import DEMO, demo_dict
from tests.requires import require

LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}


def lora_cfg(root, lora=LORA, iterations=2, **over):
    require("peft")
    d = demo_dict()
    d["run"].update(storage=str(root / "runs"), iterations=iterations)
    d["data"].update(prompts_per_iteration=4)
    d.pop("eval", None)  # no held-out eval: not what this test is about
    d["policy"]["lora"] = lora
    d["evaluators"] = [
        {"name": "other", "model": "tiny:evaluator"},
        {"name": "frozen", "model": "policy@initial", "weight": 0.5},
        {"name": "live", "model": "policy", "weight": 0.5},
    ]
    d["algorithm"]["beta"] = 0.05  # the KL reference is the base with the adapters off
    d["probe"]["every"] = 0
    for section, fields in over.items():
        d.setdefault(section, {}).update(fields)
    return validate_config(d)


class Loads:
    """Counts the models transformers loads (every call goes on to the real from_pretrained)."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        real = transformers.AutoModelForCausalLM.from_pretrained.__func__

        def counting(cls, path, *a, **kw):
            self.paths.append(str(path))
            return real(cls, path, *a, **kw)

        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(counting))


def _contents(cfg) -> dict[str, str]:
    """logical name -> sha256 of every committed file of iterations 0 and 1."""
    return {f.logical: f.sha256 for i in (0, 1) for f in Run.for_config(cfg).manifest(i).files}


def _ckpt(run: Run, i: int) -> dict[str, str]:
    files = checkpoint.files_of(run.manifest(i).files, i)
    return {f.logical.rpartition("/checkpoint/")[2]: run.store.abs(f.path) for f in files}


def test_lora_run_trains_the_adapter_on_one_base_in_memory(tiny_models, tmp_path, monkeypatch):
    loads = Loads(monkeypatch)
    cfg = lora_cfg(tmp_path)
    run = Run.for_config(cfg)
    made = train(cfg, run)
    # one process, one copy of the policy's base: the live self, the frozen self and the KL reference
    # are all that model (the other evaluator is the only other load)
    assert sorted(loads.paths) == sorted([str(tiny_models["policy"]), str(tiny_models["evaluator"])]), loads.paths

    base_hash = weights_version(str(tiny_models["policy"]))
    assert len(made) == 2
    for i in (0, 1):
        files = _ckpt(run, i)
        assert "adapter_model.safetensors" in files and "adapter_config.json" in files
        assert "model.safetensors" not in files and "config.json" not in files
        adapter = load_file(files["adapter_model.safetensors"])
        assert adapter and all("lora_" in k for k in adapter), list(adapter)[:3]
        assert json.loads(open(files["adapter_config.json"]).read())["r"] == 4
        state = json.loads(open(files["trainer_state.json"]).read())
        assert state["base"] == {"ref": "tiny:policy", "sha256": base_hash}
        # the optimizer holds state for the adapter's parameters only
        opt = checkpoint.load_optimizer_state(files["adapter_config.json"].rpartition("/")[0])
        assert len(opt["state"]) == len(adapter)
        assert {k for s in opt["state"].values() for k in s} == {"step", "exp_avg", "exp_avg_sq"}
        update = run.read_record(i, "update")
        assert update.info["policy_after"] == checkpoint.weights_entry(run.manifest(i).files).sha256
        assert update.info["policy_after"] != update.info["policy_before"]
    assert run.read_record(1, "update").info["policy_before"] == run.read_record(0, "update").info["policy_after"]

    scores = pl.concat([run.read_table(i, "scores.parquet").with_columns(it=pl.lit(i)) for i in (0, 1)])
    per = scores.group_by("it", "evaluator").agg(pl.col("logp_yes").sort_by("rollout_id", "question_id"))
    by = {(r["it"], r["evaluator"]): r for r in per.to_dicts()}
    # iteration 0: the policy is the base, so the live self judges exactly as the frozen self
    assert by[(0, "live")]["logp_yes"] == by[(0, "frozen")]["logp_yes"]
    # iteration 1: the live self has a trained adapter, the frozen self has it switched off
    assert by[(1, "live")]["logp_yes"] != by[(1, "frozen")]["logp_yes"]


def test_lora_resume_in_a_new_process_is_byte_identical(tiny_models, tmp_path):
    straight = lora_cfg(tmp_path / "a")
    train(straight, Run.for_config(straight))
    resumed = lora_cfg(tmp_path / "b")
    train(resumed.with_overrides(iterations=1), Run.for_config(resumed))
    # each train() opens its own Backends (model pool): like a new process, iteration 1 loads the base
    # from the config and the adapter (and its optimizer state, and the RNG for dropout) from checkpoint 0
    train(resumed, Run.for_config(resumed))
    assert _contents(straight) == _contents(resumed)


def test_rescore_and_audit_of_a_lora_run_reproduce_training_judgements(tiny_models, tmp_path):
    cfg = lora_cfg(tmp_path)
    run = Run(Store(cfg.run.storage), cfg.run.id)
    train(cfg, run)
    # re-score with training's own questions and evaluators, in a fresh process's pool: the live self of
    # iteration 1 is the base plus checkpoint 0's adapter, the frozen self the base with adapters off
    rescore(run, "again", questions=list(cfg.questions), shard_rows=10)
    key = ["rollout_id", "question_id"]
    for i in (0, 1):
        trained = run.read_table(i, "scores.parquet")
        again = scoreset.read_table(run, "again", i, "scores.parquet")
        assert again.height == trained.height
        logp = {
            (src, ev): t.filter(pl.col("evaluator") == ev).sort(key)["logp_yes"].to_numpy()
            for src, t in (("train", trained), ("again", again))
            for ev in ("frozen", "live", "other")
        }
        for ev in ("frozen", "live", "other"):  # equal up to float summation order (other batch shapes)
            assert abs(logp["again", ev] - logp["train", ev]).max() < 1e-5, (i, ev)
        if i == 1:  # and the live self is not the base: its difference from the frozen self is real
            assert abs(logp["again", "live"] - logp["again", "frozen"]).max() > 1e-3
    digest = audit(run, Store(str(tmp_path / "audit")), "again", compare_to="train", probe_prompts=1)
    assert digest


def _rejected(cfg, tmp_path, loads, match):
    with pytest.raises(ConfigError, match=match) as e:
        preflight(cfg, Store(str(tmp_path / "runs")))
    assert "\n" not in str(e.value)
    assert loads.paths == []  # refused before any model loaded
    return str(e.value)


def test_bad_lora_input_is_one_line_before_any_model_loads(tiny_models, tmp_path, monkeypatch):
    loads = Loads(monkeypatch)
    msg = _rejected(
        lora_cfg(tmp_path, lora={**LORA, "target_modules": ["q_proj", "query_key_value"]}),
        tmp_path,
        loads,
        r"policy.lora.target_modules: \['query_key_value'\] not in the policy",
    )
    assert "q_proj" in msg.rpartition("include")[2]  # names what does exist

    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    for f in tiny_models["policy"].iterdir():
        (adapter_dir / f.name).write_bytes(f.read_bytes())
    (adapter_dir / "adapter_config.json").write_text("{}")
    cfg = lora_cfg(tmp_path)
    d = cfg.model_dump(mode="json")
    d["policy"]["model"] = str(adapter_dir)
    _rejected(validate_config(d), tmp_path, loads, "policy.model: .* is already a LoRA adapter directory")

    _rejected(
        lora_cfg(tmp_path, scoring={"backend": "openai"}, vllm={"url": "http://127.0.0.1:9"}),
        tmp_path,
        loads,
        "^vllm.url/urls with policy.lora and scoring.backend openai: an external server cannot load",
    )


def test_cuda_device_without_a_gpu_is_refused_before_loading(tiny_models, tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    loads = Loads(monkeypatch)
    d = lora_cfg(tmp_path).model_dump(mode="json")
    d["policy"]["lora"] = None
    d["policy"]["device"] = "cuda"
    _rejected(validate_config(d), tmp_path, loads, "^policy.device: 'cuda' but torch sees no CUDA device")
    d["policy"]["device"] = "cpu"
    d["evaluators"][0]["device"] = "cuda:1"
    _rejected(validate_config(d), tmp_path, loads, r"^evaluators\[0\].device: 'cuda:1' but torch sees no CUDA device")


def test_the_config_hash_is_unchanged_without_a_lora_block(tiny_models):
    from rlme_pipeline.config import load_config

    plain = load_config(DEMO)
    d = plain.model_dump(mode="json")
    assert d["policy"]["lora"] is None
    d["policy"]["lora"] = LORA
    assert validate_config(d).hash() != plain.hash()
    d["policy"]["lora"] = None
    assert validate_config(d).hash() == plain.hash()


def _train_process(config_path, crash_at: str | None):
    import os
    import subprocess
    import sys

    code = (
        "import sys; from rlme_pipeline.config import load_config; from rlme_pipeline.storage.run import Run; "
        "from rlme_pipeline.jobs.train import train; c = load_config(sys.argv[1]); train(c, Run.for_config(c))"
    )
    env = {**os.environ, "PYTHONPATH": str(DEMO.parent.parent), "OMP_NUM_THREADS": "1"}
    env.pop("RLME_CRASH_AT", None)
    if crash_at:
        env["RLME_CRASH_AT"] = crash_at
    return subprocess.run(
        [sys.executable, "-c", code, str(config_path)], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_a_lora_run_killed_anywhere_resumes_to_the_uninterrupted_result(tiny_models, tmp_path):
    import signal

    # the uninterrupted run is a process of its own too, with the same torch threads: a last-bit difference in
    # a matmul moves a sampled token, and this test process's thread count is whatever earlier tests left
    ref_cfg = lora_cfg(tmp_path / "ref")
    ref_path = tmp_path / "ref.yaml"
    ref_path.write_text(yaml.safe_dump(ref_cfg.model_dump(mode="json")))
    p = _train_process(ref_path, None)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = lora_cfg(tmp_path / "killed")
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # inside the first adapter's training and its checkpoint write, then inside iteration 1 (whose
    # process loads the base from the config and the adapter, optimizer and RNG from checkpoint 0)
    for point in ["update:mid@0", "upload:mid@0", "score:mid@1", "update:mid@1"]:
        p = _train_process(path, point)
        assert p.returncode == -signal.SIGKILL, f"{point}: {p.returncode}\n{p.stderr[-3000:]}"
    p = _train_process(path, None)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _contents(ref_cfg) == _contents(cfg)


def test_a_bf16_lora_policy_keeps_a_bf16_base_and_trains_an_fp32_adapter(tiny_models, tmp_path):
    import torch

    from rlme_pipeline.backends.session import Backends

    cfg = lora_cfg(tmp_path, lora={**LORA, "dropout": 0.0})
    d = cfg.model_dump(mode="json")
    d["policy"]["dtype"] = "bfloat16"
    cfg = validate_config(d)
    run = Run.for_config(cfg)
    train(cfg, run)
    for i in (0, 1):
        adapter = load_file(_ckpt(run, i)["adapter_model.safetensors"])
        assert {t.dtype for t in adapter.values()} == {torch.float32}  # small updates are not rounded away
    assert run.read_record(1, "update").metrics["optimizer_steps"] > 0
    # a fresh process's model: the bf16 base with checkpoint 1's adapter in fp32
    with Backends() as backends:
        from rlme_pipeline.models.adapters import load
        from rlme_pipeline.models.weights_at import policy_at

        lm = load(backends.pool, policy_at(run, cfg, 2))
        params = list(lm.model.named_parameters())
        assert {p.dtype for n, p in params if "lora_" in n} == {torch.float32}
        assert {p.dtype for n, p in params if "lora_" not in n} == {torch.bfloat16}


def test_resuming_an_adapter_on_changed_base_weights_is_refused(tiny_models, tmp_path):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(tiny_models["policy"], base)
    cfg = lora_cfg(tmp_path, iterations=1)
    d = cfg.model_dump(mode="json")
    d["policy"]["model"] = str(base)
    cfg = validate_config(d)
    train(cfg, Run.for_config(cfg))
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.lm_head.weight.add_(1e-3)  # same path, same config hash: different weights
    model.save_pretrained(base)
    with pytest.raises(ConfigError, match="policy.model: the adapter in .* was trained on base weights"):
        train(cfg.with_overrides(iterations=2), Run.for_config(cfg))
