"""Checks that run before any model loads or any file is written, so bad input fails fast and cleanly."""

from __future__ import annotations

from pathlib import Path

from rlme_pipeline.config import FROZEN_SELF, LIVE_SELF, Config, ConfigError
from rlme_pipeline.data import heldout_prompts, load_prompts, prompt_indices
from rlme_pipeline.jobs.tracking import check_installed
from rlme_pipeline.judging.inputs import uses_chat
from rlme_pipeline.judging.judges import judge_answer_ids, predates_chat_template
from rlme_pipeline.models.loading import load_tokenizer, resolve_ref
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.store import Store


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


def _check_vllm(cfg: Config) -> None:
    """Replica settings against the backends, and every external server reachable, before any stage."""
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


def preflight(cfg: Config, store: Store) -> None:
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
    check_judges(cfg, predates_chat_template(Run(store, cfg.run.id)))


def check_judges(cfg: Config, predates: bool = False) -> None:
    """The policy's and every evaluator's tokenizer load, and each reads every question's answers as one
    token in the form it will judge (raw text, or its chat template: scoring.chat_template), before any
    model loads. `predates`: the run was created before scoring.chat_template (auto reads raw text)."""
    policy_tok = _tokenizer_for(cfg, cfg.policy.model, "policy.model")
    for i, ev in enumerate(cfg.evaluators):
        field = f"evaluators[{i}].model"
        tok = policy_tok if ev.model in (LIVE_SELF, FROZEN_SELF) else _tokenizer_for(cfg, ev.model, field)
        chat = uses_chat(cfg.scoring, tok, ev.name, predates)
        for q in cfg.questions:
            judge_answer_ids(tok, q, cfg.scoring, chat, ev.name)
