"""transformers in-process backend: batched sampling with a KV cache, and prefix-shared Yes/No scoring.

Sampling is our own short loop rather than `generate()` because each sample needs its own random stream
(seeded by run, iteration, prompt and sample index): a rollout is then the same whatever batch it lands
in, which is what makes a resumed run reproduce an uninterrupted one.
"""

from __future__ import annotations

import itertools
import math

import torch
from transformers import DynamicCache

from rlme_pipeline.backends import STATUS_NONFINITE, Judgement, Sample, fitting_rows


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s) :] = torch.tensor(s)
            mask[r, width - len(s) :] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _top_p_filter(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logp
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    cum = sorted_logp.exp().cumsum(-1)
    drop_sorted = (cum - sorted_logp.exp()) >= top_p  # keep the smallest set whose mass reaches top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logp.masked_fill(drop, float("-inf"))


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    seeds: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: set[int],
    pad_id: int,
) -> list[Sample]:
    """One completion per (prompt, seed). Log-probs are of the temperature-scaled distribution before
    top-p, the same distribution the update evaluates, so the CISPO ratio compares like with like."""
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), past_key_values=cache, use_cache=True, logits_to_keep=1)
    pos = _positions(mask)[:, -1:]
    B = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(B)]
    logps: list[list[float]] = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(out.logits[:, -1, :].float() / temperature, dim=-1)
        filtered = _top_p_filter(logp, top_p).cpu()
        # Gumbel-max with each row's own generator: exact categorical sampling, batch-independent.
        noise = torch.stack([torch.rand(filtered.shape[-1], generator=g) for g in gens])
        nxt = (filtered - torch.log(-torch.log(noise.clamp_min(1e-20)))).argmax(-1)
        chosen = logp.cpu().gather(-1, nxt[:, None])[:, 0]
        for r in range(B):
            if not done[r]:
                t = int(nxt[r])
                tokens[r].append(t)
                logps[r].append(float(chosen[r]))
                done[r] = t in eos_ids
        if all(done):
            break
        step = torch.where(torch.tensor(done), torch.tensor(pad_id), nxt)[:, None].to(device)
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        pos = pos + 1
        out = model(input_ids=step, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    return [Sample(t, l, "stop" if t and t[-1] in eos_ids else "length") for t, l in zip(tokens, logps)]


@torch.no_grad()
def judge(
    model,
    prefixes: list[list[int]],
    questions: list[list[int]],
    yes_ids: list[int],
    no_ids: list[int],
    pad_id: int,
    max_positions: int,
) -> list[list[Judgement]]:
    """Next-token log P(yes) and log P(no) after every (prefix, question) pair: result[b][k].

    The K questions of one rollout share its prefix, so the prefix is encoded once into the KV cache and
    the questions run on top of it packed into one row: question k attends to the prefix and causally to
    itself, never to the other questions (a block mask), so there is no padding between questions and no
    copy of the cache. Each answer set's probability is the sum over its (distinct, single-token) variants.
    """
    results, rows = fitting_rows(prefixes, questions, max_positions)
    if not rows:
        return results
    device = next(model.parameters()).device
    p_ids, p_mask = _left_pad([prefixes[b] for b in rows], pad_id)
    p_ids, p_mask = p_ids.to(device), p_mask.to(device)
    cache = DynamicCache()
    model(input_ids=p_ids, attention_mask=p_mask, position_ids=_positions(p_mask), past_key_values=cache, use_cache=True, logits_to_keep=1)

    which = torch.cat([torch.full((len(q),), k) for k, q in enumerate(questions)]).to(device)  # question of each packed token
    offset = torch.cat([torch.arange(len(q)) for q in questions]).to(device)  # its position within the question
    last = torch.tensor(list(itertools.accumulate(len(q) for q in questions)), device=device) - 1
    n, S = len(rows), len(which)
    own = (which[:, None] == which[None, :]) & (offset[:, None] >= offset[None, :])  # S x S: causal within a question
    allowed = torch.cat([p_mask.bool()[:, None, :].expand(n, S, -1), own.expand(n, S, S)], dim=-1)
    dtype = next(model.parameters()).dtype  # an additive mask works for every attention implementation
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    s_ids = torch.tensor([t for q in questions for t in q], device=device).expand(n, S)
    s_pos = p_mask.sum(-1, keepdim=True) + offset[None, :]
    hidden = model.get_decoder()(input_ids=s_ids, attention_mask=bias[:, None], position_ids=s_pos, past_key_values=cache,
                                 use_cache=True).last_hidden_state
    logp = torch.log_softmax(model.get_output_embeddings()(hidden[:, last]).float(), dim=-1)  # n x K x V
    ly = torch.logsumexp(logp[..., yes_ids], dim=-1).cpu()
    ln = torch.logsumexp(logp[..., no_ids], dim=-1).cpu()
    for j, b in enumerate(rows):
        for k in range(len(questions)):
            y, no = float(ly[j, k]), float(ln[j, k])
            ok = math.isfinite(y) and math.isfinite(no)
            results[b][k] = Judgement(y, no, "ok") if ok else Judgement(None, None, STATUS_NONFINITE)
    return results


class HFGenerator:
    """The `Generator` contract over a loaded transformers model."""

    def __init__(self, model, eos_ids: set[int], pad_id: int):
        self.model, self.eos_ids, self.pad_id = model, eos_ids, pad_id

    def sample(self, prompts, seeds, *, max_new_tokens, temperature, top_p) -> list[Sample]:
        return sample(self.model, prompts, seeds, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_p=top_p, eos_ids=self.eos_ids, pad_id=self.pad_id)


class HFJudge:
    """The `Judge` contract over a loaded transformers model."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.max_positions = getattr(model.config, "max_position_embeddings", 1 << 30)

    def judge(self, prefixes, questions, yes_ids, no_ids) -> list[list[Judgement]]:
        return judge(self.model, prefixes, questions, yes_ids, no_ids, self.pad_id, self.max_positions)
