"""The optimizer state in a checkpoint: JSON for its structure, safetensors shards for its tensors, no pickle.

Resuming must continue bit for bit, so loading has to give `load_state_dict` exactly what `state_dict`
gave: the same tensors (dtype, shape, bits), the same Python types (tuples stay tuples, ids stay ints).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlme_pipeline.models import checkpoint
from rlme_pipeline.models.loading import load_tokenizer
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.store import Store, sha256_file


def _same(a, b, where="state_dict"):
    """Equal values of equal types, tensors bit for bit."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, where
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}/{i}")
    else:
        assert a == b or (a != a and b != b), where


def _batch() -> torch.Tensor:
    return torch.randint(5, 500, (2, 12), generator=torch.Generator().manual_seed(1))


def _step(model, opt, autocast: bool) -> None:
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=_batch(), labels=_batch()).loss
    loss.backward()
    opt.step()


def _trained(path, autocast: bool):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    for _ in range(2):
        _step(model, opt, autocast)
    return model, opt


@pytest.mark.parametrize("autocast", [True, False], ids=["bf16-over-fp32-master", "fp32"])
def test_saved_optimizer_state_loads_back_bit_identical_and_training_continues_identically(
    tiny_models, tmp_path, monkeypatch, autocast
):
    monkeypatch.setattr(checkpoint, "MIN_SHARD_BYTES", 1)  # the tiny state in several shards, as a big one is
    model, opt = _trained(tiny_models["policy"], autocast)
    run = Run(Store(str(tmp_path / "runs")), "ckpt")
    files = checkpoint.save(run, 0, model, load_tokenizer(tiny_models["policy"]), opt, {"iteration": 0})
    path = checkpoint.local_dir(run, 0, files)

    # every file on disk is listed, with the sha256 of its bytes; no pickle is written
    on_disk = {str(p.relative_to(path)) for p in Path(path).rglob("*") if p.is_file()}
    assert on_disk == {f.path.split("/", 2)[2] for f in files}
    for f in files:
        assert sha256_file(run.store.abs(f.path)) == f.sha256
        assert f.logical == f"iter-000000/checkpoint/{f.path.split('/', 2)[2]}"
    shards = sorted(n for n in on_disk if n.startswith("optimizer/tensors-"))
    assert checkpoint.LEGACY_OPTIMIZER not in on_disk and len(shards) > 1, on_disk
    doc = json.loads((Path(path) / checkpoint.OPTIMIZER_STATE).read_text())
    assert doc["shards"] == [s.rpartition("/")[2] for s in shards]
    names = [set(load_file(Path(path) / s)) for s in shards]
    assert sum(map(len, names)) == len(set().union(*names))  # each tensor in exactly one shard

    state = checkpoint.load_optimizer_state(path)
    _same(state, opt.state_dict())
    resumed = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=5.0)  # the saved hyper-parameters replace these
    opt2.load_state_dict(state)
    _same(opt2.state_dict(), opt.state_dict())
    _step(model, opt, autocast)
    _step(resumed, opt2, autocast)
    for (n, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def test_checkpoints_with_optimizer_pt_still_load(tiny_models, tmp_path):
    """Runs saved before optimizer/state.json resume from their optimizer.pt (weights_only=True)."""
    _, opt = _trained(tiny_models["policy"], autocast=False)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    _same(checkpoint.load_optimizer_state(str(tmp_path)), opt.state_dict())
    assert checkpoint.load_optimizer_state(str(tmp_path / "nothing")) is None


def test_half_precision_state_and_odd_structures_round_trip(tmp_path):
    """A pure bf16 AdamW (state in bf16) and the types a state_dict may hold: tuples, int keys, None,
    inf and NaN floats, 0-d and empty tensors."""
    p = torch.nn.Parameter(torch.randn(5, 3).bfloat16())
    opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.8, 0.9))
    p.grad = torch.randn(5, 3).bfloat16()
    opt.step()
    sd = opt.state_dict()
    sd["extra"] = {
        "inf": float("inf"),
        "nan": float("nan"),
        "none": None,
        "empty": torch.zeros(0, 4),
        7: (1, "a", torch.tensor(3, dtype=torch.int64)),
    }
    structure, shards = checkpoint.optimizer_files(sd, target_bytes=1)
    assert sd["state"][0]["exp_avg"].dtype == torch.bfloat16
    folder = tmp_path / "optimizer"
    folder.mkdir()
    (folder / "state.json").write_bytes(structure)
    for name, tensors in shards.items():
        with open(tmp_path / name, "wb") as f:
            checkpoint.write_safetensors(f, tensors)
    _same(checkpoint.load_optimizer_state(str(tmp_path)), sd)

    with pytest.raises(TypeError, match=r"/extra/bad is a set"):
        checkpoint.optimizer_files({"extra": {"bad": {1}}}, target_bytes=1)
    os.unlink(tmp_path / next(iter(shards)))
    with pytest.raises(Exception, match="No such file"):
        checkpoint.load_optimizer_state(str(tmp_path))


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(7, 3, generator=g),
        torch.zeros(0),
        torch.randn(40, generator=g).bfloat16(),
        torch.arange(5),
        torch.tensor(2.5),
        torch.randn(3, 5, generator=g).t(),
    ]  # the last one not contiguous


def _expected(tensors) -> bytes:
    return b"".join(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_staged_copies_give_every_byte_in_order_whatever_the_chunk(chunk):
    """The double buffer (here over CPU tensors: the same bookkeeping a GPU's copies go through) splits
    tensors across buffers and buffers across tensors without losing, repeating or reordering a byte, and
    never hands out a buffer that the next copies are filling."""
    tensors = _tensors()
    staging = checkpoint._Staging(chunk)
    out = []
    for t in tensors:
        out += [bytes(b) for b in staging.add(t.contiguous().reshape(-1).view(torch.uint8))]  # copied when handed out
    out += [bytes(b) for b in staging.flush()]
    assert b"".join(out) == _expected(tensors)
    assert all(0 < len(b) <= chunk for b in out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_tensors_stream_through_pinned_buffers():
    tensors = _tensors()
    on_gpu = [t.cuda() for t in tensors]
    mixed = [on_gpu[0], tensors[1], on_gpu[2], on_gpu[3], tensors[4], on_gpu[5]]
    for chunk in (16, 2**20):
        for ts in (on_gpu, mixed):
            assert b"".join(bytes(b) for b in checkpoint.host_bytes(ts, chunk)) == _expected(tensors)
