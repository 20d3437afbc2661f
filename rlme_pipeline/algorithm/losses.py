"""Policy-gradient losses on packed completion tokens.

Every tensor here is 1-D over the completion tokens of an optimizer step (micro-batches concatenated),
so the three losses differ only in the per-token term and in the per-token weight that turns a sum into
the loss's normalisation:

    cispo    weight 1 / (active tokens in the step)                      token-level mean
    grpo     weight 1 / (|y_i| * sequences in the step)                  mean over sequences of token means
    dr_grpo  weight 1 / (max_new_tokens * sequences in the step)         constant normaliser (Dr. GRPO)

The weights are computed for the whole step up front, so gradient accumulation over micro-batches sums
to exactly the loss of the full step.
"""

from __future__ import annotations

from typing import Literal

import torch

Kind = Literal["cispo", "grpo", "dr_grpo"]


def token_terms(
    kind: Kind,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    *,
    eps: float,
    eps_high: float,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss and per-token diagnostics (clipped indicator, k3 KL)."""
    ratio = torch.exp(logp - old_logp)
    if kind == "cispo":
        # The IS weight is capped and detached: every token keeps a gradient through log pi.
        w = ratio.clamp(max=eps_high).detach()
        loss = -w * adv * logp
        clipped = (ratio > eps_high).float()
    else:
        unclipped = ratio * adv
        clipped_obj = ratio.clamp(1 - eps, 1 + eps) * adv
        loss = -torch.minimum(unclipped, clipped_obj)
        clipped = (clipped_obj < unclipped).float()
    stats = {"clipped": clipped.detach()}
    if beta > 0:
        assert ref_logp is not None, "beta > 0 needs reference log-probs"
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1  # k3: unbiased, non-negative estimate of KL(pi || ref)
        loss = loss + beta * kl
        stats["kl"] = kl.detach()
    return loss, stats


def token_weights(
    kind: Kind, seq_lens: list[int], n_seqs: int, n_tokens: int, max_new_tokens: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Weights for the tokens of the given sequences (in order), normalised by the step's totals, built
    on `device` (the log-probs' device) in one host-to-device copy."""
    if kind == "cispo":
        per_seq = [1.0 / n_tokens] * len(seq_lens)
    elif kind == "grpo":
        per_seq = [1.0 / (L * n_seqs) for L in seq_lens]
    else:
        per_seq = [1.0 / (max_new_tokens * n_seqs)] * len(seq_lens)
    return per_token(per_seq, seq_lens, device)


def per_token(per_seq: list[float], seq_lens: list[int], device: torch.device | str) -> torch.Tensor:
    """Each sequence's value repeated over its tokens, as one float32 tensor on `device`."""
    values = torch.tensor(per_seq, dtype=torch.float32, device=device)
    return values.repeat_interleave(torch.tensor(seq_lens, dtype=torch.long, device=device), output_size=sum(seq_lens))
