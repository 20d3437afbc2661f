"""Saving a checkpoint (fp32 weights + AdamW state, hashed while written): the old writer against the new.

    PYTHONPATH=. python -m benchmarks.checkpoint                  # ~162M parameters on the CPU, local disk
    PYTHONPATH=. python -m benchmarks.checkpoint --device cuda    # the same model on the GPU (the H200 case)
    PYTHONPATH=. python -m benchmarks.checkpoint --hidden 1024 --intermediate 2816   # ~219M parameters
    PYTHONPATH=. python -m benchmarks.checkpoint --tiny           # smoke sizes (the test suite runs it)

  new  rlme_pipeline.models.checkpoint.save: weights and the optimizer's tensors in safetensors files of about
       equal size, one thread each; device tensors copied through two pinned 64 MiB buffers
  old  the writer before it, kept here as the baseline only: model.safetensors with one blocking .cpu()
       per tensor, and torch.save(optimizer.state_dict()) (pickle + zip), the two in two threads
  weights  model.safetensors alone, as `new` writes it: what would stay on the critical path if the
       optimizer shards were written while the next iteration generates (new - weights: what that could hide)
Both hash every byte (sha256) and fsync through Store.write_stream into a local run directory (--dir,
default a temporary one); each run's checkpoint is deleted before the next. The model is a random-weight
Llama built offline from its config; AdamW's state comes from one step on random gradients. Variants
alternate (old new old new ...) after one warm-up each; seconds are medians. Before timing, the new
format is loaded back and checked equal to the optimizer's state, tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save

from benchmarks._common import machine, median, spread, table
from rlme_pipeline.models import checkpoint
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.store import Store

SHAPE = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
}
TINY = {
    "vocab_size": 2048,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
}


def build(shape: dict, device: str):
    """A random fp32 Llama with a one-step AdamW state (the fp32 master weights of a bf16 policy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False)).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def old_save(run: Run, model, optimizer, tokenizer) -> list:
    """The checkpoint writer before the optimizer went to safetensors shards (a measurement baseline only):
    the same small files, then the weights and optimizer.pt in two threads."""
    _, physical = run.new_path(0, "checkpoint")
    small = {
        **checkpoint._metadata_files(model, tokenizer),
        checkpoint.RNG: save(checkpoint.rng_state()),
        checkpoint.STATE: json.dumps({"iteration": 0}).encode(),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [
            pool.submit(
                run.store.write_stream,
                f"{physical}/model.safetensors",
                lambda f: _old_write_safetensors(f, checkpoint.weights_of(model)),
            ),
            pool.submit(
                run.store.write_stream, f"{physical}/optimizer.pt", lambda f: torch.save(optimizer.state_dict(), f)
            ),
        ]
        files = [
            run.store.write_stream(f"{physical}/{name}", lambda f, d=data: f.write(d)) for name, data in small.items()
        ]
        return files + [j.result() for j in jobs]


def _old_write_safetensors(f, tensors: dict) -> None:
    """The old streamed safetensors writer: one blocking, pageable .cpu() per tensor."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": checkpoint._SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    f.write(struct.pack("<Q", len(head)))
    f.write(head)
    for t in tensors.values():
        if t.numel():
            f.write(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)


def new_save(run: Run, model, optimizer, tokenizer) -> list:
    return checkpoint.save(run, 0, model, tokenizer, optimizer, {"iteration": 0})


def weights_only(run: Run, model) -> list:
    """model.safetensors alone, as `new` writes it: the part of a checkpoint that must be durable (its hash
    is the next policy's version) before the next iteration could start, were the optimizer shards
    written in the background (checkpoint.background_write, docs/storage.md "Deferred commit"). new - weights is what
    such an overlap could take off the critical path."""
    _, physical = run.new_path(0, "checkpoint")
    tensors = checkpoint.weights_of(model)
    return [
        run.store.write_stream(f"{physical}/{checkpoint.WEIGHTS}", lambda f: checkpoint.write_safetensors(f, tensors))
    ]


def check_new_format(run: Run, model, optimizer, tokenizer) -> None:
    files = new_save(run, model, optimizer, tokenizer)
    back = checkpoint.load_optimizer_state(checkpoint.local_dir(run, 0, files))
    want = optimizer.state_dict()
    assert back["param_groups"] == want["param_groups"], "param_groups differ"
    for pid, s in want["state"].items():
        for k, t in s.items():
            assert torch.equal(back["state"][pid][k], t.cpu()), (pid, k)
    shutil.rmtree(run.store.abs(files[0].path.split("/")[0]))


def timed(fn, run: Run, device: str) -> tuple[float, int]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    files = fn()
    seconds = time.perf_counter() - t0
    shutil.rmtree(run.store.abs("iter-000000"))
    return seconds, sum(f.bytes for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiny", action="store_true", help="smoke sizes: a 2-layer, 2,048-token model")
    for k, v in SHAPE.items():
        flag = "--" + k.replace("_size", "").replace("num_", "").replace("_", "-")
        ap.add_argument(flag, dest=k, type=int, default=v)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the run directory goes (default: a temporary directory)")
    args = ap.parse_args()
    shape = TINY if args.tiny else {k: getattr(args, k) for k in SHAPE}
    repeats = 1 if args.tiny else args.repeats

    from rlme_pipeline.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    model, opt = build(shape, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    root = Path(tempfile.mkdtemp(prefix="rlme-bench-ckpt-", dir=args.dir))
    try:
        run = Run(Store(str(root)), "bench")
        check_new_format(run, model, opt, tokenizer)
        variants = {
            "old": lambda: old_save(run, model, opt, tokenizer),
            "new": lambda: new_save(run, model, opt, tokenizer),
            "weights": lambda: weights_only(run, model),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        written: dict[str, int] = {}
        for fn in variants.values():  # warm-up: pinned buffers, page cache, thread pools
            timed(fn, run, args.device)
        for _ in range(repeats):
            for name, fn in variants.items():
                seconds, written[name] = timed(fn, run, args.device)
                times[name].append(seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    gpu = f"{torch.cuda.get_device_name()}, " if args.device.startswith("cuda") else ""
    print(f"machine: {gpu}{machine()}")
    print(
        f"model: {n_params / 1e6:.0f}M fp32 parameters on {args.device}, AdamW state after one step; "
        f"{repeats} alternating runs after one warm-up each"
    )
    old = median(times["old"])
    rows = [
        [k, len(v), median(v), spread(v), written[k] / 1e9, written[k] / 1e9 / median(v), old / median(v)]
        for k, v in times.items()
    ]
    print(table(["writer", "runs", "seconds", "spread", "GB written", "GB/s", "speed-up vs old"], rows))


if __name__ == "__main__":
    main()
