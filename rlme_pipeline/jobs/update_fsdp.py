"""The update stage across several processes with PyTorch FSDP2 (`distributed.processes` > 1, docs/scale.md).

    launch(cfg, run, i, ref)        in the training process: torchrun --nproc-per-node P -m this module ...
    main()                          in each rank: load, shard, train its share of the step, rank 0 saves

The runner calls `launch` in place of the in-process update. Everything crosses as paths: the run URL,
the iteration, the checkpoint to start from, the config (a JSON file) and where rank 0 writes its result.
Each rank reads the iteration's rollouts and rewards from the run, loads the policy, shards its decoder
layers and its root with `fully_shard` (parameters, gradients and AdamW state are 1/P per rank), computes
every P-th micro-batch of each optimizer step with the whole step's loss weights (stages/update.py `Share`),
and FSDP sums the gradients. Rank 0 then gathers the full weights and optimizer state onto the host and
writes the ordinary checkpoint through the same `policy_update.update_policy` as one process: the checkpoint stays
an HF directory that any number of processes (or vLLM) can load, and a resume may change P.

torchrun (torch.distributed.run) rather than torch.multiprocessing: it is what users of torch.distributed
run, it sets up the rendezvous, ranks and environment, and it tears down every rank when one fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import rlme_pipeline
from rlme_pipeline.config import Config, validate_config
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.store import FileEntry


class DistributedUpdateFailed(RuntimeError):
    pass


def backend_for(cfg: Config) -> str:
    if cfg.distributed.backend != "auto":
        return cfg.distributed.backend
    return "nccl" if torch.device(cfg.policy.device).type == "cuda" else "gloo"


def launch(cfg: Config, run: Run, iteration: int, start: str) -> tuple[list[FileEntry], dict]:
    """Run iteration `iteration`'s update in cfg.distributed.processes ranks, starting from the checkpoint
    (or initial model) at `start`; returns the checkpoint's files and the update's metrics. The ranks'
    output goes to this process's stdout/stderr."""
    p = cfg.distributed.processes
    with tempfile.TemporaryDirectory(prefix="rlme-fsdp-") as tmp:
        job, result = Path(tmp) / "config.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"config": cfg.model_dump(mode="json"), "base_dir": str(cfg.base_dir)}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={p}"]
        # Flag names that are no prefix of one of torchrun's own (its parser would take "--start" for itself).
        cmd += ["-m", __name__, "--run-url", run.url, "--iteration", str(iteration), "--from-checkpoint", start]
        cmd += ["--job", str(job), "--result-file", str(result)]
        rc = _wait(subprocess.Popen(cmd, env=_rank_env(), start_new_session=True))
        if rc != 0 or not result.exists():
            raise DistributedUpdateFailed(
                f"update of iteration {iteration} across {p} processes failed (torchrun exit {rc}); the ranks' "
                "errors are above. Nothing was recorded: `rlme train` again resumes at this update"
            )
        out = json.loads(result.read_text())
    return [FileEntry.model_validate(f) for f in out["files"]], out["metrics"]


def _wait(proc: subprocess.Popen) -> int:
    """torchrun's exit code. If this process is interrupted first (Ctrl-C, a stage timeout), torchrun and
    its ranks (a session of their own) are stopped with it, not left training on the GPUs."""
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # torchrun passes it on to every rank
            proc.wait()


def _rank_env() -> dict[str, str]:
    """The ranks import this very copy of the package (a checkout on PYTHONPATH, or the installed one), and
    each takes one CPU thread unless told otherwise (torchrun's own default, without its warning)."""
    env = dict(os.environ)
    here = str(Path(rlme_pipeline.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# --- in each rank -------------------------------------------------------------------------------------
def shard(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """fully_shard each decoder layer, then the root (embeddings, final norm, LM head, and a tied pair in
    one unit). Gradients are summed, not averaged, across ranks: each rank's loss already carries the
    whole step's weights. The log-prob computation calls the decoder and the head directly, so it is
    registered as a forward of the root (logprobs.SHARDED_FORWARD)."""
    from types import MethodType

    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from rlme_pipeline.algorithm.logprobs import SHARDED_FORWARD, packed_logprobs

    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for m in model.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied sum
    setattr(model, SHARDED_FORWARD, MethodType(packed_logprobs, model))
    register_fsdp_forward_method(model, SHARDED_FORWARD)
    return model


def sharded_optimizer(model: torch.nn.Module, cfg: Config, state: dict | None) -> torch.optim.AdamW:
    """AdamW over the sharded parameters, in the one-process order, continuing from a one-process
    optimizer state_dict (as checkpoint.load_optimizer_state reads it): each tensor of the state is cut
    like its parameter, so every rank keeps its 1/P."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    if state is not None:
        per_param = {}
        for i, s in state["state"].items():
            p = params[int(i)]
            per_param[i] = {
                k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements) if v.dim() else v
                for k, v in s.items()
            }
        opt.load_state_dict({**state, "state": per_param})
    return opt


def gathered_state(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int) -> tuple[dict, dict] | None:
    """(full model state dict, one-process optimizer state_dict) on rank 0's host, None on the others.
    Every rank must call this: each full tensor is an all-gather."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sd = opt.state_dict()  # the one-process layout (parameter indices), with DTensor shards as values
    state = {}
    for i, s in sd["state"].items():
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in s.items()}
        if rank == 0:
            state[i] = {k: v.cpu() for k, v in full.items()}
    return (weights, {**sd, "state": state}) if rank == 0 else None


def main(argv: list[str] | None = None) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    from rlme_pipeline.jobs.policy_update import update_policy
    from rlme_pipeline.models.loading import DTYPES, Loaded, load_tokenizer, master_dtype
    from rlme_pipeline.models.weights_at import initial_policy
    from rlme_pipeline.stages.update import Share

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for flag in ("--run-url", "--from-checkpoint", "--job", "--result-file"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--iteration", type=int, required=True)
    args = ap.parse_args(argv)

    job = json.loads(Path(args.job).read_text())
    cfg = validate_config(job["config"], args.job, base_dir=job["base_dir"])
    run = Run.from_url(args.run_url, cfg.run.storage_options)
    i, start = args.iteration, args.from_checkpoint

    dist.init_process_group(backend_for(cfg))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(cfg.policy.device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        mesh = init_device_mesh(device.type, (world,))
        master = DTYPES[master_dtype(cfg.policy.dtype)]

        def load(path: str) -> torch.nn.Module:
            # Loaded on the host; fully_shard moves each unit's shard (never the whole model) to the device.
            return shard(AutoModelForCausalLM.from_pretrained(path, dtype=master), mesh)

        model = load(start)
        reference = None
        if cfg.algorithm.beta > 0:  # the KL anchor: the initial policy, sharded the same way, never trained
            reference = load(initial_policy(cfg).path).eval().requires_grad_(False)
        lm = Loaded(model, load_tokenizer(start), "", start)
        done = update_policy(
            cfg,
            run,
            i,
            start,
            lm,
            reference,
            share=Share(rank, world),
            sharded_optimizer=lambda state: sharded_optimizer(model, cfg, state),
            gather=lambda m, opt: gathered_state(m, opt, rank),
            write=rank == 0,
        )
        if rank == 0:
            out = {"files": [f.model_dump(mode="json") for f in done.files], "metrics": done.metrics}
            Path(args.result_file).write_text(json.dumps(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
