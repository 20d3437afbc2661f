"""Iteration time with checkpoints against without, and what `checkpoint.full_every` and
`checkpoint.background_write` take off the critical path (issue 27, item 6: the CPU proxy).

    PYTHONPATH=. python -m benchmarks.checkpoint_overlap              # SmolLM2-135M-Instruct (make real-models)
    PYTHONPATH=. python -m benchmarks.checkpoint_overlap --rounds 2   # every variant twice, interleaved
    PYTHONPATH=. python -m benchmarks.checkpoint_overlap --tiny       # the tiny demo policy (the test suite runs it)
    PYTHONPATH=. python -m benchmarks.checkpoint_overlap --device cuda --dtype bfloat16   # on a GPU

Each variant trains a fresh run through rlme's own loop (`jobs/train.py`: generate, score, aggregate,
update, commit) on local disk, in this process, with the same config and seed, keeping the last 2
checkpoints (`checkpoint.keep_last: 2`: deleting older ones is part of every commit, as in a long run, and
12 full checkpoints of 1.6 GB would fill a shared disk):

  none            the write taken out: a benchmark-only patch of `Checkpoint.write` writes the small files
                  and a tensor-less model.safetensors (the loop still finds a checkpoint and keeps the trained
                  model in memory, as it always does); what an iteration costs without checkpoints
  full1           the full state (fp32 weights + AdamW state + RNG) every iteration, written on the critical
                  path: the default
  full1-deferred  the same, written while the next iteration samples (background_write)
  full10          the full state every 10th iteration, the weights alone between
  full10-deferred the same, written in the background

An iteration's seconds are the time between two consecutive commits, wall-clock and this process's CPU time
(all its threads: the writer's hashing and copies included; on a shared machine it moves far less with the
neighbours' load than the wall time does) (with a background write, the commit
comes after the write is joined); iteration 0 (model loading) and the last (the call's target always ends
with a full state that nothing overlaps) are left out, so with 12 iterations the mean over iterations
1..10 holds one full state of full10 (i = 9): the interval's amortised cost. Variants run one after the
other in each round, rounds repeat them (--rounds); ratios are to `none` of the same round, medians over
rounds. The policy is SmolLM2-135M-Instruct imported from the GGUF file `make real-models` fetches (134.5M
fp32 parameters: 0.54 GB of weights, 1.6 GB with AdamW per full checkpoint); the judge is the tiny demo
evaluator, so scoring costs little and the write's share is not diluted by it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import ROOT, machine, median, spread, table
from rlme_pipeline.config import validate_config
from rlme_pipeline.jobs.train import train
from rlme_pipeline.models import checkpoint
from rlme_pipeline.storage.run import Run

SMOLLM2 = ROOT / ".cache" / "real-models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
# keep_last 2: a variant's run holds a few GB, not 12 full checkpoints (retention keeps the newest full state
# and every checkpoint after it, so full10 holds up to 10 light ones); runs are deleted once measured.
VARIANTS = {
    "none": {"full_every": 1, "background_write": False, "keep_last": 2},
    "full10-deferred": {"full_every": 10, "background_write": True, "keep_last": 2},
    "full10": {"full_every": 10, "background_write": False, "keep_last": 2},
    "full1-deferred": {"full_every": 1, "background_write": True, "keep_last": 2},
    "full1": {"full_every": 1, "background_write": False, "keep_last": 2},
}


def config(storage: str, policy: str, iterations: int, ckpt: dict, args) -> dict:
    """A small RL iteration around a real policy: 2 prompts x 4 samples of 16 tokens, one optimizer step."""
    from tests.conftest import demo_dict

    d = demo_dict()
    d["run"].update(id="overlap", storage=storage, iterations=iterations)
    d["policy"].update(model=policy, device=args.device, dtype=args.dtype)
    d["data"].update(prompts_per_iteration=2)
    d["evaluators"], d["questions"] = d["evaluators"][:1], d["questions"][:1]
    d["generation"].update(group_size=4, max_new_tokens=8 if args.tiny else 16, batch_size=8)
    d["optimizer"].update(epochs=1, micro_batch_size=4, grad_accumulation=2, lr=1e-5)
    d.pop("eval", None)
    d["probe"]["every"] = 0
    d["checkpoint"] = ckpt
    return d


class NoWrite:
    """The `none` variant: checkpoints reduced to their small files and an empty model.safetensors."""

    def __enter__(self):
        self.real = checkpoint.Checkpoint.write

        def small_files_only(ck, stream=None, background=False):
            ck.big = {checkpoint.WEIGHTS: {}}  # a header-only safetensors file: the policy version still exists
            return self.real(ck, stream, background)

        checkpoint.Checkpoint.write = small_files_only

    def __exit__(self, *exc):
        checkpoint.Checkpoint.write = self.real


def measure(name: str, root: Path, policy: str, iterations: int, args) -> dict:
    """One fresh run of the variant: the seconds of iterations 1..N-2, bytes written per iteration."""
    cfg = validate_config(config(str(root / name), policy, iterations, dict(VARIANTS[name]), args))
    run = Run.for_config(cfg)
    stamps: list[tuple[float, float]] = []

    def stamp(m) -> None:
        stamps.append((time.perf_counter(), time.process_time()))

    if name == "none":
        with NoWrite():
            made = train(cfg, run, on_commit=stamp)
    else:
        made = train(cfg, run, on_commit=stamp)
    seconds = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])][:-1]  # iterations 1 .. N-2
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])][:-1]  # this process's CPU seconds, all threads
    measured = made[1:-1]
    written = [sum(f.bytes for f in checkpoint.files_of(m.files, m.iteration)) for m in measured]
    waits = [m.metrics.get("checkpoint_wait_seconds") for m in measured if "checkpoint_wait_seconds" in m.metrics]
    shutil.rmtree(root / name)
    return {
        "seconds": statistics.fmean(seconds),
        "cpu": statistics.fmean(cpu),
        "gb": statistics.fmean(written) / 1e9,
        "wait": statistics.fmean(waits) if waits else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny demo policy, 4 iterations: a smoke run")
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="the policy's device, e.g. cuda")
    ap.add_argument("--dtype", default="float32", help="the policy's dtype: float32 | bfloat16 | float16")
    ap.add_argument("--dir", default=None, help="where the runs go (default: a temporary directory)")
    args = ap.parse_args()
    if args.tiny:
        policy, iterations = "tiny:policy", 4
    else:
        if not SMOLLM2.is_file():
            raise SystemExit(f"{SMOLLM2} is missing: run `make real-models`")
        from rlme_pipeline.models.importing import import_model

        policy, iterations = str(import_model(f"gguf:{SMOLLM2}")), args.iterations

    results: dict[str, list[dict]] = {k: [] for k in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="rlme-bench-overlap-", dir=args.dir) as tmp:
        for r in range(args.rounds):
            for name in VARIANTS:
                results[name].append(measure(name, Path(tmp) / f"round{r}", policy, iterations, args))
                print(f"round {r} {name}: {results[name][-1]}", flush=True)

    gpu = f"{torch.cuda.get_device_name()}, " if args.device.startswith("cuda") else ""
    print(f"machine: {gpu}{machine()}")
    print(
        f"policy: {policy} ({args.dtype} on {args.device}); {iterations} iterations per variant, the mean of iterations 1..{iterations - 2}; "
        f"{args.rounds} round(s)"
    )
    rows = []
    for name, rs in results.items():
        ratios = [x["seconds"] / none["seconds"] for x, none in zip(rs, results["none"])]
        wait = [x["wait"] for x in rs if x["wait"] is not None]
        secs, cpu = [x["seconds"] for x in rs], [x["cpu"] for x in rs]
        cpu_ratio = median([x["cpu"] / none["cpu"] for x, none in zip(rs, results["none"])])
        rows.append(
            [name, median(secs), spread(secs), median(ratios), median(cpu), cpu_ratio, rs[0]["gb"]]
            + [median(wait) if wait else None]
        )
    headers = ["variant", "s/iteration", "spread", "x none", "CPU s/iteration", "CPU x none", "GB written/iteration"]
    print(table([*headers, "s waited for the write"], rows))
    ratio = next(r[3] for r in rows if r[0] == "full10-deferred")
    print(f"full10-deferred / none: {ratio:.3f}x wall time (target <= 1.05x)")


if __name__ == "__main__":
    main()
