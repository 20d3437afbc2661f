"""The `vllm` backend: vllm.LLM in-process (GPU hosts; `pip install 'rlme[vllm]'`).

Imported only when a stage selects it. Same request shapes as the `openai` backend: one SamplingParams
per (prompt, seed) with n = 1 (per-sample determinism), `logprobs_mode="processed_logprobs"` (log-probs of
logits / T), prefix caching on, and `logprob_token_ids` for the exact answer log-probs.
Scripts that build an LLM need an `if __name__ == "__main__":` guard (vLLM starts worker processes).
This module imports nothing from the pipeline beyond `rlme_pipeline.backends`, so it runs in the vLLM
virtualenv too.
"""

from __future__ import annotations

import math

from rlme_pipeline.backends import STATUS_NONFINITE, STATUS_OK, Judgement, Sample, fitting_rows, logsumexp


def load_llm(model: str, dtype: str = "float32", **engine_kwargs):
    from vllm import LLM

    kw = dict(enable_prefix_caching=True, logprobs_mode="processed_logprobs", seed=0)
    kw.update(engine_kwargs)
    llm = LLM(model=model, dtype=dtype, **kw)
    llm.rlme_weights = model  # the directory whose weights it holds (sync_weights)
    return llm


def sync_weights(llm, path: str) -> bool:
    """Hold the full weights in `path` (same architecture): the workers' `reload_weights` in place, then
    the prefix cache computed with the old weights is dropped. False when it already holds them."""
    if getattr(llm, "rlme_weights", None) == path:
        return False
    llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
    llm.reset_prefix_cache()
    llm.rlme_weights = path
    return True


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
