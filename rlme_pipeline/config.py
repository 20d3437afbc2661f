"""The one validated configuration of a run, loaded from YAML.

Every section is a pydantic model that forbids unknown keys, so a typo in a YAML file is an error that
names the field instead of a silently ignored setting. Every field says what it means and whether it is
part of the experiment: declared with `experiment(...)` (what the run computes: hashed), `operational(...)`
(where, how far, how fast: never hashed) or `experiment_if_set(...)` (added later: hashed only when it
differs from its default, so runs made before it keep their hash). `Config.hash()` covers exactly the
declared experiment fields, so a resumed run can prove it is still the same experiment, and a field that
declares nothing is an error (tests/unit/test_config.py), never a silent decision.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticUndefined

from rlme_pipeline.steps import STEPS

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LIVE_SELF, FROZEN_SELF = "policy", "policy@initial"


class ConfigError(ValueError):
    """A configuration problem, phrased as `field: what is wrong; how to fix it`."""


# --- what each field is: part of the experiment or not -----------------------------------------------
HASH_KEY = "hash"
EXPERIMENT, OPERATIONAL, EXPERIMENT_IF_SET = "experiment", "operational", "experiment-if-set"


def experiment(default: Any = PydanticUndefined, description: str = "", **kw) -> Any:
    """A field that changes what the run computes: part of `Config.hash()` (a resume must match it)."""
    return Field(default, description=description, json_schema_extra={HASH_KEY: EXPERIMENT}, **kw)


def operational(default: Any = PydanticUndefined, description: str = "", **kw) -> Any:
    """A field that says where, how far or how fast, never which numbers: not part of `Config.hash()`."""
    return Field(default, description=description, json_schema_extra={HASH_KEY: OPERATIONAL}, **kw)


def experiment_if_set(default: Any = PydanticUndefined, description: str = "", **kw) -> Any:
    """An experiment field added after runs existed whose default reproduces them: hashed only when it
    differs from its default, so those runs keep their hash."""
    return Field(default, description=description, json_schema_extra={HASH_KEY: EXPERIMENT_IF_SET}, **kw)


def hash_rule(model: type[BaseModel], name: str) -> str:
    extra = model.model_fields[name].json_schema_extra
    rule = extra.get(HASH_KEY) if isinstance(extra, dict) else None
    if rule not in (EXPERIMENT, OPERATIONAL, EXPERIMENT_IF_SET):
        raise TypeError(
            f"{model.__name__}.{name} does not say whether it is part of the experiment: declare it "
            "with experiment(...), operational(...) or experiment_if_set(...) (rlme_pipeline/config.py)"
        )
    return rule


def experiment_part(model: BaseModel) -> dict:
    """The model's experiment fields as JSON, recursively: what `Config.hash()` hashes."""
    dumped = model.model_dump(mode="json")
    out = {}
    for name, f in type(model).model_fields.items():
        rule, value = hash_rule(type(model), name), getattr(model, name)
        if rule == OPERATIONAL or (rule == EXPERIMENT_IF_SET and value == f.get_default(call_default_factory=True)):
            continue
        out[name] = _experiment_value(value, dumped[name])
    return out


def _experiment_value(value: Any, dumped: Any) -> Any:
    if isinstance(value, BaseModel):
        return experiment_part(value)
    if isinstance(value, (list, tuple)):
        return [_experiment_value(v, d) for v, d in zip(value, dumped)]
    return dumped


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(Section):
    """Which run, where it is stored, and how far it goes."""

    id: str = experiment("demo", "the run's name: one path segment under run.storage ({storage}/{id})")
    storage: str = operational(
        "./runs", "where runs live: any fsspec URL, e.g. ./runs, file:///data/runs, s3://bucket/prefix"
    )
    storage_options: dict[str, Any] = operational(
        default_factory=dict,
        description="fsspec/s3fs options that are not secrets, e.g. {endpoint_url: http://minio:9000, client_kwargs: "
        "{region_name: eu-west-1}}. Credentials come from the environment (AWS_ACCESS_KEY_ID, ...), never from "
        "here: this section is copied into run.json",
    )
    iterations: int = operational(5, "total iterations the run should reach", ge=1)
    seed: int = experiment(0, "seeds prompt sampling, generation and the update, per iteration")
    stage_timeout_s: dict[Literal[STEPS], Annotated[float, Field(gt=0)]] = operational(
        default_factory=dict,
        description=f"wall-clock limit per step task in seconds (keys: {', '.join(STEPS)}); "
        "a step that runs past it fails that try and is retried",
    )

    @field_validator("id")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        check_run_id(v)
        return v

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, v: dict) -> dict:
        from rlme_pipeline.storage.store import secret_option_keys

        if bad := secret_option_keys(v):
            raise ValueError(
                f"{bad} look like credentials; run.storage_options is saved in run.json, so put credentials in "
                "the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or AWS_PROFILE)"
            )
        return v


def check_run_id(v: str) -> str:
    """Run ids become one path segment of every URL: no separators, no '..', nothing a shell or S3 mangles."""
    if not isinstance(v, str) or not RUN_ID.match(v) or ".." in v:
        raise ValueError(
            f"{v!r} is not a safe run id: use letters, digits, '.', '_' and '-' only "
            "(no path separators, no '..', at most 128 characters)"
        )
    return v


class DataConfig(Section):
    """The prompts: a local file, folder or glob, or a Hugging Face hub data set, read through `datasets`
    (rlme_pipeline/data.py, docs/data.md)."""

    path: str = experiment(
        description="a local .jsonl/.json/.parquet/.csv file, a local folder (datasets.save_to_disk output, or data "
        "files, split by their names as datasets does), a glob of data files (data/*.parquet), or a Hugging Face "
        "hub data set name (openai/gsm8k)"
    )
    split: str = experiment("train", "the data set split to read (a single file or glob is one split, train)")
    # Added later, each hashed only when set, so runs made before them keep their hash.
    config: str | None = experiment_if_set(
        None, "the data set's configuration (subset), e.g. main for openai/gsm8k; null: its only (default) one"
    )
    revision: str | None = experiment_if_set(
        None, "hub data sets: the git revision to read (a commit sha pins the data; a branch or tag may move)"
    )
    prompt_column: str = experiment("prompt", "column holding the prompt text")
    prompt_template: str | None = experiment_if_set(
        None,
        "the policy's prompt made from the prompt column: must contain {prompt} (or the column's own name, e.g. "
        "{question}), replaced by its text; any other text, braces included, is kept as written. null: the "
        "column's text alone",
    )
    id_column: str | None = experiment(None, "column of stable prompt ids; the row number when absent")
    label_column: str | None = experiment(
        None, "reference answers: read by the audit, and by training only through label_reward"
    )
    prompts_per_iteration: int = experiment(
        8, "prompts sampled per iteration (each gets generation.group_size completions)", ge=1
    )
    system_prompt: str | None = experiment(None, "system message of the policy's chat template")

    @field_validator("prompt_template")
    @classmethod
    def _template_has_the_prompt(cls, t: str | None, info: ValidationInfo) -> str | None:
        column = info.data.get("prompt_column", "prompt")
        if t is not None and "{prompt}" not in t and f"{{{column}}}" not in t:
            raise ValueError(
                f"{t!r} has no {{prompt}}: put {{prompt}} (or {{{column}}}) where the question goes, e.g. "
                "'{prompt} Put the final answer after ####.'"
            )
        return t

    def templated(self, prompt: str) -> str:
        """The prompt the policy reads: prompt_template with the prompt column's text in place."""
        if self.prompt_template is None:
            return prompt
        names = "|".join(re.escape(n) for n in {"prompt", self.prompt_column})
        return re.sub(rf"\{{(?:{names})\}}", lambda _: prompt, self.prompt_template)


class ModelConfig(Section):
    """A model and how it is loaded."""

    model: str = experiment(
        description="HF directory, hub id, gguf:PATH (a GGUF file, imported once), or tiny:policy / tiny:evaluator"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = experiment("float32", "weights and compute dtype")
    device: str = experiment("cpu", "torch device for the hf backend, e.g. cpu, cuda, cuda:1")


class LoraConfig(Section):
    """LoRA adapters on the policy (peft): only they train; the base weights stay frozen (rlme_pipeline/models/adapters.py)."""

    r: int = experiment(16, "adapter rank: each adapted weight W (out x in) gains B (out x r) @ A (r x in)", ge=1)
    alpha: float = experiment(32.0, "scale: the adapter adds (alpha / r) * B @ A to W", gt=0)
    dropout: float = experiment(
        0.0, "dropout on the adapters' input while training (draws from the checkpointed torch RNG)", ge=0, lt=1
    )
    target_modules: list[str] = experiment(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="names of the Linear modules to adapt (the last part of their module path, e.g. q_proj, "
        "gate_proj); each must exist in the policy (checked before anything loads)",
        min_length=1,
    )


class PolicyConfig(ModelConfig):
    """The model being trained."""

    lora: LoraConfig | None = experiment_if_set(
        None, "LoRA adapters (r, alpha, dropout, target_modules); null: full fine-tuning of every weight"
    )


class EvaluatorConfig(ModelConfig):
    """One evaluator j: a model whose answers to the meta-questions make the reward."""

    name: str = experiment(description="unique name; appears in scores and metrics")
    model: str = experiment(
        description="'policy' (live self), 'policy@initial' (frozen self), or a model reference (frozen other)"
    )
    weight: float = experiment(1.0, "v_j: the evaluator's weight in the reward")


class QuestionConfig(Section):
    """One meta-question k, asked of every evaluator about every rollout."""

    id: str = experiment(description="unique id; appears in scores and metrics")
    text: str = experiment(description="the question, inserted into scoring.question_template", min_length=1)
    weight: float = experiment(1.0, "w_k: the question's weight in the reward; negative penalises")
    positive: list[str] = experiment(
        default_factory=lambda: [" Yes", "Yes"],
        description="answer variants read as yes (each one token)",
        min_length=1,
    )
    negative: list[str] = experiment(
        default_factory=lambda: [" No", "No"], description="answer variants read as no (each one token)", min_length=1
    )

    @field_validator("positive", "negative")
    @classmethod
    def _non_empty_answers(cls, v: list[str]) -> list[str]:
        if any(a == "" for a in v):
            raise ValueError("an answer string is empty: give the literal answer text, e.g. ' Yes'")
        return v

    def sha(self) -> str:
        """Identity of the judgement asked: the text and the answers read off the evaluator."""
        return sha256_json({"text": self.text, "positive": self.positive, "negative": self.negative})


Backend = Literal["hf", "vllm", "openai"]


class GenerationConfig(Section):
    """Sampling the policy's completions."""

    backend: Backend = experiment("hf", "hf (transformers), vllm (in-process) or openai (a vLLM server)")
    group_size: int = experiment(4, "G completions per prompt (advantages need a group)", ge=2)
    max_new_tokens: int = experiment(32, "longest completion, in tokens", ge=1)
    temperature: float = experiment(1.0, "sampling temperature", gt=0)
    top_p: float = experiment(1.0, "nucleus sampling threshold", gt=0, le=1)
    batch_size: int = experiment(16, "prompts per generate call", ge=1)


DEFAULT_TEMPLATE = "Question: {prompt}\nResponse: {completion}\n"
DEFAULT_QUESTION_TEMPLATE = "{question} Answer Yes or No.\nAnswer:"


class ScoringConfig(Section):
    """Reading the evaluators' answers: the evaluator reads `prefix + question`, where the prefix
    (`template`) is shared by every question of a rollout."""

    backend: Backend = experiment("hf", "hf (transformers), vllm (in-process) or openai (a vLLM server)")
    batch_size: int = experiment(16, "rollouts per forward pass; each carries all K questions", ge=1)
    template: str = experiment(
        DEFAULT_TEMPLATE, "the rollout as the evaluator reads it; must contain {prompt} and {completion}"
    )
    question_template: str = experiment(
        DEFAULT_QUESTION_TEMPLATE, "each question after the prefix; must contain {question}"
    )
    reward_form: Literal["logp", "norm_logp", "p"] = experiment("logp", "f(p) summed into the reward (rewards.py)")
    logp_floor: float = experiment(math.log(1e-6), "lower bound of log-probability rewards (bounds log 0)", lt=0)
    # Hashed only when set: "auto" is the default, and a run made before this field existed reads "auto" as
    # "off" (judging/inputs.py), so every existing run keeps both its hash and its scores.
    chat_template: Literal["auto", "on", "off"] = experiment_if_set(
        "auto",
        "wrap the judge's text in the evaluator's chat template (one user message: template + question_template; "
        "the assistant turn opened, the answer read there): on, off, or auto = where the evaluator's tokenizer has "
        "one (runs created before this field: off)",
    )

    @field_validator("chat_template", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):
        """YAML 1.1 (PyYAML) reads a bare `on`/`off` as true/false: take them as the words they were."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        for name in ("{prompt}", "{completion}"):
            if name not in v:
                raise ValueError(f"the template must contain {name}")
        return v

    @field_validator("question_template")
    @classmethod
    def _question_field(cls, v: str) -> str:
        if "{question}" not in v:
            raise ValueError("the question_template must contain {question}")
        return v

    def template_sha(self) -> str:
        return sha256_json({"template": self.template, "question_template": self.question_template})


class AlgorithmConfig(Section):
    """The policy-gradient loss."""

    loss: Literal["cispo", "grpo", "dr_grpo"] = experiment("cispo", "the loss (losses.py)")
    eps_high: float = experiment(5.0, "CISPO: absolute cap on the IS weight", gt=0)
    eps: float = experiment(0.2, "GRPO/Dr.GRPO: PPO clip range", gt=0)
    beta: float = experiment(0.0, "k3 KL weight; 0 loads no reference model", ge=0)
    scale_advantage_std: bool = experiment(
        False, "divide advantages by the group std (GRPO); Dr. GRPO (the paper) centres only"
    )


class OptimizerConfig(Section):
    """The update: AdamW over one iteration's rollouts."""

    lr: float = experiment(1e-5, "learning rate", gt=0)
    weight_decay: float = experiment(0.0, "AdamW weight decay", ge=0)
    epochs: int = experiment(1, "optimisation passes over one iteration's rollouts", ge=1)
    micro_batch_size: int = experiment(8, "rollouts per forward/backward pass", ge=1)
    grad_accumulation: int = experiment(4, "micro-batches per optimizer step", ge=1)
    max_grad_norm: float = experiment(1.0, "gradient clipping norm", gt=0)
    # A schedule over iterations, not steps: the lr of iteration i is a function of i alone, so a resumed
    # run needs no scheduler state. Decaying is what kept RL's final accuracy near its best (docs/paper_mini.md).
    lr_decay_iterations: int = experiment_if_set(
        0, "cosine decay of lr over this many iterations, then held at lr * lr_final_ratio; 0: constant lr", ge=0
    )
    lr_final_ratio: float = experiment_if_set(
        0.1, "with lr_decay_iterations: the lr reached at the end of the decay, as a share of lr", ge=0, le=1
    )

    def lr_at(self, iteration: int) -> float:
        """The learning rate of an iteration: lr, or its cosine decay to lr * lr_final_ratio."""
        if self.lr_decay_iterations == 0:
            return self.lr
        t = min(iteration, self.lr_decay_iterations) / self.lr_decay_iterations
        return self.lr * (self.lr_final_ratio + (1 - self.lr_final_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    # Operational: every token's log-prob is the same whatever the chunking (and runs made when its default
    # was 1024 still resume now that it is 256).
    logprob_chunk_tokens: int = operational(
        256,
        "tokens per lm-head chunk in the update (256: peak at a 150k vocab ~0.2x the naive log_softmax, benchmarks/logprobs.py)",
        ge=1,
    )
    # Operational: the gradients are the same with or without recomputation (a memory/speed knob).
    gradient_checkpointing: bool = operational(
        False,
        (
            "recompute each decoder layer's activations in the backward pass instead of keeping them: activation "
            "memory of the update drops from all layers to about one, for about a third more update compute; the "
            "gradients are the same (docs/gpu.md)"
        ),
    )


class ProbeConfig(Section):
    """The judge-hacking probe during training (see rlme_pipeline/judging/judges.py). Off by default (every: 0).
    It measures the judges and changes nothing computed: not part of the hash."""

    every: int = operational(0, "run the probe every N iterations; 0 disables it", ge=0)
    prompts: int = operational(4, "prompts per probe; each gets every probe response", ge=1)
    alarm_share: float = operational(0.5, "alarm when an evaluator judges more than this share positive", ge=0, le=1)


class LabelRewardConfig(Section):
    """Rule-based exact-match reward against data.label_column, on a share of the rollouts.

    share 1.0 is plain RLVR (evaluators may then be empty); 0 < share < 1 is the paper's RLME-nGT remedy:
    a deterministic share of rollouts (by a hash of the rollout id, so a resumed run picks the same ones)
    gets the label reward *instead of* the evaluators' reward; the rest get the evaluators' reward. The
    label reward is what a perfect, confident evaluator would give in scoring.reward_form's units, times
    `weight`: logp / norm_logp: 0 (log 1) if correct, logp_floor if not; p: 1 if correct, 0 if not.
    A selected rollout whose label is missing falls back to the evaluators' reward.
    """

    share: float = experiment(1.0, "share of rollouts rewarded by exact match", ge=0, le=1)
    # Deprecated by answers.format (one format for every reader of labels); still read while `answers` is
    # unset, so configs (and runs) that set it compute what they did. Its default stays: it is hashed.
    extractor: Literal["answer_is", "boxed", "last_number", "auto"] = experiment(
        "answer_is", "deprecated: use answers.format. The answer format while answers is unset"
    )
    weight: float = experiment(1.0, "scale; set it to the sum of v_j*w_k of the judgement it replaces", gt=0)


AnswerFormat = Literal["auto", "gsm8k", "math", "answer_is", "boxed", "last_number"]


class AnswersConfig(Section):
    """How an answer is read off a completion and a label, and when two answers are the same
    (rlme_pipeline/algorithm/answers.py): the one rule of the label reward, eval accuracy / pass@k / maj@k, the
    audit's label AUROC and evolve's AUROC gate. Hashed when set: it decides the label reward."""

    format: AnswerFormat = experiment(
        "auto",
        "gsm8k (the number after ####, by value), math (the last \\boxed{}, compared with math-verify), answer_is, "
        "boxed, last_number, or auto (####, else 'The answer is', else a box, else the last number)",
    )


Tracker = Literal["tensorboard", "mlflow", "wandb", "trackio"]


class TrackingConfig(Section):
    """Experiment trackers that each committed iteration's metrics go to (docs/tracking.md). Each is an
    optional extra (`pip install 'rlme[wandb]'`). They watch the run and change nothing computed: not
    part of the hash. A tracker run is named by the run id, so a resumed run continues the same one."""

    backends: list[Tracker] = operational(
        default_factory=list, description="trackers to log to: tensorboard, mlflow, wandb, trackio; [] logs nowhere"
    )
    dir: str = operational(
        "./tracking",
        (
            "local folder for TensorBoard's event files ({dir}/tensorboard/{run.id}), W&B's files ({dir}/wandb) and "
            "the default MLflow store ({dir}/mlflow.db); relative to the working directory"
        ),
    )
    project: str = operational(
        "rlme", "MLflow experiment, W&B project and trackio project the run is logged under", min_length=1
    )
    mlflow_uri: str | None = operational(
        None,
        "MLflow tracking URI (http://host:5000, sqlite:///mlflow.db); "
        "null: $MLFLOW_TRACKING_URI, else sqlite:///{dir}/mlflow.db",
    )
    every: int = operational(1, "log every N-th iteration (iteration % every == 0)", ge=1)
    samples: int = operational(
        4, "sample completions (prompt, completion, reward) per logged iteration, as a table; 0: none", ge=0
    )

    @field_validator("backends")
    @classmethod
    def _unique_backends(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"{v} names a tracker twice; list each once")
        return v


class VllmConfig(Section):
    """How the `vllm` and `openai` backends reach vLLM (docs/vllm.md). Not part of hash(): it says where
    the numbers are computed, not which (keep server_args/engine_kwargs to ones that do not change them)."""

    url: str | None = operational(None, "external OpenAI-compatible server; unset = managed by the stage")
    python: str | None = operational(None, "interpreter with vllm for the managed server; default $RLME_VLLM_PYTHON")
    server_args: list[str] = operational(
        default_factory=list, description="extra api_server arguments, e.g. [--enforce-eager]"
    )
    env: dict[str, str] = operational(default_factory=dict, description="extra environment for the managed server")
    engine_kwargs: dict[str, Any] = operational(
        default_factory=dict, description="extra vllm.LLM(...) arguments (vllm backend)"
    )
    max_concurrency: int = operational(16, "requests in flight to the server", ge=1)
    timeout_s: float = operational(120.0, "per request", gt=0)
    retries: int = operational(3, "retries of a failed request", ge=0)
    backoff_s: float = operational(1.0, "first retry delay, doubled each retry", ge=0)
    startup_timeout_s: float = operational(600.0, "how long a managed server may take to come up", gt=0)
    max_restarts: int = operational(1, "restarts of a managed server that dies during a stage", ge=0)
    keep_alive: bool = operational(False, "keep a managed server/LLM for the next stage while its model is unchanged")
    # Past one server (docs/scale.md): requests spread over replicas; each carries its sample's seed, so
    # the answer does not depend on which replica gives it.
    urls: list[str] = operational(
        default_factory=list, description="external replicas serving the same model (instead of vllm.url)"
    )
    replicas: int = operational(1, "managed servers per stage; on cuda each gets its own GPU(s)", ge=1)
    tensor_parallel_size: int = operational(1, "GPUs per server / in-process LLM (--tensor-parallel-size)", ge=1)
    weight_sync: bool = operational(
        False, "keep the policy's server/LLM up across iterations and load each checkpoint into it in place"
    )
    max_lora_rank: int = operational(0, "start servers able to load LoRA adapters up to this rank; 0: policy.lora.r")
    # The vllm backend's engine shares the policy's GPU with the trainer (docs/vllm.md "Colocated").
    gpu_memory_utilization: float | None = operational(
        None,
        "share of the GPU the in-process engine may take (vLLM's gpu_memory_utilization); null: the device "
        "less what the trainer holds, from the memory estimate (docs/gpu.md)",
        gt=0,
        le=1,
    )
    sleep: bool = operational(
        True, "the in-process policy engine sleeps between uses, its GPU memory freed for the trainer (CUDA only)"
    )

    @model_validator(mode="after")
    def _one_way_to_reach_vllm(self) -> VllmConfig:
        if self.url and self.urls:
            raise ValueError("vllm.url and vllm.urls: give one (vllm.urls: [a, b] lists every replica)")
        if self.replicas > 1 and (self.url or self.urls):
            raise ValueError("vllm.replicas: counts managed servers; with vllm.url/urls list each server instead")
        if self.gpu_memory_utilization is not None and "gpu_memory_utilization" in self.engine_kwargs:
            raise ValueError(
                "vllm.engine_kwargs.gpu_memory_utilization: set once, as vllm.gpu_memory_utilization (remove it here)"
            )
        return self

    def external_urls(self) -> list[str]:
        """Every external server to spread requests over; empty: the stage manages its server(s)."""
        return list(self.urls) or ([self.url] if self.url else [])


class AlertsConfig(Section):
    """When a flow run raises an alarm as a Prefect event that automations can act on (docs/deploy.md).
    The probe's alarm has its threshold in probe.alarm_share. Observation only: not part of the hash."""

    failed_share: float = operational(
        0.05,
        "emit rlme.judgements.failed when more than this share of an iteration's judgements failed "
        "(status other than ok: context overflow, non-finite, backend error)",
        ge=0,
        le=1,
    )


class DistributedConfig(Section):
    """The update across several processes with PyTorch FSDP2 (rlme_pipeline/jobs/update_fsdp.py, docs/scale.md).
    Not hashed: a sharded step computes the same gradient as one process; only the order of floating-point
    additions differs (the weights agree within 1e-5), so a run may change it between iterations, and a
    byte-exact resume needs the same number of processes as the uninterrupted run."""

    processes: int = operational(
        1,
        "processes (one per GPU) the update runs in, launched with torchrun; 1: in the training process itself. "
        "Above 1 the policy's weights, gradients and AdamW state are sharded across them (full fine-tuning only)",
        ge=1,
    )
    backend: Literal["auto", "nccl", "gloo"] = operational(
        "auto", "torch.distributed backend: auto is nccl when policy.device is cuda, gloo on cpu (tests)"
    )


class CheckpointConfig(Section):
    """Which committed iterations keep their checkpoint files (rlme_pipeline/storage/retention.py). Pruning deletes
    files, never a record: the manifests keep every pruned file's hash, and what a checkpoint would have
    computed stays computed. Not part of the hash: it decides what is kept, not what is computed, and it
    may change between resumes. The defaults keep every checkpoint."""

    keep_last: int | None = operational(
        None,
        (
            "keep the checkpoints of the last N committed iterations (the newest is what training resumes "
            "from, so N >= 1); older ones are deleted after each commit unless keep_every keeps them; null "
            "keeps every checkpoint"
        ),
        ge=1,
    )
    keep_every: int | None = operational(
        None,
        (
            "with keep_last, also keep iteration i's checkpoint when (i + 1) % K == 0: the policy after K, 2K, ... "
            "updates, which generated iteration i + 1 (so iterations 0, K, 2K, ... stay re-scorable with a "
            "live-self evaluator); null keeps only the last N"
        ),
        ge=1,
    )

    full_every: int = operational(
        1,
        (
            "write the full training state (AdamW state, the fp32 master weights of a half-precision policy, the "
            "torch RNG) every N iterations, and at the last iteration of each `rlme train` call and on SIGTERM; "
            "the iterations between commit the policy's weights only (an ordinary HF directory in policy.dtype), "
            "and a resume from one of them replays the updates since the last full state from the committed "
            "tables; 1 writes it every iteration"
        ),
        ge=1,
    )
    background_write: bool = operational(
        False,
        (
            "write each checkpoint in a background thread while the next iteration's rollouts are sampled from the "
            "weights in memory (hf generation backend, one update process); the commit of the iteration waits "
            "for it, and nothing of the next iteration is recorded before that commit (docs/storage.md)"
        ),
    )

    @model_validator(mode="after")
    def _every_needs_last(self) -> CheckpointConfig:
        if self.keep_every is not None and self.keep_last is None:
            raise ValueError("keep_every needs keep_last (without it every checkpoint is kept); set keep_last: 1")
        return self


class ProposerSettings(Section):
    """How a proposer model runs and samples: the part `evolve:` (online) and `rlme evolve` share."""

    backend: Backend = experiment("hf", "how a proposer model runs: hf, vllm or openai (the run's vllm section)")
    dtype: Literal["float32", "bfloat16", "float16"] = experiment("float32", "proposer model dtype")
    device: str = experiment("cpu", "proposer device for the hf backend, e.g. cuda")
    max_new_tokens: int = experiment(512, "longest proposer answer, in tokens", ge=1)
    temperature: float = experiment(0.7, "proposer sampling temperature (each draft has its own seed)", gt=0)


RULES = "rules"  # the proposer that draws from the shipped robustness library (evolve/propose.py)


class ProposerConfig(ProposerSettings):
    """Who proposes question sets: the rules, or a model with its settings. Recorded in every proposal;
    `rlme evolve` and the rlme_evolve flow validate their arguments with it, the online step builds it
    from `evolve:` (EvolveConfig.proposer_config)."""

    model: str = experiment(RULES, "'rules' (the shipped robustness library) or a model reference (path, hub id, tiny:policy)")  # fmt: skip
    top_p: float = experiment(0.95, "proposer nucleus sampling", gt=0, le=1)
    seed: int = experiment(0, "the drafts' seeds derive from it: a proposal is reproducible")


class EvolveConfig(ProposerSettings):
    """Meta-questions that evolve during training, as in MPO (docs/evolve.md, "Online"): after every `every`-th
    committed iteration (and, with on_probe_alarm, after one whose probe raised the alarm) the training loop
    runs `rlme evolve` on the latest `window` committed iterations and adopts the winning set as a new phase
    from the next iteration (a proposal that keeps the current questions adopts nothing). Part of the
    experiment: it decides which questions judge later iterations."""

    every: int = experiment(0, "evolve after every N-th committed iteration (N, 2N, ...); 0: only on the probe alarm", ge=0)  # fmt: skip
    on_probe_alarm: bool = experiment(
        False, "also evolve after an iteration whose judge-hacking probe raised the alarm (needs probe.every >= 1)"
    )
    window: int = experiment(2, "the latest committed iterations each step learns from and re-scores", ge=1)
    proposer: str = experiment(
        RULES, "'rules' (the shipped robustness library) or a model reference (path, hub id, tiny:policy)"
    )
    candidates: int = experiment(4, "drafts asked of the proposer per step", ge=1, le=32)
    probe_prompts: int = experiment(4, "prompts of the judge-hacking probe each question set is measured on", ge=1)

    def proposer_config(self, model: str, seed: int) -> ProposerConfig:
        """The proposer of one online step: `model` (the proposer reference, resolved) with these settings."""
        settings = self.model_dump(include=set(ProposerSettings.model_fields))
        return ProposerConfig(model=model, seed=seed, **settings)

    @model_validator(mode="after")
    def _when(self) -> EvolveConfig:
        if not self.every and not self.on_probe_alarm:
            raise ValueError("evolve: set every >= 1 or on_probe_alarm: true (or remove the section)")
        return self


class EvalConfig(Section):
    """Held-out evaluation of the policy each iteration produced (docs/config.md#eval). Off by default
    (every: 0). It measures the policy and changes nothing computed: not part of the hash."""

    every: int = operational(
        0, "evaluate after the update of every N-th iteration (iteration % N == 0); 0 disables it", ge=0
    )
    path: str | None = operational(
        None,
        "held-out prompts, as data.path takes them (a file, folder, glob or hub data set) with data's columns "
        "(prompt_column, id_column, label_column) and prompt_template; null: data.path (with data.config and "
        "data.revision), read at `split`",
    )
    split: str | None = operational(
        None, "the split to read; required when path is null: a held-out split of data.path"
    )
    config: str | None = operational(None, "with path: the data set's configuration (subset); null: its default")
    revision: str | None = operational(None, "with path, a hub data set: the git revision to read")
    prompts: int = operational(16, "held-out prompts evaluated (the first N in a stable order of their ids)", ge=1)
    temperature: float = operational(0.0, "0: greedy decoding; above 0: sampled, with `seed`", ge=0)
    seed: int = operational(0, "seeds the sampled completions (temperature > 0, and the pass@k samples)")
    max_new_tokens: int | None = operational(None, "longest completion; null: generation.max_new_tokens", ge=1)
    samples: int = operational(
        1,
        "k: above 1, k more completions per prompt, sampled at sample_temperature, give pass@k (some sample is "
        "correct) and maj@k (the most common answer is) beside the accuracy of the one completion above",
        ge=1,
    )
    sample_temperature: float | None = operational(
        None, "temperature of the k samples (> 0); null: generation.temperature, as training samples", gt=0
    )
    # Deprecated by answers.format (the label reward, the audit and evolve read the same one).
    extractor: Literal["answer_is", "boxed", "last_number", "auto"] | None = operational(
        None, "deprecated: use answers.format. The answer format while answers and label_reward are unset"
    )
    judges: bool = operational(
        True, "also score the completions with the evaluators (their reward); false: exact-match accuracy only"
    )

    @model_validator(mode="after")
    def _source(self) -> EvalConfig:
        if self.every and self.path is None and self.split is None:
            raise ValueError(
                "eval: give eval.path (a held-out prompts file) or eval.split (a held-out split of data.path)"
            )
        for name in ("config", "revision"):
            if getattr(self, name) is not None and self.path is None:
                raise ValueError(
                    f"eval.{name}: applies to eval.path only; without it the held-out split is read from data.path "
                    f"with data.{name}: remove eval.{name} or set eval.path"
                )
        return self


class Config(Section):
    run: RunConfig = experiment(RunConfig(), "which run, where, how far (only run.id and run.seed are hashed)")
    data: DataConfig = experiment(description="the prompts")
    policy: PolicyConfig = experiment(description="the model being trained (see PolicyConfig)")
    evaluators: list[EvaluatorConfig] = experiment(
        default_factory=list, description="the evaluators j (see EvaluatorConfig)"
    )
    questions: list[QuestionConfig] = experiment(description="the meta-questions k (see QuestionConfig)", min_length=1)
    generation: GenerationConfig = experiment(GenerationConfig(), "sampling completions")
    scoring: ScoringConfig = experiment(ScoringConfig(), "reading the evaluators' answers")
    algorithm: AlgorithmConfig = experiment(AlgorithmConfig(), "the loss")
    optimizer: OptimizerConfig = experiment(OptimizerConfig(), "the update")
    probe: ProbeConfig = operational(ProbeConfig(), "the judge-hacking probe: observation only")
    label_reward: LabelRewardConfig | None = experiment_if_set(
        None, "exact-match reward on a share of rollouts; None: labels are never read by training"
    )
    vllm: VllmConfig = operational(VllmConfig(), "how the vllm/openai backends reach vLLM: where, not what")
    tracking: TrackingConfig = operational(TrackingConfig(), "experiment trackers: observation only")
    alerts: AlertsConfig = operational(AlertsConfig(), "thresholds of the flow's Prefect events: observation only")
    distributed: DistributedConfig = operational(
        DistributedConfig(), "the update across several processes/GPUs (FSDP2): how, not what"
    )
    checkpoint: CheckpointConfig = operational(
        CheckpointConfig(), "checkpoint retention: which committed checkpoints keep their files (default: all)"
    )
    eval: EvalConfig = operational(EvalConfig(), "held-out evaluation of the policy: observation only")
    evolve: EvolveConfig | None = experiment_if_set(
        None,
        "online evolution of the meta-questions (docs/evolve.md, Online); None: the questions change only by --adopt",
    )
    answers: AnswersConfig | None = experiment_if_set(
        None,
        "how answers are read and compared (format); null: label_reward.extractor where label_reward is set (its "
        "default answer_is), else eval.extractor, else auto. Read by the label reward, eval, the audit and evolve",
    )
    # Relative data/model paths are relative to the config file's folder, so a config works from any
    # cwd; they stay relative in the snapshot so the hash survives moving the checkout or the worker.
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def base_dir(self) -> Path:
        """The folder relative data/model paths are resolved against (validate_config's base_dir)."""
        return self._base_dir

    def resolve(self, ref: str) -> str:
        """A data/model reference as a usable string: relative paths that exist become absolute (also
        the file of a gguf:PATH model reference)."""
        if ref.startswith("gguf:"):
            return "gguf:" + self.resolve(ref.removeprefix("gguf:"))
        p = Path(ref).expanduser()
        if p.is_absolute():
            return str(p)
        for base in (self._base_dir, Path.cwd()):
            if (base / p).exists():
                return str((base / p).resolve())
        return ref

    def vllm_settings(self) -> VllmConfig:
        """The vllm section with a relative interpreter path resolved like the other paths, and a LoRA
        policy's rank (servers must be started able to take its adapters)."""
        v = self.vllm
        if self.policy.lora is not None and not v.max_lora_rank:
            v = v.model_copy(update={"max_lora_rank": self.policy.lora.r})
        py = v.python
        if py and not Path(py).expanduser().is_absolute():
            # not resolve(): a venv's bin/python is a symlink, and following it leaves the venv
            for base in (self._base_dir, Path.cwd()):
                if (base / py).exists():
                    return v.model_copy(update={"python": os.path.abspath(base / py)})
        return v

    @model_validator(mode="after")
    def _reward_sources(self) -> Config:
        lr = self.label_reward
        if not self.evaluators and (lr is None or lr.share < 1):
            raise ValueError("evaluators: at least one is required (unless label_reward.share is 1, plain RLVR)")
        if lr is not None and lr.share > 0 and self.data.label_column is None:
            raise ValueError("label_reward needs data.label_column: the column that holds the reference answer")
        return self

    @model_validator(mode="after")
    def _full_state_replayable(self) -> Config:
        """A light checkpoint is resumed by replaying updates in this process (jobs/replay.py): the FSDP ranks
        load the optimizer state from the previous checkpoint every iteration, and a LoRA checkpoint is under
        0.5 % of a full one, so neither has a light form."""
        if self.checkpoint.full_every > 1 and self.distributed.processes > 1:
            raise ValueError(
                "checkpoint.full_every: the FSDP ranks (distributed.processes > 1) read the optimizer state from "
                "every checkpoint; set checkpoint.full_every: 1"
            )
        if self.checkpoint.full_every > 1 and self.policy.lora is not None:
            raise ValueError(
                "checkpoint.full_every: a LoRA checkpoint (policy.lora) is small and always written whole; "
                "set checkpoint.full_every: 1"
            )
        return self

    @model_validator(mode="after")
    def _eval_source(self) -> Config:
        e = self.eval
        if e.every and e.path is None and e.split == self.data.split:
            raise ValueError(
                f"eval.split: {e.split!r} is the split training reads (data.split); give a held-out split or eval.path"
            )
        if e.every and not e.judges and self.data.label_column is None:
            raise ValueError("eval.judges: false leaves nothing to measure without labels; set data.label_column")
        return self

    @model_validator(mode="after")
    def _one_answer_format(self) -> Config:
        """answers.format replaces label_reward.extractor and eval.extractor: one setting may not contradict it."""
        if self.answers is None:
            return self
        fmt, lr = self.answers.format, self.label_reward
        # answer_is is label_reward.extractor's default: present in every dump, so it cannot mean a choice
        if lr is not None and lr.extractor not in ("answer_is", fmt):
            raise ValueError(f"label_reward.extractor: {lr.extractor!r} {_CONTRADICTS} {fmt!r}; {_ONE_FORMAT} label_reward.extractor")  # fmt: skip
        if self.eval.extractor not in (None, fmt):
            raise ValueError(f"eval.extractor: {self.eval.extractor!r} {_CONTRADICTS} {fmt!r}; {_ONE_FORMAT} eval.extractor")  # fmt: skip
        return self

    def answer_format(self) -> str:
        """The run's one answer format (answers.py): answers.format; for configs made before it, the label
        reward's extractor (what their label rewards were computed with), else eval.extractor, else auto."""
        if self.answers is not None:
            return self.answers.format
        if self.label_reward is not None:
            return self.label_reward.extractor
        return self.eval.extractor or "auto"

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        for field, names in (
            ("evaluators", [e.name for e in self.evaluators]),
            ("questions", [q.id for q in self.questions]),
        ):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{field}: duplicate names {dup}; each must be unique")
        return self

    def hash(self) -> str:
        """What the run computes: exactly the fields declared part of the experiment."""
        return sha256_json(experiment_part(self))

    def with_overrides(self, **run_fields) -> Config:
        fields = {k: v for k, v in run_fields.items() if v is not None}
        if not fields:
            return self
        data = {**self.model_dump(mode="json"), "run": {**self.run.model_dump(), **fields}}
        return validate_config(data, base_dir=self._base_dir)


_CONTRADICTS = "contradicts answers.format"
_ONE_FORMAT = "one format serves the label reward, eval, the audit and evolve: remove the deprecated"


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def validate_config(data: dict, source: str = "config", base_dir: str | Path | None = None) -> Config:
    """The config in `data`; its relative data/model paths resolve against `base_dir` (the config file's
    folder; default: the working directory)."""
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_errors(e, source)) from None
    if base_dir is not None:
        cfg._base_dir = Path(base_dir)
    return cfg


def describe_errors(e: ValidationError, source: str, prefix: str = "") -> str:
    """A pydantic error as one line: `source is invalid: field: what is wrong; field: ...`."""
    lines = []
    for err in e.errors():
        loc = prefix + ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; check its spelling against the configuration reference (docs/config.md)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{loc}: {msg}")
    return f"{source} is invalid: " + "; ".join(lines)


def experiment_diff(old: Config, new: Config) -> list[str]:
    """The experiment fields that differ, as `optimizer.lr 0.0001 -> 0.0003`: why a resume is refused."""
    return _diff(experiment_part(old), experiment_part(new), "")


_ABSENT = object()


def _diff(a: Any, b: Any, at: str) -> list[str]:
    if a == b:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        keys = list(a) + [k for k in b if k not in a]  # the config's own order
        return [line for k in keys for line in _diff(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{at}.{k}" if at else k)]
    if isinstance(a, list) and isinstance(b, list):
        return [
            line
            for i in range(max(len(a), len(b)))
            for line in _diff(a[i] if i < len(a) else _ABSENT, b[i] if i < len(b) else _ABSENT, f"{at}[{i}]")
        ]
    show = lambda v: "(absent)" if v is _ABSENT else json.dumps(v)  # noqa: E731
    return [f"{at} {show(a)} -> {show(b)}"]


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    cfg = validate_config(data, str(path), base_dir=path.parent.resolve())
    for message in deprecations(data, cfg):
        warnings.warn(f"{path}: {message}", FutureWarning, stacklevel=2)
    return cfg


def deprecations(data: dict, cfg: Config) -> list[str]:
    """What a config file (as written: `data`) sets that answers.format replaced, and what it now means.
    Only the file says what a user wrote; a dumped config holds every default."""
    out = []
    written = lambda section: "extractor" in (data.get(section) or {})  # noqa: E731
    if written("label_reward"):
        out.append(
            f"label_reward.extractor is deprecated: set answers.format: {cfg.answer_format()} instead (one format "
            "for the label reward, eval, the audit and evolve); while answers is unset it is still read"
        )
    if written("eval"):
        used = cfg.answer_format()
        also = "" if used == cfg.eval.extractor else f"; this config reads answers as {used!r} (label_reward.extractor)"
        out.append(f"eval.extractor is deprecated: set answers.format instead{also}")
    return out
