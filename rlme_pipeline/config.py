"""The one validated configuration of a run, loaded from YAML.

Every section is a pydantic model that forbids unknown keys, so a typo in a YAML file is an error that
names the field instead of a silently ignored setting. `Config.hash()` covers everything that changes
what a run computes (not `run.iterations`, `run.storage` or `run.storage_options`, which only say how
far and where), so a
resumed run can prove it is still the same experiment.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LIVE_SELF, FROZEN_SELF = "policy", "policy@initial"


class ConfigError(ValueError):
    """A configuration problem, phrased as `field: what is wrong; how to fix it`."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(Section):
    id: str = "demo"
    storage: str = "./runs"  # any fsspec URL: ./runs, file:///data/runs, s3://bucket/prefix
    # fsspec/s3fs options that are not secrets, e.g. {endpoint_url: http://minio:9000, client_kwargs:
    # {region_name: eu-west-1}}. Credentials come from the environment (AWS_ACCESS_KEY_ID, ...), never
    # from here: this section is copied into run.json.
    storage_options: dict[str, Any] = Field(default_factory=dict)
    iterations: int = Field(5, ge=1, description="total iterations the run should reach")
    seed: int = 0
    # Wall-clock limit per stage task in seconds (keys: generate, score, aggregate, update, commit); a stage
    # that runs past it fails that try and is retried. Operational, like iterations: not part of the hash.
    stage_timeout_s: dict[Literal["generate", "score", "aggregate", "update", "commit"], Annotated[float, Field(gt=0)]] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        check_run_id(v)
        return v

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, v: dict) -> dict:
        from rlme_pipeline.storage import secret_option_keys

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
    path: str = Field(description="local .jsonl/.json/.parquet/.csv file, or a Hugging Face hub data set name")
    split: str = "train"
    prompt_column: str = "prompt"
    id_column: str | None = None  # stable prompt ids; the row number when absent
    label_column: str | None = None  # kept for audit only; training never reads it
    prompts_per_iteration: int = Field(8, ge=1)
    system_prompt: str | None = None


class ModelConfig(Section):
    model: str = Field(description="HF directory, hub id, or tiny:policy / tiny:evaluator")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"


class EvaluatorConfig(ModelConfig):
    name: str
    model: str = Field(
        description="'policy' (live self), 'policy@initial' (frozen self), or a model reference (frozen other)"
    )
    weight: float = 1.0  # v_j


class QuestionConfig(Section):
    id: str
    text: str = Field(min_length=1)
    weight: float = 1.0  # w_k; negative penalises
    positive: list[str] = Field(default_factory=lambda: [" Yes", "Yes"], min_length=1)
    negative: list[str] = Field(default_factory=lambda: [" No", "No"], min_length=1)

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
    backend: Backend = "hf"
    group_size: int = Field(4, ge=2, description="G completions per prompt (advantages need a group)")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(16, ge=1)


DEFAULT_TEMPLATE = "Question: {prompt}\nResponse: {completion}\n"
DEFAULT_QUESTION_TEMPLATE = "{question} Answer Yes or No.\nAnswer:"


class ScoringConfig(Section):
    backend: Backend = "hf"
    batch_size: int = Field(16, ge=1, description="rollouts per forward pass; each carries all K questions")
    # The evaluator reads `prefix + question`; the prefix is shared by every question of a rollout.
    template: str = DEFAULT_TEMPLATE
    question_template: str = DEFAULT_QUESTION_TEMPLATE
    reward_form: Literal["logp", "norm_logp", "p"] = "logp"
    logp_floor: float = Field(math.log(1e-6), lt=0)

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
    loss: Literal["cispo", "grpo", "dr_grpo"] = "cispo"
    eps_high: float = Field(5.0, gt=0, description="CISPO: absolute cap on the IS weight")
    eps: float = Field(0.2, gt=0, description="GRPO/Dr.GRPO: PPO clip range")
    beta: float = Field(0.0, ge=0, description="k3 KL weight; 0 loads no reference model")
    scale_advantage_std: bool = False  # Dr. GRPO (the paper) centres only


class OptimizerConfig(Section):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(1, ge=1, description="optimisation passes over one iteration's rollouts")
    micro_batch_size: int = Field(8, ge=1)
    grad_accumulation: int = Field(4, ge=1, description="micro-batches per optimizer step")
    max_grad_norm: float = Field(1.0, gt=0)
    logprob_chunk_tokens: int = Field(256, ge=1, description="tokens per lm-head chunk in the update (256: peak at a 150k vocab ~0.2x the naive log_softmax, benchmarks/logprobs.py)")


class ProbeConfig(Section):
    """The judge-hacking probe during training (see rlme_pipeline/judging.py). Off by default (every: 0)."""

    every: int = Field(0, ge=0, description="run the probe every N iterations; 0 disables it")
    prompts: int = Field(4, ge=1, description="prompts per probe; each gets every probe response")
    alarm_share: float = Field(0.5, ge=0, le=1, description="alarm when an evaluator judges more than this share positive")


class LabelRewardConfig(Section):
    """Rule-based exact-match reward against data.label_column, on a share of the rollouts.

    share 1.0 is plain RLVR (evaluators may then be empty); 0 < share < 1 is the paper's RLME-nGT remedy:
    a deterministic share of rollouts (by a hash of the rollout id, so a resumed run picks the same ones)
    gets the label reward *instead of* the evaluators' reward; the rest get the evaluators' reward. The
    label reward is what a perfect, confident evaluator would give in scoring.reward_form's units, times
    `weight`: logp / norm_logp: 0 (log 1) if correct, logp_floor if not; p: 1 if correct, 0 if not.
    A selected rollout whose label is missing falls back to the evaluators' reward.
    """

    share: float = Field(1.0, ge=0, le=1, description="share of rollouts rewarded by exact match")
    extractor: Literal["answer_is", "boxed", "last_number", "auto"] = "answer_is"
    weight: float = Field(1.0, gt=0, description="scale; set it to the sum of v_j*w_k of the judgement it replaces")
class VllmConfig(Section):
    """How the `vllm` and `openai` backends reach vLLM (docs/vllm.md). Not part of hash(): it says where
    the numbers are computed, not which (keep server_args/engine_kwargs to ones that do not change them)."""

    url: str | None = Field(None, description="external OpenAI-compatible server; unset = managed by the stage")
    python: str | None = Field(None, description="interpreter with vllm for the managed server; default $RLME_VLLM_PYTHON")
    server_args: list[str] = Field(default_factory=list, description="extra api_server arguments, e.g. [--enforce-eager]")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for the managed server")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra vllm.LLM(...) arguments (vllm backend)")
    max_concurrency: int = Field(16, ge=1)
    timeout_s: float = Field(120.0, gt=0, description="per request")
    retries: int = Field(3, ge=0)
    backoff_s: float = Field(1.0, ge=0)
    startup_timeout_s: float = Field(600.0, gt=0)
    max_restarts: int = Field(1, ge=0, description="restarts of a managed server that dies during a stage")
    keep_alive: bool = Field(False, description="keep a managed server/LLM for the next stage while its model is unchanged")


class Config(Section):
    run: RunConfig = RunConfig()
    data: DataConfig
    policy: ModelConfig
    evaluators: list[EvaluatorConfig] = Field(default_factory=list)
    questions: list[QuestionConfig] = Field(min_length=1)
    generation: GenerationConfig = GenerationConfig()
    scoring: ScoringConfig = ScoringConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    probe: ProbeConfig = ProbeConfig()  # observation only: not part of hash()
    label_reward: LabelRewardConfig | None = None  # None: labels are never read by training
    vllm: VllmConfig = VllmConfig()  # where, not what: not part of hash()
    # Relative data/model paths are relative to the config file's folder, so a config works from any
    # cwd; they stay relative in the snapshot so the hash survives moving the checkout or the worker.
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    def resolve(self, ref: str) -> str:
        """A data/model reference as a usable string: relative paths that exist become absolute."""
        p = Path(ref).expanduser()
        if p.is_absolute():
            return str(p)
        for base in (self._base_dir, Path.cwd()):
            if (base / p).exists():
                return str((base / p).resolve())
        return ref

    def vllm_settings(self) -> VllmConfig:
        """The vllm section with a relative interpreter path resolved like the other paths."""
        py = self.vllm.python
        if py and not Path(py).expanduser().is_absolute():
            # not resolve(): a venv's bin/python is a symlink, and following it leaves the venv
            for base in (self._base_dir, Path.cwd()):
                if (base / py).exists():
                    return self.vllm.model_copy(update={"python": os.path.abspath(base / py)})
        return self.vllm

    @model_validator(mode="after")
    def _reward_sources(self) -> Config:
        lr = self.label_reward
        if not self.evaluators and (lr is None or lr.share < 1):
            raise ValueError("evaluators: at least one is required (unless label_reward.share is 1, plain RLVR)")
        if lr is not None and lr.share > 0 and self.data.label_column is None:
            raise ValueError("label_reward needs data.label_column: the column that holds the reference answer")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        for field, names in (("evaluators", [e.name for e in self.evaluators]), ("questions", [q.id for q in self.questions])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{field}: duplicate names {dup}; each must be unique")
        return self

    def hash(self) -> str:
        """What the run computes, excluding how far it goes and where it is stored."""
        d = self.model_dump(mode="json")
        d["run"] = {k: v for k, v in d["run"].items() if k not in ("iterations", "storage", "storage_options", "stage_timeout_s")}
        d.pop("vllm")  # how vLLM is reached; runs made before it keep their hash
        d.pop("probe")  # measures the judges, changes nothing computed: runs made before it keep their hash
        if d.get("label_reward") is None:  # added later: configs without it keep their old hash
            d.pop("label_reward", None)
        # a memory/speed knob: every token's log-prob is the same whatever the chunking, and runs made when
        # its default was 1024 must still resume now that it is 256
        d["optimizer"].pop("logprob_chunk_tokens")
        return sha256_json(d)

    def with_overrides(self, **run_fields) -> Config:
        fields = {k: v for k, v in run_fields.items() if v is not None}
        if not fields:
            return self
        cfg = validate_config({**self.model_dump(mode="json"), "run": {**self.run.model_dump(), **fields}})
        cfg._base_dir = self._base_dir
        return cfg


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def validate_config(data: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field; check its spelling against the configuration reference in the README"
            elif err["type"] == "missing":
                msg = "required field is missing"
            lines.append(f"  {loc}: {msg}")
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(lines)) from None


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
    cfg = validate_config(data, str(path))
    cfg._base_dir = path.parent.resolve()
    return cfg
