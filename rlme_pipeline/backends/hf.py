"""transformers in-process backend: batched sampling with a KV cache, and prefix-shared Yes/No scoring.

Sampling is our own short loop rather than `generate()` because each sample needs its own random stream
(seeded by run, iteration, prompt and sample index): a rollout is then the same whatever batch it lands
in, which is what makes a resumed run reproduce an uninterrupted one. The stream is counter-based
(rlme_pipeline.algorithm.sampling), so everything stays on the model's device: only the chosen ids and their
log-probs come back, once, at the end, and the host looks at the batch only to ask whether every row has
stopped (every step on a CPU, every few steps on an accelerator, where a sync stalls the launch queue).
Every tensor is built on the model's device: nothing crosses to the host inside the loops.
"""

from __future__ import annotations

import itertools
import math

import torch
from transformers import DynamicCache

from rlme_pipeline.algorithm.sampling import draw, uniforms
from rlme_pipeline.backends import STATUS_NONFINITE, Judgement, Sample, fitting_rows

ACCELERATOR_EOS_CHECK_EVERY = 8  # steps between "all rows stopped?" syncs off the CPU; rows run on at most 7 steps


def _left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, built directly on `device` (one copy from the host)."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device)
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _device(model) -> torch.device:
    return next(model.parameters()).device


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
    eos_check_every: int | None = None,
) -> list[Sample]:
    """One completion per (prompt, seed). Log-probs are of the temperature-scaled distribution before
    top-p, the same distribution the update evaluates, so the CISPO ratio compares like with like.

    Step t of row r uses uniform (seeds[r], t) alone, so a completion is a prefix of the same row's longer
    one and does not depend on its batch. `eos_check_every` only decides how often the host looks (default:
    1 on a CPU, ACCELERATOR_EOS_CHECK_EVERY elsewhere); the samples are the same for any value."""
    device = _device(model)
    every = eos_check_every or (1 if device.type == "cpu" else ACCELERATOR_EOS_CHECK_EVERY)
    B = len(prompts)
    ids, mask = _left_pad(prompts, pad_id, device)
    u = uniforms(torch.tensor(seeds, dtype=torch.int64, device=device), max_new_tokens)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = DynamicCache()
    pos = _positions(mask)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1
    )
    pos = pos[:, -1:]
    steps = 0
    for t in range(max_new_tokens):
        nxt, lp = draw(out.logits[:, -1, :], u[:, t], temperature, top_p)
        tokens[:, t], logps[:, t] = nxt, lp
        done |= torch.isin(nxt, eos)
        steps = t + 1
        if steps == max_new_tokens or (steps % every == 0 and bool(done.all())):
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        pos = pos + 1
        out = model(
            input_ids=nxt.masked_fill(done, pad_id)[:, None],
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        )
    return [_finish(t, lp, eos_ids) for t, lp in zip(tokens[:, :steps].tolist(), logps[:, :steps].tolist())]


def _finish(tokens: list[int], logps: list[float], eos_ids: set[int]) -> Sample:
    """Cut a row at its first stop token (the steps after it were only waiting for the batch)."""
    n = next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
    return Sample(tokens[:n], logps[:n], "stop" if n and tokens[n - 1] in eos_ids else "length")


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
    device = _device(model)
    p_ids, p_mask = _left_pad([prefixes[b] for b in rows], pad_id, device)
    cache = DynamicCache()
    model(
        input_ids=p_ids,
        attention_mask=p_mask,
        position_ids=_positions(p_mask),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )

    lengths = [len(q) for q in questions]
    which = torch.tensor(
        [k for k, n in enumerate(lengths) for _ in range(n)], device=device
    )  # question of each packed token
    offset = torch.tensor([i for n in lengths for i in range(n)], device=device)  # its position within the question
    last = torch.tensor(list(itertools.accumulate(lengths)), device=device) - 1
    n, S = len(rows), len(which)
    own = (which[:, None] == which[None, :]) & (offset[:, None] >= offset[None, :])  # S x S: causal within a question
    allowed = torch.cat([p_mask.bool()[:, None, :].expand(n, S, -1), own.expand(n, S, S)], dim=-1)
    dtype = next(model.parameters()).dtype  # an additive mask works for every attention implementation
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    s_ids = torch.tensor([t for q in questions for t in q], device=device).expand(n, S)
    s_pos = p_mask.sum(-1, keepdim=True) + offset[None, :]
    hidden = model.get_decoder()(
        input_ids=s_ids, attention_mask=bias[:, None], position_ids=s_pos, past_key_values=cache, use_cache=True
    ).last_hidden_state
    logp = torch.log_softmax(model.get_output_embeddings()(hidden[:, last]).float(), dim=-1)  # n x K x V
    answers = [torch.tensor(a, dtype=torch.long, device=device) for a in (yes_ids, no_ids)]
    ly, ln = torch.stack([torch.logsumexp(logp[..., a], dim=-1) for a in answers]).cpu()  # the one copy to the host
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
        return sample(
            self.model,
            prompts,
            seeds,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
        )


class HFJudge:
    """The `Judge` contract over a loaded transformers model."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.max_positions = getattr(model.config, "max_position_embeddings", 1 << 30)

    def judge(self, prefixes, questions, yes_ids, no_ids) -> list[list[Judgement]]:
        return judge(self.model, prefixes, questions, yes_ids, no_ids, self.pad_id, self.max_positions)
