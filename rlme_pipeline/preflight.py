"""Checks that run before any model loads or any file is written, so bad input fails fast and cleanly."""

from __future__ import annotations

from pathlib import Path

from rlme_pipeline.config import FROZEN_SELF, LIVE_SELF, Config, ConfigError
from rlme_pipeline.data import heldout_prompts, load_prompts, prompt_indices
from rlme_pipeline.judging import answer_ids
from rlme_pipeline.models import load_tokenizer, resolve_ref
from rlme_pipeline.storage import Store
from rlme_pipeline.tracking import check_installed


def _tokenizer_for(cfg: Config, ref: str, field: str):
    if ref.startswith("tiny:"):
        try:
            path = resolve_ref(ref)
        except ValueError as e:
            raise ConfigError(f"{field}: {e}") from None
    else:
        path = cfg.resolve(ref)
        looks_local = ref.startswith(("/", "./", "../", "~")) or Path(path).exists()
        if looks_local and not Path(path).is_dir():
            raise ConfigError(
                f"{field}: {ref!r} is not a model directory. Use 'policy' (live self), 'policy@initial' "
                "(frozen self), 'tiny:policy' / 'tiny:evaluator', a local HF model directory, or a hub id"
            )
    try:
        return load_tokenizer(path)
    except Exception as e:  # from_pretrained raises OSError/ValueError/HF errors for unknown references
        raise ConfigError(
            f"{field}: cannot load a tokenizer for {ref!r} ({type(e).__name__}). Use 'policy', 'policy@initial', "
            "'tiny:policy' / 'tiny:evaluator', a local HF model directory, or a hub id available offline"
        ) from None


def _check_devices(cfg: Config) -> None:
    import torch

    models = [("policy.device", cfg.policy.device)]
    models += [
        (f"evaluators[{i}].device", ev.device)
        for i, ev in enumerate(cfg.evaluators)
        if ev.model not in (LIVE_SELF, FROZEN_SELF)
    ]  # the self evaluators run on the policy's device
    for field, device in models:
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise ConfigError(f"{field}: {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"{field}: {device!r} but torch sees no CUDA device on this machine; use cpu "
                "(or install a CUDA build of torch on a machine with a GPU)"
            )


def _check_lora(cfg: Config) -> None:
    if cfg.policy.lora is None:
        return
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError("policy.lora needs peft: pip install 'rlme[lora]'") from None
    from rlme_pipeline.adapters import check

    try:
        path = resolve_ref(cfg.resolve(cfg.policy.model))
    except ValueError as e:
        raise ConfigError(f"policy.model: {e}") from None
    check(cfg, path)


def preflight(cfg: Config, store: Store) -> None:
    check_installed(cfg.tracking)
    _check_devices(cfg)
    _check_lora(cfg)
    store.check_writable()
    prompts = load_prompts(cfg)
    prompt_indices(prompts.height, cfg.data.prompts_per_iteration, cfg.run.seed, 0)
    if cfg.eval.every:
        heldout_prompts(cfg)  # the held-out file and its columns, now rather than after the first update
    policy_tok = _tokenizer_for(cfg, cfg.policy.model, "policy.model")
    for i, ev in enumerate(cfg.evaluators):
        field = f"evaluators[{i}].model"
        tok = policy_tok if ev.model in (LIVE_SELF, FROZEN_SELF) else _tokenizer_for(cfg, ev.model, field)
        for q in cfg.questions:
            answer_ids(tok, q.positive, f"questions[{q.id}].positive (evaluator {ev.name})")
            answer_ids(tok, q.negative, f"questions[{q.id}].negative (evaluator {ev.name})")
