"""Log-probabilities of completion tokens with bounded memory.

The naive way materialises logits for batch x sequence x vocabulary in float32 (GBs at a 150k vocabulary).
Here only completion positions go through the LM head, in chunks of `chunk_tokens`, and each chunk is
recomputed in the backward pass (activation checkpointing), so the peak is one chunk's logits.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(h).float() / temperature
    return logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def packed_inputs(pairs: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded prompt+completion rows, and the (row, position) of every position that predicts a
    completion token, with that token as target, packed in sequence order."""
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for r, (p, c) in enumerate(pairs):
        seq = p + c
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        rows += [r] * len(c)
        cols += range(len(p) - 1, len(p) + len(c) - 1)
        targets += c
    return ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(targets, dtype=torch.long)


def completion_logprobs(
    model,
    pairs: list[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """log pi(y_t | x, y_<t) for every completion token of every (prompt_ids, completion_ids) pair,
    concatenated in order. Differentiable when grad is enabled."""
    device = next(model.parameters()).device
    inputs = [t.to(device) for t in packed_inputs(pairs, pad_id)]
    sharded = getattr(model, SHARDED_FORWARD, None)
    if sharded is not None:
        return sharded(*inputs, temperature=temperature, chunk_tokens=chunk_tokens)
    return packed_logprobs(model, *inputs, temperature=temperature, chunk_tokens=chunk_tokens)


# A model sharded with FSDP2 (distributed_update.py) carries `packed_logprobs` as a method under this name,
# registered as a forward method of its root, so that the root's own parameters (embeddings, final norm,
# LM head) are gathered around the whole computation below, which calls the decoder and the head directly.
SHARDED_FORWARD = "rlme_packed_logprobs"


def packed_logprobs(model, ids, mask, rows, cols, targets, *, temperature: float, chunk_tokens: int) -> torch.Tensor:
    """completion_logprobs on inputs already packed (packed_inputs) and on the model's device."""
    device = ids.device
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    h = hidden[rows, cols]
    head = model.get_output_embeddings()
    out = []
    for s in range(0, h.shape[0], chunk_tokens):
        hc, tc = h[s : s + chunk_tokens], targets[s : s + chunk_tokens]
        if torch.is_grad_enabled():
            out.append(checkpoint(_chunk_logprobs, head, hc, tc, temperature, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(head, hc, tc, temperature))
    return torch.cat(out) if out else torch.zeros(0, device=device)
