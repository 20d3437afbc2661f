"""Checks that run before any model loads or any file is written, so bad input fails fast and cleanly."""

from __future__ import annotations

import os
from pathlib import Path

from rlme_pipeline.config import FROZEN_SELF, LIVE_SELF, Config, ConfigError
from rlme_pipeline.data import heldout_prompts, load_prompts, prompt_indices
from rlme_pipeline.jobs.tracking import check_installed
from rlme_pipeline.judging.inputs import uses_chat
from rlme_pipeline.judging.judges import judge_answer_ids, predates_chat_template
from rlme_pipeline.models.importing import GGUF_PREFIX, check_gguf, require_gguf
from rlme_pipeline.models.loading import load_tokenizer, resolve_ref
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.store import Store


def _tokenizer_for(cfg: Config, ref: str, field: str):
    if ref.startswith(("tiny:", GGUF_PREFIX)):
        try:
            path = resolve_ref(cfg.resolve(ref))  # a GGUF file is imported here, once (models/importing.py)
        except ValueError as e:
            raise ConfigError(f"{field}: {e}") from None
    else:
        path = cfg.resolve(ref)
        looks_local = ref.startswith(("/", "./", "../", "~")) or Path(path).exists()
        if looks_local and not Path(path).is_dir():
            hint = f"; for a GGUF file write 'gguf:{ref}'" if ref.lower().endswith(".gguf") else ""
            raise ConfigError(
                f"{field}: {ref!r} is not a model directory{hint}. Use 'policy' (live self), 'policy@initial' "
                "(frozen self), 'tiny:policy' / 'tiny:evaluator', gguf:PATH, a local HF model directory, or a hub id"
            )
    try:
        return load_tokenizer(path)
    except Exception as e:  # from_pretrained raises OSError/ValueError/HF errors for unknown references
        raise ConfigError(
            f"{field}: cannot load a tokenizer for {ref!r} ({type(e).__name__}). Use 'policy', 'policy@initial', "
            "'tiny:policy' / 'tiny:evaluator', a local HF model directory, or a hub id available offline"
        ) from None


def _check_gguf_files(cfg: Config) -> None:
    """Every gguf:PATH reference names an existing GGUF file, checked before anything loads or is imported
    (an import de-quantises the whole model: a typo should not cost that first)."""
    refs = [("policy.model", cfg.policy.model)]
    refs += [(f"evaluators[{i}].model", ev.model) for i, ev in enumerate(cfg.evaluators)]
    if cfg.evolve is not None:
        refs.append(("evolve.proposer", cfg.evolve.proposer))
    for field, ref in refs:
        if ref.startswith(GGUF_PREFIX):
            try:
                check_gguf(cfg.resolve(ref).removeprefix(GGUF_PREFIX), ref)
                require_gguf()
            except ValueError as e:
                raise ConfigError(f"{field}: {e}") from None


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
        if kind == "cuda" and (torch.device(device).index or 0) >= (n := torch.cuda.device_count()):
            raise ConfigError(
                f"{field}: {device!r} but this machine has {n} CUDA device{'s' if n != 1 else ''} "
                f"(cuda:0 to cuda:{n - 1}; CUDA_VISIBLE_DEVICES renumbers them); pick one of those"
            )


def _check_lora(cfg: Config) -> None:
    if cfg.policy.lora is None:
        return
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError("policy.lora needs peft: pip install 'rlme[lora]'") from None
    from rlme_pipeline.models.adapters import check

    try:
        path = resolve_ref(cfg.resolve(cfg.policy.model))
    except ValueError as e:
        raise ConfigError(f"policy.model: {e}") from None
    check(cfg, path)


def _check_distributed(cfg: Config) -> None:
    """An update across processes (FSDP2): full fine-tuning, one GPU per process."""
    import torch

    p, device = cfg.distributed.processes, torch.device(cfg.policy.device)
    if p == 1:
        return
    if cfg.policy.lora is not None:
        raise ConfigError(
            f"distributed.processes: {p} shards full fine-tuning only; a LoRA policy trains its small adapter in "
            "one process: set distributed.processes: 1 (or remove policy.lora)"
        )
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(
                f"policy.device: {cfg.policy.device!r} names one GPU, but distributed.processes: {p} puts rank r on "
                "cuda:r; set policy.device: cuda (choose the GPUs with CUDA_VISIBLE_DEVICES)"
            )
        if p > torch.cuda.device_count():
            raise ConfigError(
                f"distributed.processes: {p} but this machine has {torch.cuda.device_count()} GPU(s), one per "
                "process; lower distributed.processes"
            )
    elif device.type != "cpu":
        raise ConfigError(f"distributed.processes: {p} runs on cuda (nccl) or cpu (gloo), not {device.type}")
    if cfg.distributed.backend == "nccl" and device.type != "cuda":
        raise ConfigError("distributed.backend: nccl needs policy.device cuda; use auto or gloo on cpu")


def _backend_fields(cfg: Config) -> dict[str, str]:
    """Every field that picks a backend, with its value."""
    fields = {"generation.backend": cfg.generation.backend, "scoring.backend": cfg.scoring.backend}
    if cfg.evolve is not None and cfg.evolve.proposer != "rules":
        fields["evolve.backend"] = cfg.evolve.backend
    return fields


def _check_vllm_importable(cfg: Config) -> None:
    """The vllm backend runs vllm.LLM in this process: without the package here, it would fail only
    inside the first stage that uses it. The openai backend without vllm.url needs an interpreter for
    its managed server. (find_spec: importing vllm itself takes seconds.)"""
    import importlib.util

    v, fields = cfg.vllm, _backend_fields(cfg)
    for field, backend in fields.items():
        if backend == "vllm" and importlib.util.find_spec("vllm") is None:
            elsewhere = (
                f"set {field}: openai to use the vLLM in vllm.python ({v.python})"
                if v.python
                else f"or set {field}: openai with vllm.python naming an interpreter that has vllm (make vllm-venv)"
            )
            raise ConfigError(
                f"{field}: vllm runs vllm.LLM in this process, but the vllm package is not importable here; "
                f"pip install 'rlme[vllm]' (a GPU host), {elsewhere}, or set {field}: hf"
            )
        if backend == "openai" and not v.external_urls() and not (v.python or os.environ.get("RLME_VLLM_PYTHON")):
            raise ConfigError(
                f"{field}: openai without vllm.url starts a managed vLLM server and needs an interpreter with vllm: "
                "set vllm.python or RLME_VLLM_PYTHON (build one with `make vllm-venv`), or vllm.url for a running server"
            )


def _check_vllm(cfg: Config) -> None:
    """Replica settings against the backends, and every external server reachable, before any stage."""
    _check_vllm_importable(cfg)
    v, backends = cfg.vllm, {cfg.generation.backend, cfg.scoring.backend}
    if (v.replicas > 1 or len(v.urls) > 1) and "openai" not in backends:
        raise ConfigError(
            "vllm.replicas/vllm.urls: spread requests of the openai backend; set generation.backend or "
            "scoring.backend to openai (the vllm backend is one in-process engine)"
        )
    if "openai" not in backends:
        return
    if v.replicas > 1 and cfg.policy.device.startswith("cuda"):  # a valid device: _check_devices ran
        from rlme_pipeline.backends import BackendError
        from rlme_pipeline.backends.server import replica_gpus
        from rlme_pipeline.backends.session import visible_gpus

        try:
            replica_gpus(v.replicas, v.tensor_parallel_size, visible_gpus())
        except BackendError as e:
            raise ConfigError(str(e)) from None
    import httpx

    fields = [f"vllm.urls[{i}]" for i in range(len(v.urls))] if v.urls else ["vllm.url"]
    for field, url in zip(fields, v.external_urls()):
        try:
            httpx.get(url.rstrip("/") + "/v1/models", timeout=10).raise_for_status()
        except httpx.HTTPError as e:
            raise ConfigError(
                f"{field}: {url} is unreachable ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "start that server or remove it"
            ) from None


def _check_evolve(cfg: Config) -> None:
    ev = cfg.evolve
    if ev is None:
        return
    if ev.on_probe_alarm and not cfg.probe.every:
        raise ConfigError("evolve.on_probe_alarm: the probe is off (probe.every: 0); set probe.every >= 1")
    if ev.proposer != "rules":
        _tokenizer_for(cfg, ev.proposer, "evolve.proposer")
    keep = cfg.checkpoint.keep_last
    if keep is not None and keep <= ev.window and any(e.model == LIVE_SELF for e in cfg.evaluators):
        # a live-self judge re-scores iteration i with checkpoint i - 1: the window needs window + 1 of them
        raise ConfigError(
            f"evolve.window {ev.window} re-scores with the live-self evaluator, which needs the last {ev.window + 1} "
            f"checkpoints; checkpoint.keep_last is {keep}: raise it to {ev.window + 1} or lower evolve.window"
        )


def gpu_memory_notes(cfg: Config, prompts, policy_tok) -> list[str]:
    """The per-stage GPU memory estimate (jobs/memory.py) when any model is on a CUDA device: computed
    from config.json files and the tokenizer, before anything loads."""
    from rlme_pipeline.jobs import memory

    models = [cfg.policy, *(ev for ev in cfg.evaluators if ev.model not in (LIVE_SELF, FROZEN_SELF))]
    if not any(m.device.startswith("cuda") for m in models):
        return []
    try:
        shapes, prompt_tokens, question_tokens = memory.inputs(cfg, prompts, policy_tok)
    except Exception as e:  # noqa: BLE001 - a hub id not cached here: the estimate is advice, not a check
        return [f"no GPU memory estimate: cannot read a model's config.json ({type(e).__name__}: {e})"]
    parts = memory.estimate(cfg, shapes, prompt_tokens, question_tokens)
    lines = memory.report(parts, _cuda_totals())
    cost = memory.float32_cost(cfg, shapes, prompt_tokens, question_tokens)
    return lines + ([cost] if cost else [])


def _cuda_totals() -> dict[str, int]:
    """Each visible GPU's memory; none where CUDA cannot say (the estimate then gives no share)."""
    import torch

    try:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return {f"cuda:{i}": torch.cuda.get_device_properties(i).total_memory for i in range(n)}
    except (RuntimeError, AssertionError):  # a CPU build of torch
        return {}


def preflight(cfg: Config, store: Store) -> list[str]:
    """Raises ConfigError (one line: the field and the fix) on the first problem; returns notes to show
    the user (the GPU memory estimate)."""
    _check_gguf_files(cfg)
    check_installed(cfg.tracking)
    _check_devices(cfg)
    _check_lora(cfg)
    _check_distributed(cfg)
    _check_evolve(cfg)
    _check_vllm(cfg)  # after the config checks: it asks the network
    store.check_writable()
    prompts = load_prompts(cfg)
    prompt_indices(prompts.height, cfg.data.prompts_per_iteration, cfg.run.seed, 0)
    if cfg.eval.every:
        heldout_prompts(cfg)  # the held-out file and its columns, now rather than after the first update
    policy_tok = check_judges(cfg, predates_chat_template(Run(store, cfg.run.id)))
    return gpu_memory_notes(cfg, prompts, policy_tok)


def check_judges(cfg: Config, predates: bool = False):
    """The policy's and every evaluator's tokenizer load, and each reads every question's answers as one
    token in the form it will judge (raw text, or its chat template: scoring.chat_template), before any
    model loads. `predates`: the run was created before scoring.chat_template (auto reads raw text).
    Returns the policy's tokenizer."""
    policy_tok = _tokenizer_for(cfg, cfg.policy.model, "policy.model")
    for i, ev in enumerate(cfg.evaluators):
        field = f"evaluators[{i}].model"
        tok = policy_tok if ev.model in (LIVE_SELF, FROZEN_SELF) else _tokenizer_for(cfg, ev.model, field)
        chat = uses_chat(cfg.scoring, tok, ev.name, predates)
        for q in cfg.questions:
            judge_answer_ids(tok, q, cfg.scoring, chat, ev.name)
    return policy_tok
