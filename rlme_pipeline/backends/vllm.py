"""The `vllm` backend: vllm.LLM in-process (GPU hosts; `pip install 'rlme[vllm]'`).

Imported only when a stage selects it. Same request shapes as the `openai` backend: one SamplingParams
per (prompt, seed) with n = 1 (per-sample determinism), `logprobs_mode="processed_logprobs"` (log-probs of
logits / T), prefix caching on, and `logprob_token_ids` for the exact answer log-probs.
Scripts that build an LLM need an `if __name__ == "__main__":` guard (vLLM starts worker processes).
This module imports nothing from the pipeline beyond `rlme_pipeline.backends`, so it runs in the vLLM
virtualenv too.

The policy's engine is colocated with the trainer (`KeptEngine`, docs/vllm.md "Colocated"): built once in
this process, it takes each update's weights from the trainer's tensors (`push_weights`), and where the
platform has vLLM's sleep mode (CUDA) it gives its GPU memory back between uses.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from rlme_pipeline.backends import STATUS_NONFINITE, STATUS_OK, Judgement, Sample, fitting_rows, logsumexp

# Tensors in HF checkpoint names (a state dict's items), in any dtype: vLLM casts each as it copies it in.
Weights = Iterable[tuple[str, object]]


def load_llm(model: str, dtype: str = "float32", *, colocate: bool = False, sleep: bool = False, **engine_kwargs):
    """A vllm.LLM on `model`. colocate: its engine core and worker run in this process (vLLM's
    VLLM_ENABLE_V1_MULTIPROCESSING=0, set only while it is built), so `push_weights` hands it the trainer's
    tensors by reference instead of through a pipe. sleep: vLLM's sleep mode where the platform has it
    (CUDA, ROCm, XPU; vLLM refuses it elsewhere, so on a CPU it is left off)."""
    from vllm import LLM

    kw = dict(enable_prefix_caching=True, logprobs_mode="processed_logprobs", seed=0)
    if sleep and sleep_mode_available():
        kw["enable_sleep_mode"] = True
    kw.update(engine_kwargs)
    with _environ(VLLM_ENABLE_V1_MULTIPROCESSING="0") if colocate else _environ():
        llm = LLM(model=model, dtype=dtype, **kw)
    llm.rlme_weights = model  # the directory whose weights it holds (sync_weights)
    return llm


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shutdown(llm) -> None:
    """Stop the engine core (its processes, or in this process its worker) and let the LLM go."""
    import gc

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    try:
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    except Exception:  # noqa: BLE001 - best effort; the LLM is dropped either way
        pass
    del llm
    gc.collect()


def sleep_mode_available() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_sleep_mode_available()


def in_process(llm) -> bool:
    """Whether the engine core and its one worker run in this process (load_llm(colocate=True), no tensor
    parallelism): then a tensor handed to it is the trainer's tensor, not a copy through a pipe."""
    from vllm.v1.engine.core_client import InprocClient

    one_worker = llm.llm_engine.vllm_config.parallel_config.world_size == 1
    return one_worker and isinstance(llm.llm_engine.engine_core, InprocClient)


def sync_weights(llm, path: str) -> bool:
    """Hold the full weights in `path` (same architecture). False when it already holds them."""
    if getattr(llm, "rlme_weights", None) == path:
        return False
    reload_weights(llm, path)
    return True


def reload_weights(llm, path: str) -> None:
    """The weights in the directory `path` (same architecture) into the engine in place: the workers'
    `reload_weights`, then the prefix cache computed with the old weights is dropped."""
    llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
    llm.reset_prefix_cache()
    llm.rlme_weights = path


def push_weights(llm, weights: Weights) -> None:
    """Load the trainer's tensors into the engine in place, with no file between them: vLLM's worker
    `reload_weights(weights_iterator=...)`, the same in-place reload a checkpoint directory goes through
    (checkpoint names; stacked q/k/v and gate/up, tied embeddings and the cast to the engine's dtype are
    vLLM's), then the prefix cache computed with the old weights is dropped. The engine must run in this
    process: the iterator is consumed here, one tensor at a time, never pickled into a pipe."""
    if not in_process(llm):
        raise ValueError(
            "push_weights: the engine's worker runs in another process; build it with load_llm(colocate=True) "
            "and tensor_parallel_size 1, or load the checkpoint directory with reload_weights"
        )
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
    llm.reset_prefix_cache()
    llm.rlme_weights = None  # no directory holds these weights (sync_weights must reload)


class KeptEngine:
    """An in-process engine kept for its owner's lifetime (a training process), which changes weights in
    place instead of being rebuilt (30-80 s a start on a small CPU box). `holds` names the weights in it
    (a content hash); the trainer's tensors are pushed when it has them, else the directory is reloaded.

    With sleep mode (a GPU), the engine sleeps at level 2 after each use: weights and KV cache are
    discarded, so the trainer gets that memory for scoring and the update; the next use wakes the weights'
    memory, loads the weights it needs (it holds none after such a sleep), then wakes the KV cache."""

    def __init__(self, llm, holds: str | None):
        self.llm, self.holds = llm, holds
        self.sleeps = bool(llm.llm_engine.vllm_config.model_config.enable_sleep_mode)
        self.asleep = False

    @contextmanager
    def serving(self, name: str, path: str, tensors: Callable[[], Weights] | None = None) -> Iterator[float | None]:
        """The engine awake and holding `name`: the weights in `path`, or the tensors `tensors()` gives
        (the same weights, in memory). Yields the seconds it took to load them, None when it held them."""
        if self.asleep:
            import torch

            torch.accelerator.empty_cache()  # the trainer's cached, unused blocks: the engine needs them back
            self.llm.wake_up(tags=["weights"])
        seconds = self._hold(name, path, tensors)
        if self.asleep:
            if not self.llm.wake_up(tags=["kv_cache"]):  # anything else still asleep (CUDA graphs' memory)
                self.llm.wake_up()
            self.asleep = False
        try:
            yield seconds
        finally:
            if self.sleeps:
                self.llm.sleep(level=2)
                self.asleep, self.holds = True, None

    def _hold(self, name: str, path: str, tensors: Callable[[], Weights] | None) -> float | None:
        if self.holds == name:
            return None
        t0 = time.perf_counter()
        if tensors is not None:
            push_weights(self.llm, tensors())
        else:
            reload_weights(self.llm, path)
        self.holds = name
        return time.perf_counter() - t0


def adapter(llm, name: str, path: str):
    """The LoRARequest that serves the adapter in `path` under `name` (a content hash), loaded now (the
    LLM must have enable_lora). vLLM wants an int id per adapter: counted per LLM."""
    from vllm.lora.request import LoRARequest

    ids = llm.__dict__.setdefault("rlme_adapter_ids", {})
    if name not in ids:
        ids[name] = len(ids) + 1
        llm.llm_engine.add_lora(LoRARequest(name, ids[name], path))
    return LoRARequest(name, ids[name], path)


class VLLMGenerator:
    # vLLM schedules and batches what it is given: the generate stage hands it every request in one call
    schedules_batches = True

    def __init__(self, llm, lora=None):
        self.llm, self.lora = llm, lora  # lora: a LoRARequest (adapter()) or None for the plain weights

    def sample(self, prompts, seeds, *, max_new_tokens, temperature, top_p) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=1,
                seed=int(s),
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                logprobs=0,
                skip_special_tokens=False,
            )
            for s in seeds
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)
        samples = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            lps = [float(step[t].logprob) for t, step in zip(ids, c.logprobs)]
            samples.append(Sample(ids, lps, "stop" if c.finish_reason == "stop" else "length"))
        return samples


class VLLMJudge:
    def __init__(self, llm, lora=None):
        self.llm, self.lora = llm, lora
        self.max_positions = llm.llm_engine.model_config.max_model_len

    def judge(self, prefixes, questions, yes_ids, no_ids) -> list[list[Judgement]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        K = len(questions)
        wanted = sorted(set(yes_ids) | set(no_ids))
        results, rows = fitting_rows(prefixes, questions, self.max_positions)
        prompts = [TokensPrompt(prompt_token_ids=list(prefixes[b]) + list(q)) for b in rows for q in questions]
        if not prompts:
            return results
        sp = SamplingParams(max_tokens=1, temperature=0.0, logprobs=len(wanted), logprob_token_ids=wanted)
        outs = self.llm.generate(prompts, sp, use_tqdm=False, lora_request=self.lora)
        for i, o in enumerate(outs):
            b, k = rows[i // K], i % K
            top = o.outputs[0].logprobs[0]
            y = logsumexp([float(top[t].logprob) for t in yes_ids])
            n = logsumexp([float(top[t].logprob) for t in no_ids])
            ok = math.isfinite(y) and math.isfinite(n)
            results[b][k] = Judgement(y, n, STATUS_OK) if ok else Judgement(None, None, STATUS_NONFINITE)
        return results
