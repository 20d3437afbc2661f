"""update: one policy update on this iteration's rollouts and advantages."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from rlme_pipeline.algorithm.logprobs import completion_logprobs
from rlme_pipeline.algorithm.losses import per_token, token_terms, token_weights
from rlme_pipeline.config import Config
from rlme_pipeline.models.loading import DTYPES, Loaded
from rlme_pipeline.progress import bar
from rlme_pipeline.seeds import derive
from rlme_pipeline.storage.crash import crash_point


def training_items(rollouts: pl.DataFrame, rewards: pl.DataFrame) -> tuple[list[dict], int]:
    """Rollouts with a finite advantage (failed judgements are masked out) and the number masked, in the
    order of (prompt id, sample index): what the config and seed determine. The seeded permutation of the
    update applies to this order, so ordering by rollout id (a hash of the run id) made two runs of one
    config and seed under different names train on different micro-batches from the first update on."""
    df = rollouts.join(rewards.select("rollout_id", "advantage"), on="rollout_id").sort(
        "prompt_id", "sample_index", maintain_order=True
    )
    ok = df.filter(pl.col("advantage").is_not_nan() & (pl.col("completion_token_ids").list.len() > 0))
    cols = ["prompt_token_ids", "completion_token_ids", "behavior_logprobs", "advantage"]
    return ok.select(cols).to_dicts(), df.height - ok.height


def data_cursor(cfg: Config, next_iteration: int) -> dict:
    """Where the prompt stream continues. Informational: each iteration's prompts are a pure function of
    (seed, iteration), so resuming needs no stored cursor; this records it for audits."""
    return {
        "next_iteration": next_iteration,
        "seed": cfg.run.seed,
        "prompts_per_iteration": cfg.data.prompts_per_iteration,
    }


@dataclass(frozen=True)
class Share:
    """Which micro-batches of each optimizer step this process computes: all of them (one process), or
    every `world`-th one, from `rank` on, when the update is sharded across processes (distributed_update.py).
    Each micro-batch is the same set of rollouts whatever the process count, and the loss weights are the
    whole step's (losses.token_weights), so the sum of the ranks' gradients is the one-process gradient."""

    rank: int = 0
    world: int = 1

    def micro_batches(self, step: list[dict], size: int) -> list[tuple[list[dict], bool]]:
        """(micro-batch, counted) pairs for this process. FSDP's gathers and reductions are collectives, so
        every rank runs as many passes as the busiest; a rank short of work repeats the first micro-batch
        with a zero loss weight (`counted` False): a gradient of exact zeros, and no statistics."""
        every = [step[m : m + size] for m in range(0, len(step), size)]
        mine = [(mb, True) for mb in every[self.rank :: self.world]]
        return mine + [(every[0], False)] * (-(-len(every) // self.world) - len(mine))

    def total(self, sums: dict, device) -> dict:
        """The statistics summed over the processes (the gradient norm is already the global one)."""
        if self.world == 1:
            return sums
        import torch.distributed as dist

        keys = [k for k in sums if k != "grad_norm"]
        t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return {**sums, **dict(zip(keys, t.tolist()))}


def update(
    cfg: Config,
    iteration: int,
    rollouts: pl.DataFrame,
    rewards: pl.DataFrame,
    lm: Loaded,
    reference: torch.nn.Module | None,
    optimizer_state: dict | None,
    share: Share = Share(),
) -> tuple[torch.optim.Optimizer, dict, dict]:
    """Train `lm.model` in place; returns (optimizer, trainer state, metrics) for the checkpoint.

    `reference` is the KL anchor (beta > 0). The optimizer is the one kept beside the model when this
    process trained the previous iteration, else a new one loaded from `optimizer_state`. Dropout, if a
    model has it, draws from the global torch RNG, which the caller restores from the previous checkpoint
    so that a resumed process trains exactly as the uninterrupted one would have. `share`: this process's
    part of each step when the update is sharded (distributed_update.py); the metrics are the whole step's."""
    a, o = cfg.algorithm, cfg.optimizer
    items, masked = training_items(rollouts, rewards)
    model, tok = lm.model, lm.tokenizer
    opt = lm.optimizer  # set when this process trained the previous iteration: the state it saved
    if opt is None:
        # Over the trainable parameters only: all of them in full fine-tuning, the adapter's with LoRA.
        opt = new_optimizer([p for p in model.parameters() if p.requires_grad], cfg, optimizer_state)
    for group in opt.param_groups:  # the schedule's lr, whatever the saved state or the last iteration held
        group["lr"] = o.lr_at(iteration)

    step_size = o.micro_batch_size * o.grad_accumulation
    n_steps = o.epochs * -(-len(items) // step_size) if items else 0
    sums = new_sums()
    model.train()
    if o.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with bar(f"update iter {iteration}: optimizer steps", n_steps) as advance:
        for epoch in range(o.epochs):
            perm = np.random.default_rng(derive(cfg.run.seed, iteration, "update", epoch)).permutation(len(items))
            for s in range(0, len(items), step_size):
                # Sorted by length, so each micro-batch pads little; the step's gradient is the same sum
                # (token weights are per step), only the order of the additions changes.
                step = sorted(
                    (items[j] for j in perm[s : s + step_size]),
                    key=lambda it: len(it["prompt_token_ids"]) + len(it["completion_token_ids"]),
                )
                opt.zero_grad(set_to_none=True)
                first = epoch == 0 and s == 0
                accumulate_step(model, reference, step, cfg, tok.pad_token_id, sums, first=first, share=share)
                norm = torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], o.max_grad_norm)
                sums["grad_norm"] += norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor: sharded
                opt.step()
                opt.zero_grad(set_to_none=True)  # a full fp32 copy of the weights: not kept through generate/score
                advance()
                crash_point("update:mid", iteration)
    if o.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    sums = {k: float(v) for k, v in share.total(sums, next(model.parameters()).device).items()}  # one host sync

    state = {
        "iteration": iteration,
        "optimizer_steps": n_steps,
        "trained_rollouts": len(items),
        "seed": cfg.run.seed,
        "data_cursor": data_cursor(cfg, iteration + 1),
    }
    tokens = max(sums["tokens"], 1)
    return (
        opt,
        state,
        {
            "loss": sums["loss"] / max(n_steps, 1),
            "clip_ratio": sums["clipped"] / tokens,
            "kl": sums["kl"] / tokens if a.beta > 0 else None,
            "grad_norm": sums["grad_norm"] / max(n_steps, 1),
            "behavior_mismatch": sums["mismatch"] / max(sums["mismatch_tokens"], 1),
            "optimizer_steps": n_steps,
            "trained_rollouts": len(items),
            "masked_rollouts": masked,
        },
    )


def fused_adamw(devices) -> bool:
    """Whether AdamW runs as one fused kernel: on CUDA, where it is several times faster than the
    per-tensor loop and allocates no temporaries; the CPU keeps the plain loop (and its exact numbers)."""
    devices = [torch.device(d) for d in devices]
    return bool(devices) and all(d.type == "cuda" for d in devices)


def new_optimizer(params: list, cfg: Config, state: dict | None) -> torch.optim.AdamW:
    """AdamW over `params`, fused on CUDA, from a checkpoint's `state` if given. A state dict carries
    the implementation it was saved with (its param_groups' fused/foreach), and load_state_dict would
    put that back: this process's choice wins, so a GPU checkpoint resumes on a CPU and vice versa."""
    o = cfg.optimizer
    opt = torch.optim.AdamW(
        params, lr=o.lr, weight_decay=o.weight_decay, fused=True if fused_adamw(p.device for p in params) else None
    )
    if state is not None:
        mine = {k: opt.param_groups[0][k] for k in ("fused", "foreach")}
        opt.load_state_dict({**state, "param_groups": [{**g, **mine} for g in state["param_groups"]]})
    return opt


def new_sums() -> dict:
    """The update's running statistics. They become tensors on the model's device as `accumulate_step`
    adds to them, and are read once, after the last step."""
    return {
        "loss": 0.0,
        "clipped": 0.0,
        "kl": 0.0,
        "tokens": 0,
        "grad_norm": 0.0,
        "mismatch": 0.0,
        "mismatch_tokens": 0,
    }


def accumulate_step(
    model, reference, step: list[dict], cfg: Config, pad_id: int, sums: dict, first: bool, share: Share = Share()
) -> None:
    """Back-propagate one optimizer step's loss, micro-batch by micro-batch, into model's .grad.

    Every tensor is made on the log-probs' device (the model's), once per micro-batch: no per-token host
    round trip, and no host sync at all (statistics are added up as device tensors in `sums`). With a
    half-precision policy dtype the forward passes run under autocast over the fp32 master weights; the
    loss terms are float32 either way. `first`: the step before any update, where the trainer's log-probs
    are compared with the sampler's (behavior mismatch). `share`: which of the step's micro-batches this
    process computes; the weights are normalised over the whole step either way."""
    a, o, g = cfg.algorithm, cfg.optimizer, cfg.generation
    n_tokens = sum(len(it["completion_token_ids"]) for it in step)
    for micro, counted in share.micro_batches(step, o.micro_batch_size):
        pairs = [(it["prompt_token_ids"], it["completion_token_ids"]) for it in micro]
        lens = [len(c) for _, c in pairs]
        with autocast(model, cfg.policy.dtype):
            logp = completion_logprobs(
                model, pairs, pad_id=pad_id, temperature=g.temperature, chunk_tokens=o.logprob_chunk_tokens
            )
            ref_logp = None
            if reference is not None:
                with torch.no_grad():
                    ref_logp = completion_logprobs(
                        reference, pairs, pad_id=pad_id, temperature=g.temperature, chunk_tokens=o.logprob_chunk_tokens
                    )
        dev = logp.device
        old = torch.tensor([x for it in micro for x in it["behavior_logprobs"]], dtype=torch.float32, device=dev)
        adv = per_token([float(it["advantage"]) for it in micro], lens, dev)
        terms, st = token_terms(a.loss, logp, old, adv, eps=a.eps, eps_high=a.eps_high, ref_logp=ref_logp, beta=a.beta)
        weights = token_weights(a.loss, lens, len(step), n_tokens, g.max_new_tokens, device=dev)
        loss = (terms * (weights if counted else torch.zeros_like(weights))).sum()
        loss.backward()
        if not counted:
            continue
        sums["loss"] += loss.detach()
        sums["clipped"] += st["clipped"].sum()
        if "kl" in st:
            sums["kl"] += st["kl"].sum()
        sums["tokens"] += sum(lens)
        if first:
            sums["mismatch"] += (logp.detach() - old).abs().sum()
            sums["mismatch_tokens"] += sum(lens)


def autocast(model, dtype: str):
    """bf16/fp16 compute over fp32 weights on the model's device; nothing for a float32 policy."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=next(model.parameters()).device.type, dtype=DTYPES[dtype])
