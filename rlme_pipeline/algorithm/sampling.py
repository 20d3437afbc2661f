"""Categorical sampling on the model's device whose randomness depends only on (row seed, step).

A resumed run must reproduce an uninterrupted one, so a sample may depend on its own seed and prompt,
never on the other rows of its batch. Rather than one host-side generator per row (a batch x vocabulary
noise tensor drawn on the CPU at every token), each row draws ONE uniform per step from a counter-based
hash of (seed, step), computed with integer tensor ops on the device, and picks its token by inverse CDF:
the first token whose cumulative probability exceeds u times the (kept) mass. That is exact categorical
sampling with a single uniform, so the only per-step work over the vocabulary is a log-softmax, an exp and
one block-sum pass; cumulative sums are float64, so a tail token's share is not rounded away. Integer
ops are exact, so the uniforms are bit-identical on every device.

Top-p keeps the smallest set of most likely tokens whose mass reaches top_p and samples within it in
proportion to the probabilities. Tied probabilities stay in the order the sort gives them: deterministic for
a given row, so it cannot break batch independence, and the cheaper unstable sort is ~15% faster on a CPU.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_LANES = (0x9E3779B9, 0x7F4A7C15)  # two independent hash streams: 26 bits each make a 52-bit uniform
BLOCK = 1024  # tokens per block of the two-level inverse-CDF search


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x in [0, 2**32), in 16-bit halves: no int64 product ever overflows."""
    return ((x & 0xFFFF) * c + (((x >> 16) * c) & 0xFFFF) * 65536) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection with full avalanche."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _hash(seed: torch.Tensor, step: torch.Tensor, lane: int) -> torch.Tensor:
    h = _fmix32((step ^ lane) & _M32)
    h = _fmix32(h ^ (seed & _M32))
    return _fmix32(h ^ ((seed >> 32) & _M32))  # the seed's two 32-bit words, as unsigned


def uniforms(seeds: torch.Tensor, steps: int) -> torch.Tensor:
    """[rows, steps] float64 uniforms in [0, 1 - 2**-52], entry (r, t) a function of (seeds[r], t) alone.

    `seeds` is an int64 tensor (rlme_pipeline.seeds.derive gives 63-bit seeds; a negative one counts as
    its two's complement)."""
    s = seeds.to(torch.int64)[:, None]
    t = torch.arange(steps, dtype=torch.int64, device=seeds.device)[None, :]
    hi, lo = (_hash(s, t, lane) >> 6 for lane in _LANES)
    return (hi * (1 << 26) + lo).to(torch.float64) * 2.0**-52


def draw(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of `logits` [rows, vocab] by inverse CDF at uniforms `u` [rows].

    Returns (token ids [rows], their log-probs [rows]); the log-probs are log_softmax(logits / T), before
    top-p: the behaviour distribution the update's importance ratio compares against. Temperature 0 is
    greedy (held-out evaluation): the most likely token, its log-prob untempered, `u` unused."""
    if temperature == 0:
        logp = torch.log_softmax(logits.float(), dim=-1)
        ids = logp.argmax(dim=-1, keepdim=True)
        return ids[:, 0], logp.gather(-1, ids)[:, 0]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    ranked, order = logp, None
    if top_p < 1.0:
        ranked, order = logp.sort(dim=-1, descending=True)
    p = _blocked_exp(ranked)
    ends = p.sum(-1, dtype=torch.float64).cumsum(-1)  # cumulative mass at each block's end
    mass = ends[:, -1]
    if order is not None:  # the nucleus ends at the first token whose cumulative mass reaches top_p
        _, mass = _first_past(p, ends, torch.full_like(mass, top_p), reach=True)
    idx, _ = _first_past(p, ends, u.to(mass.dtype) * mass, reach=False)
    ids = idx.clamp(max=logp.shape[-1] - 1)[:, None]
    if order is not None:
        ids = order.gather(-1, ids)
    return ids[:, 0], logp.gather(-1, ids)[:, 0]


def _blocked_exp(ranked: torch.Tensor) -> torch.Tensor:
    """exp(ranked) as [rows, blocks, block], the tail zero-padded (block: BLOCK, or the vocabulary if smaller).

    A full float64 cumulative sum over the vocabulary costs more than the rest of the draw on a CPU; in
    blocks, the vocabulary is read once for the block sums and only the block holding the target is scanned."""
    rows, V = ranked.shape
    block = min(BLOCK, V)
    buf = torch.empty((rows, -(-V // block) * block), dtype=torch.float32, device=ranked.device)
    buf[:, V:] = 0
    torch.exp(ranked, out=buf[:, :V])
    return buf.view(rows, -1, block)


def _first_past(
    p: torch.Tensor, ends: torch.Tensor, target: torch.Tensor, reach: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first token whose cumulative mass exceeds `target` (or reaches it, if `reach`), and
    that cumulative mass, in float64. A token of zero probability is never first past a target below the
    total: its cumulative mass equals its predecessor's."""
    t, block = target[:, None], p.shape[-1]
    past = torch.lt if reach else torch.le  # counts the tokens (blocks) still short of the target
    blk = past(ends, t).sum(-1, keepdim=True).clamp(max=ends.shape[-1] - 1)
    start = ends.gather(-1, (blk - 1).clamp_min(0)) * (blk > 0)
    cum = start + p.gather(1, blk[:, :, None].expand(-1, 1, block))[:, 0].cumsum(-1, dtype=torch.float64)
    at = past(cum, t).sum(-1, keepdim=True).clamp(max=block - 1)
    return (blk * block + at)[:, 0], cum.gather(-1, at)[:, 0]
