"""LoRA policies (peft): one base model in memory, adapters that train, and the base seen with them off.

With `policy.lora` set, the policy is the base model from the config plus a LoRA adapter. Only the
adapter trains; a checkpoint is an ordinary peft adapter directory (adapter_model.safetensors,
adapter_config.json) with its optimizer state, and trainer_state.json names the base by content hash
(`base.sha256`): the policy version is the adapter file's hash. One process holds one copy of the base,
pooled under the base model's key: the adapter is injected into it, its weights swapped in place when
another iteration's adapter is asked for, and the frozen self (`policy@initial`) and the KL reference are
that same model with its adapters switched off (`AdaptersOff`), never a second copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlme_pipeline.config import Config, ConfigError, LoraConfig
from rlme_pipeline.models.building import BUILDING
from rlme_pipeline.models.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapted
from rlme_pipeline.models.loading import Loaded, ModelPool, weights_version
from rlme_pipeline.models.weights_at import ModelRef, initial_policy
from rlme_pipeline.seeds import derive

VERSION_ATTR = "rlme_adapter_version"  # on the PeftModel: the version of the adapter weights it holds now


def attach(model, lora: LoraConfig, seed: int):
    """Inject a fresh adapter (A random, B zero: the adapted model starts equal to the base). Its random
    init draws from a generator seeded by the run, so a resumed run builds the same adapter."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    with BUILDING, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, peft_cfg)


def load_into(model, ref: ModelRef):
    """`model` (the base, or the base adapted) holding the adapter of checkpoint `ref`: injected from its
    adapter_config.json if the model has none yet, its weights copied in place otherwise."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    path, version = ref.path, ref.version
    if getattr(model, VERSION_ATTR, None) == version:
        return model
    check_base(ref)
    if not is_adapted(model):
        with BUILDING:
            model = PeftModel.from_pretrained(model, path, is_trainable=True)
    else:
        result = set_peft_model_state_dict(model, load_file(Path(path) / ADAPTER_WEIGHTS))
        if result.unexpected_keys:
            raise ValueError(f"{path}: adapter weights {result.unexpected_keys[:3]} do not fit this run's policy.lora")
    setattr(model, VERSION_ATTR, version)
    return model.eval()


def load(pool: ModelPool, ref: ModelRef) -> Loaded:
    """The model `ref` names, from the pool. A LoRA checkpoint (ref.base set) is the pooled base with that
    adapter in it; the base itself, when the pool holds it adapted, is the same model with adapters off."""
    if ref.base is None:
        lm = pool.get(ref.path, ref.dtype, ref.device, ref.version)
        if is_adapted(lm.model):
            return Loaded(AdaptersOff(lm.model), lm.tokenizer, ref.version, ref.path)
        return lm
    base = pool.get(ref.base, ref.dtype, ref.device)
    model = load_into(base.model, ref)
    if model is not base.model:
        pool.put((ref.base, ref.dtype, ref.device), Loaded(model, base.tokenizer, base.version, base.path))
    return Loaded(model, base.tokenizer, ref.version, ref.path)


def trainable(pool: ModelPool, cfg: Config, ref: ModelRef, iteration: int) -> Loaded:
    """The adapted policy to train at `iteration`, in the pool's one copy of the base: a fresh adapter at
    iteration 0, else ref's. The optimizer kept by `trained` comes along only if it trained exactly these
    weights. Until `trained` is called the pooled model holds no checkpoint's adapter (an update that
    fails half-way leaves nothing that a later stage could mistake for a checkpoint)."""
    init = initial_policy(cfg)
    key = (init.path, init.dtype, init.device)
    base = pool.get(*key, init.version)
    model = base.model
    fits = is_adapted(model) and ref.base is not None and getattr(model, VERSION_ATTR, None) == ref.version
    if ref.base is None:  # iteration 0: a fresh adapter on the base
        model = attach(model.unload() if is_adapted(model) else model, cfg.policy.lora, derive(cfg.run.seed, "lora"))
    else:
        model = load_into(model, ref)
    setattr(model, VERSION_ATTR, None)
    pool.put(key, Loaded(model, base.tokenizer, base.version, base.path))
    return Loaded(model, base.tokenizer, ref.version, ref.path, base.optimizer if fits else None)


def trained(pool: ModelPool, cfg: Config, lm: Loaded, optimizer, version: str) -> None:
    """The pooled model now holds adapter `version`, kept with the optimizer that trained it."""
    init = initial_policy(cfg)
    setattr(lm.model, VERSION_ATTR, version)
    pool.put((init.path, init.dtype, init.device), Loaded(lm.model, lm.tokenizer, init.version, init.path, optimizer))


def base_record(cfg: Config) -> dict:
    """What trainer_state.json says about the base: the reference in the config and its weights' hash."""
    init = initial_policy(cfg)
    return {"ref": cfg.policy.model, "sha256": init.version}


def check_base(ref: ModelRef) -> None:
    """A LoRA checkpoint only means something on the base it was trained on (trainer_state.json's
    base.sha256): refuse to put it on other weights, e.g. a base directory changed in place."""
    state = json.loads((Path(ref.path) / "trainer_state.json").read_text())
    want, have = state.get("base", {}).get("sha256"), weights_version(ref.base)
    if want != have:
        raise ConfigError(
            f"policy.model: the adapter in {ref.path} was trained on base weights {str(want)[:12]}, "
            f"but the configured base {ref.base} has {have[:12]}; point policy.model at the original base"
        )


class AdaptersOff:
    """An adapted model seen as its base: every call runs with the adapters disabled (peft's
    disable_adapter), sharing the same weights in memory. It offers what the hf backend and log-prob code
    call (get_decoder(), get_output_embeddings(), calling the model); any other attribute is the model's."""

    def __init__(self, model):
        self._model = model

    def __call__(self, *args, **kwargs):
        with self._model.disable_adapter():
            return self._model(*args, **kwargs)

    def get_decoder(self):
        return _Off(self._model, self._model.get_decoder())

    def get_output_embeddings(self):
        return _Off(self._model, self._model.get_output_embeddings())

    def __getattr__(self, name):
        return getattr(self._model, name)


class _Off:
    def __init__(self, model, module):
        self._model, self._module = model, module

    def __call__(self, *args, **kwargs):
        with self._model.disable_adapter():
            return self._module(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


# --- preflight: bad input fails before any model loads ------------------------------------------------
def module_names(path: str) -> set[str]:
    """The last parts of every module path of the model in `path`, built on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with BUILDING, torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return {name.rpartition(".")[2] for name, _ in model.named_modules() if name}


def check(cfg: Config, policy_path: str) -> None:
    """policy.lora against the policy and the backends, each problem one line naming the field."""
    lora = cfg.policy.lora
    if lora is None:
        return
    for field, backend in (("generation.backend", cfg.generation.backend), ("scoring.backend", cfg.scoring.backend)):
        if backend == "openai" and cfg.vllm.external_urls():
            raise ConfigError(
                f"vllm.url/urls with policy.lora and {field} openai: an external server cannot load the run's "
                "adapters; leave vllm.url unset so the stage manages a server that does"
            )
    if (Path(policy_path) / ADAPTER_CONFIG).exists():
        raise ConfigError(
            f"policy.model: {cfg.policy.model!r} is already a LoRA adapter directory ({ADAPTER_CONFIG}); "
            "point policy.model at its base model, or remove policy.lora to use it as it is"
        )
    names = module_names(policy_path)
    if missing := [m for m in lora.target_modules if m not in names]:
        linear = sorted(n for n in names if n.endswith("_proj") or n in ("fc1", "fc2", "lm_head", "c_attn", "c_proj"))
        raise ConfigError(
            f"policy.lora.target_modules: {missing} not in the policy {cfg.policy.model!r}; "
            f"its modules include {linear}"
        )
