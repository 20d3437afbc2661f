"""Exporting a trained policy: one committed checkpoint -> an ordinary HF model directory with a model card.

A checkpoint is made for resuming, not for serving: it holds the optimizer state, RNG states and trainer
state beside the weights, keeps the weights in the training dtype (fp32 masters of a bf16 policy), and a
LoRA checkpoint is only an adapter that names its base by content hash. An export is what transformers,
peft or vLLM load as it is, and what a model hub shows:

    {out}/config.json, model.safetensors, generation_config.json, tokenizer files   full weights (or merged LoRA)
    {out}/adapter_config.json, adapter_model.safetensors, tokenizer files           a LoRA run without merging
    {out}/README.md   the model card: run, iteration, config hash, policy base, the reward's questions and
                      weights, evaluators, algorithm, rlme version; the hashes that tie it to the run

The checkpoint is found through the iteration's committed manifest (the `Run` API: a directory glob would
also match leftovers of killed attempts) and its files are checked against their recorded sha256 before
anything is read. The export is written into a staging directory beside `out` and renamed into place, so
`out` is complete or absent. Pushing to the hub (`push`) uploads that directory with the token of the
environment or of `hf auth login`; rlme never writes a token anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlme_pipeline.config import Config
from rlme_pipeline.models import checkpoint
from rlme_pipeline.models.building import BUILDING
from rlme_pipeline.models.importing import readable, save_tokenizer
from rlme_pipeline.models.loading import DTYPES
from rlme_pipeline.storage import phases, retention
from rlme_pipeline.storage.run import CorruptRun, Manifest, Run, code_version
from rlme_pipeline.storage.store import FileEntry, sha256_file

CARD = "README.md"
# Files a resumed run needs and an exported model must not carry.
TRAINING_ONLY = ("optimizer/", checkpoint.LEGACY_OPTIMIZER, checkpoint.RNG, checkpoint.STATE)


class ExportError(ValueError):
    """The export cannot be made as asked: one line naming the argument and the fix."""


@dataclass(frozen=True)
class Exported:
    out: Path
    run: str
    iteration: int
    kind: str  # "full", "adapter" (LoRA, not merged) or "merged" (LoRA merged into the base)
    dtype: str
    seconds: float


def export(
    run: Run, out: str | Path, iteration: int | None = None, dtype: str | None = None, merge_lora: bool = False
) -> Exported:
    """Write iteration `iteration`'s policy (default: the last committed) to the new directory `out` in
    `dtype` (default: the run's policy.dtype). A LoRA checkpoint is exported as its adapter, or with
    `merge_lora` merged into its base as full weights."""
    started = time.perf_counter()
    run.meta()  # NoRun / RunMismatch: a path without a run says so in one line
    cfg = run.config()
    i = pick_iteration(run, iteration)
    manifest = run.manifest(i)
    files = checkpoint_files(run, i, manifest)
    dtype = dtype or cfg.policy.dtype
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    adapter = checkpoint.weights_entry(files).logical.endswith("/" + checkpoint.ADAPTER_WEIGHTS)
    if merge_lora and not adapter:
        raise ExportError(
            f"--merge-lora: iteration {i} of {run.url} holds full weights, not a LoRA adapter; drop --merge-lora"
        )
    target = new_directory(out)
    src = Path(checkpoint.local_dir(run, i, files))
    check_local_copy(src, files, run)
    staging = Path(tempfile.mkdtemp(prefix=".exporting-", dir=target.parent))
    try:
        if not adapter:
            kind = write_full(src, staging, dtype)
        elif merge_lora:
            kind = write_merged(cfg, src, staging, dtype, checkpoint.weights_entry(files).sha256)
        else:
            kind = write_adapter(src, staging, dtype)
        (staging / CARD).write_text(model_card(run, cfg, manifest, files, src, kind, dtype))
        readable(staging)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Exported(target, run.url, i, kind, dtype, time.perf_counter() - started)


# --- which checkpoint ---------------------------------------------------------------------------------
def pick_iteration(run: Run, iteration: int | None) -> int:
    committed = run.committed()
    if not committed:
        raise ExportError(f"{run.url} has no committed iteration yet: train it first (`rlme train CONFIG`)")
    if iteration is None:
        return committed[-1]
    if iteration not in committed:
        raise ExportError(
            f"--iteration {iteration}: not a committed iteration of {run.url}; committed: {_ranges(committed)}"
        )
    return iteration


def checkpoint_files(run: Run, i: int, manifest: Manifest) -> list[FileEntry]:
    """The checkpoint's entries in iteration i's manifest; a pruned checkpoint is named as such."""
    retention.require(
        run, i, "to export", fix="export an iteration whose checkpoint is kept (`rlme verify` lists them)"
    )
    files = checkpoint.files_of(manifest.files, i)
    if not files:
        raise ExportError(f"--iteration {i}: its manifest in {run.url} lists no checkpoint")
    return files


def check_local_copy(src: Path, files: list[FileEntry], run: Run) -> None:
    """The files the export reads, hashed against the manifest: an export is a release, and a checkpoint
    changed after its commit must not become one."""
    for f in files:
        name = f.path.split("/", 2)[2]
        if name.startswith(TRAINING_ONLY):
            continue
        if sha256_file(src / name) != f.sha256:
            raise CorruptRun(
                f"{run.store.where(f.path)} does not match its committed sha256; run `rlme verify {run.url}`"
            )


def new_directory(out: str | Path) -> Path:
    """`out` as a local directory that does not exist yet (or is empty): an export never mixes with other files."""
    if "://" in str(out):
        raise ExportError(f"--out {out!r}: give a local directory (use --push-to-hub to publish it)")
    target = Path(out).expanduser().absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(f"--out {str(target)!r} exists and is not empty; give a new directory")
    if target.exists():
        target.rmdir()  # empty: the rename puts the export in its place
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


# --- writing the model --------------------------------------------------------------------------------
def write_full(src: Path, out: Path, dtype: str) -> str:
    """The checkpoint's weights in `dtype` with its config, generation config and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with BUILDING:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPES[dtype])
    model.save_pretrained(out)
    save_tokenizer(AutoTokenizer.from_pretrained(src), out)
    return "full"


def write_merged(cfg: Config, src: Path, out: Path, dtype: str, version: str) -> str:
    """The adapter merged into its base (peft merge_and_unload, in fp32, then cast to `dtype`): a full model
    that needs neither peft nor the base. The base must be the one the adapter was trained on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlme_pipeline.models.adapters import check_base
    from rlme_pipeline.models.weights_at import ModelRef, initial_policy

    peft = _require_peft()
    base = initial_policy(cfg)
    check_base(ModelRef(str(src), version, dtype, "cpu", base.path))
    with BUILDING:
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
        merged = peft.PeftModel.from_pretrained(model, src).merge_and_unload()
    merged.to(DTYPES[dtype])
    merged.save_pretrained(out)
    save_tokenizer(AutoTokenizer.from_pretrained(src), out)
    return "merged"


def write_adapter(src: Path, out: Path, dtype: str) -> str:
    """The adapter directory as peft loads it: adapter_config.json as trained (it names the base as the run
    resolved it), the adapter's tensors in `dtype`, the tokenizer."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    tensors = {k: t.to(DTYPES[dtype]) for k, t in load_file(src / checkpoint.ADAPTER_WEIGHTS).items()}
    save_file(tensors, out / checkpoint.ADAPTER_WEIGHTS, metadata={"format": "pt"})
    shutil.copyfile(src / checkpoint.ADAPTER_CONFIG, out / checkpoint.ADAPTER_CONFIG)
    save_tokenizer(AutoTokenizer.from_pretrained(src), out)
    return "adapter"


def _require_peft():
    try:
        import peft
    except ImportError:
        raise ExportError("a LoRA checkpoint needs peft to merge: pip install 'rlme[lora]'") from None
    return peft


# --- the model card -----------------------------------------------------------------------------------
KIND_TEXT = {
    "full": "full weights",
    "adapter": "a LoRA adapter (load it on the base below with peft)",
    "merged": "full weights: the LoRA adapter merged into the base",
}


def model_card(run: Run, cfg: Config, m: Manifest, files: list[FileEntry], src: Path, kind: str, dtype: str) -> str:
    """README.md: where the model came from, in enough detail to find and audit the run that made it."""
    lineage, i = m.lineage, m.iteration
    qcfg = phases.read(run).config_at(cfg, i)
    base = _base(run, src)
    trained = m.code or {}
    lines = [
        *_front_matter(cfg, kind),
        f"# {run.id}, iteration {i}",
        "",
        "A policy trained with rlme (Reinforcement Learning from Meta-Evaluation): its reward",
        "is read from evaluator LLMs' probability of answering yes to the meta-questions below, with no",
        "ground-truth labels.",
        "",
        "| | |",
        "| --- | --- |",
        f"| run | `{run.id}` at `{run.url}` |",
        f"| iteration | {i}: the policy after this iteration's update (committed {m.committed_at}) |",
        f"| config hash | `{m.config_hash}` |",
        f"| policy base | `{cfg.policy.model}` (weights sha256 `{base}`) |",
        f"| this model | {KIND_TEXT[kind]}, {dtype} |",
        f"| checkpoint weights sha256 | `{checkpoint.weights_entry(files).sha256}` |",
        f"| algorithm | {_algorithm(cfg)} |",
        f"| reward | {_reward(cfg)} |",
        f"| phase | {lineage.get('phase', 0)} (questions sha256 `{lineage.get('questions_sha', '-')}`) |",
        f"| trained with | rlme {trained.get('version', '?')} (git `{trained.get('git_commit') or '-'}`) |",
        f"| exported with | rlme {_version()} |",
        "",
        f"## Meta-questions (iteration {i})",
        "",
        "| id | weight w_k | question | yes | no |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {q.id} | {q.weight:g} | {_cell(q.text)} | {_cell(repr(q.positive))} | {_cell(repr(q.negative))} |"
            for q in qcfg.questions
        ),
        "",
        "## Evaluators",
        "",
        "| name | model | weight v_j | weights sha256 |",
        "| --- | --- | --- | --- |",
        *(f"| {e.name} | `{e.model}` | {e.weight:g} | `{_ev_version(lineage, e.name)}` |" for e in cfg.evaluators),
        "",
        *_metrics(m),
        "## Loading",
        "",
        *_usage(kind, cfg),
        "",
        "The base model's license applies to these weights.",
        "",
    ]
    return "\n".join(lines)


def _front_matter(cfg: Config, kind: str) -> list[str]:
    lines = ["---", f"library_name: {'peft' if kind == 'adapter' else 'transformers'}", "tags:", "- rlme"]
    if _is_hub_id(cfg.policy.model):
        lines.append(f"base_model: {cfg.policy.model}")
    return [*lines, "---", ""]


def _is_hub_id(ref: str) -> bool:
    return ref.count("/") == 1 and ":" not in ref and not ref.startswith((".", "/", "~")) and not Path(ref).exists()


def _base(run: Run, src: Path) -> str:
    """The base's weights hash as trained: what generated iteration 0 (its manifest's lineage; manifests
    outlive pruned checkpoints), else what a LoRA checkpoint's trainer_state.json names."""
    if 0 in run.committed():
        if version := (run.manifest(0).lineage.get("policy") or {}).get("version"):
            return version
    state = json.loads((src / checkpoint.STATE).read_text()) if (src / checkpoint.STATE).exists() else {}
    return (state.get("base") or {}).get("sha256") or "-"


def _algorithm(cfg: Config) -> str:
    a, o = cfg.algorithm, cfg.optimizer
    loss = {"cispo": f"CISPO (eps_high {a.eps_high:g})", "grpo": f"GRPO (clip {a.eps:g})", "dr_grpo": "Dr. GRPO"}
    return (
        f"{loss[a.loss]}, KL beta {a.beta:g}, advantages {'std-scaled' if a.scale_advantage_std else 'group-centred'}; "
        f"AdamW lr {o.lr:g}, {o.epochs} epoch(s); group size {cfg.generation.group_size}"
        + (f"; LoRA r {cfg.policy.lora.r}, alpha {cfg.policy.lora.alpha:g}" if cfg.policy.lora else "")
    )


def _reward(cfg: Config) -> str:
    s = cfg.scoring
    f = {"logp": f"max(log p, {s.logp_floor:.3g})", "norm_logp": "log p/(p+q)", "p": "p"}[s.reward_form]
    label = f"; exact-match label reward on a share {cfg.label_reward.share:g}" if cfg.label_reward else ""
    return f"r = sum_j v_j sum_k w_k {f}, p = P(yes) of evaluator j to question k{label}"


def _ev_version(lineage: dict, name: str) -> str:
    for e in lineage.get("evaluators", []):
        if e.get("name") == name:
            return e.get("version", "-")
    return "-"


def _metrics(m: Manifest) -> list[str]:
    keys = [k for k in ("reward_mean", "reward_std", "loss", "kl", "failed_share") if k in m.metrics]
    if not keys:
        return []
    rows = [f"| {k} | {m.metrics[k]:.4g} |" for k in keys if isinstance(m.metrics[k], (int, float))]
    return [f"## Metrics of iteration {m.iteration}", "", "| metric | value |", "| --- | --- |", *rows, ""]


def _usage(kind: str, cfg: Config) -> list[str]:
    if kind == "adapter":
        return [
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            'model = AutoPeftModelForCausalLM.from_pretrained("THIS_DIRECTORY")  # loads the base named in adapter_config.json',
            "```",
        ]
    return [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("THIS_DIRECTORY")',
        'tokenizer = AutoTokenizer.from_pretrained("THIS_DIRECTORY")',
        "```",
    ]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _version() -> str:
    v = code_version()
    return v["version"] + (f" (git `{v['git_commit']}`)" if v["git_commit"] else "")


def _ranges(xs: list[int]) -> str:
    return str(xs) if len(xs) <= 8 else f"{xs[0]}..{xs[-1]} ({len(xs)} iterations)"


# --- the hub ------------------------------------------------------------------------------------------
def check_push(repo: str) -> None:
    """Before the export: fail at once when an upload cannot happen (a malformed repo id, offline mode, no
    token), rather than after minutes of exporting."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ExportError(
            f"--push-to-hub {repo!r}: not a model repo id; write OWNER/NAME, e.g. alice/rlme-demo"
        ) from None
    if constants.HF_HUB_OFFLINE:
        raise ExportError(f"--push-to-hub {repo}: HF_HUB_OFFLINE is set; unset it to upload")
    if not get_token():
        raise ExportError(
            f"--push-to-hub {repo}: no Hugging Face token; set HF_TOKEN or run `hf auth login` (rlme reads it, never stores it)"
        )


def push(out: Path, repo: str, message: str) -> str:
    """Upload the export directory to the model repo `repo` (created if missing); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo, folder_path=out, repo_type="model", commit_message=message)
    except Exception as e:  # hub and transport errors alike become one line; the export stands
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ExportError(
            f"--push-to-hub {repo}: the upload failed ({type(e).__name__}: {first}); the export in {out} is "
            f"complete: retry with `hf upload {repo} {out}`"
        ) from None
    return str(info.commit_url)
