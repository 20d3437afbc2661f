"""`rlme export`: a committed checkpoint, found through the run's manifests, becomes an ordinary HF model
directory (or a peft adapter directory) with a model card, and loads back to the same logits as the policy
the run itself would load for that iteration: full weights in fp32 (exact) and bf16, LoRA as an adapter
(exact) and merged (fp32 rounding)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest
import torch
from rlme_flows.cli import app
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from rlme_pipeline.config import validate_config
from rlme_pipeline.jobs.train import train
from rlme_pipeline.models import adapters, checkpoint
from rlme_pipeline.models.export import ExportError, check_push, export
from rlme_pipeline.models.loading import ModelPool
from rlme_pipeline.models.weights_at import initial_policy, policy_at
from rlme_pipeline.storage.run import CorruptRun, Run
from tests.conftest import demo_dict
from tests.requires import require

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
INPUT = torch.tensor([[1, 17, 230, 45, 9, 301, 12]])


def train_small(root, run_id: str, iterations: int, lora: dict | None = None) -> Run:
    """A demo-sized run made small (2 prompts x 2 samples, 1 judge, 1 question): seconds per iteration."""
    d = demo_dict()
    d["run"].update(id=run_id, storage=str(root / "runs"), iterations=iterations)
    d["data"].update(prompts_per_iteration=2)
    d["evaluators"], d["questions"] = d["evaluators"][:1], d["questions"][:1]
    d["questions"][0]["text"] = "Is the answer | correct?"  # a '|' must not break the card's table
    d["generation"].update(group_size=2, max_new_tokens=8)
    d.pop("eval", None)
    d["probe"]["every"] = 0
    if lora:
        d["policy"]["lora"] = lora
    cfg = validate_config(d)
    run = Run.for_config(cfg)
    train(cfg, run)
    return run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_models) -> Run:
    return train_small(tmp_path_factory.mktemp("full"), "full", iterations=2)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_models) -> Run:
    require("peft")
    return train_small(tmp_path_factory.mktemp("lora"), "lora", iterations=1, lora=LORA)


def run_policy(run: Run, iteration: int, dtype: str = "float32"):
    """The policy after `iteration` exactly as the pipeline loads it (what generated iteration + 1): found by
    weights_at.policy_at, loaded by the model pool, a LoRA checkpoint put on its base by adapters.load."""
    cfg = run.config().model_copy(update={"policy": run.config().policy.model_copy(update={"dtype": dtype})})
    return adapters.load(ModelPool(), policy_at(run, cfg, iteration + 1)).model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_full_export_fp32_loads_back_to_the_checkpoints_logits_with_a_model_card(full_run, tmp_path):
    out = tmp_path / "export"
    code, output = cli("export", full_run.url, "--iteration", "0", "--out", str(out))
    assert code == 0 and "exported:" in output, output
    assert sorted(os.listdir(out)) == sorted(
        ["README.md", "config.json", "model.safetensors", "generation_config.json", "tokenizer.json"]
        + ["tokenizer_config.json", "chat_template.jinja"]
    )  # no optimizer/, rng.safetensors, trainer_state.json
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(exported), logits(run_policy(full_run, 0)))
    assert not torch.equal(logits(exported), logits(run_policy(full_run, 1)))  # iteration 0, not the last
    assert "local_files_only" not in (out / "tokenizer_config.json").read_text()
    assert AutoTokenizer.from_pretrained(out).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)

    card = (out / "README.md").read_text()
    m, cfg = full_run.manifest(0), full_run.config()
    for fact in (
        "# full, iteration 0",
        f"`{m.config_hash}`",
        "policy base | `tiny:policy` (weights sha256 `" + m.lineage["policy"]["version"],
        "| correct | 1 | Is the answer \\| correct? |",
        f"| {cfg.evaluators[0].name} | `{cfg.evaluators[0].model}` | 1 | `{m.lineage['evaluators'][0]['version']}` |",
        "CISPO (eps_high 5)",
        "max(log p, -13.8)",
        f"trained with | rlme {m.code['version']}",
        "full weights, float32",
        f"`{checkpoint.weights_entry(checkpoint.files_of(m.files, 0)).sha256}`",
    ):
        assert fact in card, fact

    code, output = cli("export", full_run.url, "--out", str(tmp_path / "last"))  # default: the last committed
    assert code == 0 and "iteration 1" in output, output
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "last")), logits(run_policy(full_run, 1)))


def test_bf16_export_holds_bf16_weights_within_bf16_tolerance(full_run, tmp_path):
    out = export(full_run, tmp_path / "bf16", iteration=1, dtype="bfloat16").out
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.dtype == torch.bfloat16
    assert torch.equal(logits(exported), logits(run_policy(full_run, 1, "bfloat16")))  # as the run loads it in bf16
    torch.testing.assert_close(logits(exported).float(), logits(run_policy(full_run, 1)), atol=0.1, rtol=0.02)


def test_export_reads_the_committed_checkpoint_never_a_leftover_and_refuses_a_changed_one(full_run, tmp_path):
    copy = tmp_path / "runs" / "full"
    shutil.copytree(full_run.store.root, copy)
    run = Run.from_url(str(copy))
    files = checkpoint.files_of(run.manifest(1).files, 1)
    committed = copy / checkpoint.weights_entry(files).path
    # a killed attempt's checkpoint beside the committed one (as `rlme gc` would find it): other weights
    leftover = copy / "iter-000001" / "checkpoint.ffffffff"  # the last name and the newest directory
    shutil.copytree(committed.parent, leftover)
    shutil.copy(copy / checkpoint.weights_entry(checkpoint.files_of(run.manifest(0).files, 0)).path, leftover)
    os.utime(leftover, (time.time() + 60, time.time() + 60))
    out = export(run, tmp_path / "out").out
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out)), logits(run_policy(full_run, 1)))

    data = bytearray(committed.read_bytes())
    data[-1] ^= 1  # one bit of the committed weights changed after the commit
    committed.write_bytes(bytes(data))
    with pytest.raises(CorruptRun, match="does not match its committed sha256; run `rlme verify"):
        export(run, tmp_path / "changed")
    assert not (tmp_path / "changed").exists()


def test_lora_export_as_adapter_and_merged_gives_the_adapted_policys_logits(lora_run, tmp_path):
    from peft import PeftModel

    policy = run_policy(lora_run, 0)
    want = logits(policy)
    base = AutoModelForCausalLM.from_pretrained(initial_policy(lora_run.config()).path).eval()
    assert not torch.allclose(want, logits(base), atol=1e-4)  # the adapter trained: it changes the logits

    code, output = cli("export", lora_run.url, "--out", str(tmp_path / "adapter"))
    assert code == 0 and "adapter" in output, output
    names = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= names
    assert not names & {"config.json", "model.safetensors", "optimizer", "trainer_state.json"}
    assert "library_name: peft" in (tmp_path / "adapter" / "README.md").read_text()
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert torch.equal(logits(adapted), want)

    code, output = cli("export", lora_run.url, "--merge-lora", "--out", str(tmp_path / "merged"))
    assert code == 0 and "merged" in output, output
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # no peft needed
    torch.testing.assert_close(logits(merged), want, atol=1e-5, rtol=1e-5)  # W + BA folded: fp32 rounding only
    assert "merged into the base" in (tmp_path / "merged" / "README.md").read_text()


def test_export_mistakes_fail_in_one_line_naming_the_argument(full_run, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    for args, message in (
        (["--merge-lora"], "--merge-lora: iteration 1 of .* holds full weights, not a LoRA adapter; drop --merge-lora"),
        (["--iteration", "7"], r"--iteration 7: not a committed iteration of .*; committed: \[0, 1\]"),
        (["--dtype", "int8"], "--dtype 'int8': use one of float32, bfloat16, float16"),
        (["--out", str(tmp_path / "taken")], "--out .* exists and is not empty; give a new directory"),
        (["--push-to-hub", "alice/model"], "--push-to-hub alice/model: HF_HUB_OFFLINE is set; unset it to upload"),
        (["--push-to-hub", "not a repo"], "--push-to-hub 'not a repo': not a model repo id; write OWNER/NAME"),
    ):
        argv = ["export", full_run.url, "--out", str(tmp_path / "new"), *args]
        code, output = cli(*argv)
        assert code == 2 and output.count("\n") == 1, output
        assert re.search(message, output), output
        assert not (tmp_path / "new").exists()
    assert cli("export", str(tmp_path / "runs" / "nothing"), "--out", str(tmp_path / "new"))[0] == 2


def test_push_without_a_token_fails_before_exporting(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(ExportError, match="no Hugging Face token; set HF_TOKEN or run `hf auth login`"):
        check_push("alice/model")


def test_push_to_an_unreachable_hub_keeps_the_export_and_never_shows_the_token(full_run, tmp_path, monkeypatch):
    """A real upload attempt through huggingface_hub, with a token in the environment as a user has it and
    the hub's endpoint at a closed port (the client reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import:
    set here on its constants)."""
    from huggingface_hub import constants

    token = "hf_rlmeTestTokenThatMustNotLeak0123456789"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    out = tmp_path / "export"
    code, output = cli("export", full_run.url, "--out", str(out), "--push-to-hub", "alice/model")
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, output
    assert "--push-to-hub alice/model: the upload failed (ConnectError" in lines[0]  # it really tried
    assert f"retry with `hf upload alice/model {out}`" in lines[0]
    assert AutoModelForCausalLM.from_pretrained(out) is not None  # the export itself is complete
    assert token not in output
    for f in out.rglob("*"):
        assert not f.is_file() or token.encode() not in f.read_bytes(), f
