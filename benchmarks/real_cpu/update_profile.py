"""Where one update's time goes: forward, backward, AdamW step, checkpoint write; and how many of its tokens are
prompt tokens that every sample of a group recomputes.

    PYTHONPATH=. python -m benchmarks.real_cpu.update_profile RUN [--iteration 0]

Re-does iteration i's update of a committed LoRA run (e.g. a benchmarks/real_cpu steering run) on a copy of the
run, with the update's own code (`jobs.policy_update.update_policy`), timing the four parts by wrapping the
functions it calls. Nothing of the original run is touched.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

import rlme_pipeline.jobs.policy_update as policy_update
import rlme_pipeline.stages.update as update_stage
from rlme_pipeline.models import adapters
from rlme_pipeline.models.loading import ModelPool
from rlme_pipeline.models.weights_at import policy_at
from rlme_pipeline.storage.run import ROLLOUTS_FILE, Run

SECONDS = {"forward": 0.0, "backward": 0.0, "AdamW step": 0.0, "checkpoint write": 0.0}


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SECONDS[name] += time.perf_counter() - t

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--iteration", type=int, default=0)
    a = ap.parse_args()
    src = Path(a.run)
    copy = Path(tempfile.mkdtemp(prefix="rlme-update-profile-")) / src.name  # same run id: the manifests say it
    shutil.copytree(src, copy)
    run = Run.from_url(str(copy))
    cfg, i = run.config(), a.iteration
    if cfg.policy.lora is None:
        raise SystemExit("a LoRA run, please: a full fine-tune's trainee comes from the train job's pool")

    update_stage.completion_logprobs = timed("forward", update_stage.completion_logprobs)
    torch.Tensor.backward = timed("backward", torch.Tensor.backward)
    torch.optim.AdamW.step = timed("AdamW step", torch.optim.AdamW.step)
    policy_update.checkpoint.save = timed("checkpoint write", policy_update.checkpoint.save)

    ref = policy_at(run, cfg, i)
    lm = adapters.trainable(ModelPool(2), cfg, ref, i)  # as the train job makes it (iteration 0: a fresh adapter)
    t0 = time.perf_counter()
    policy_update.update_policy(cfg, run, i, ref.path, lm, None)
    total = time.perf_counter() - t0
    print(
        f"update of iteration {i} of {src}: {total:.1f} s: " + ", ".join(f"{k} {v:.2f} s" for k, v in SECONDS.items())
    )

    roll = run.read_table(i, ROLLOUTS_FILE)
    p, c = int(roll["prompt_token_ids"].list.len().sum()), int(roll["completion_token_ids"].list.len().sum())
    once = roll.group_by("prompt_id").agg(pl.col("prompt_token_ids").list.len().first().alias("n"))["n"].sum()
    print(
        f"tokens: {p} prompt + {c} completion in {roll.height} sequences ({p / (p + c):.0%} prompt); each group's "
        f"prompt once: {once + c} tokens, {(once + c) / (p + c):.2f} of them"
    )
    shutil.rmtree(copy.parent)


if __name__ == "__main__":
    main()
