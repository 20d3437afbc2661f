"""Importing a pretrained model once: a GGUF file, an HF directory or a hub id -> an ordinary HF directory.

Why: transformers de-quantises a GGUF file on every load (15-40 s for a 135M model on a small CPU) and
`save_pretrained` refuses a GGUF-loaded model, while everything in rlme (the model pool, checkpoints, LoRA
bases, vLLM servers) wants an ordinary directory of safetensors, config and tokenizer. So the conversion runs
once and its result is cached by the source's content:

    $RLME_CACHE/imports/{key}/   config.json, model.safetensors, generation_config.json, tokenizer files,
                                 rlme_import.json (what was imported, from what, and the logits check)

`key` hashes the import format and the source's bytes, so a changed file is imported again and a moved one
is not. `gguf:PATH` in a config (policy.model, evaluators[].model, evolve.proposer) resolves here
(loading.resolve_ref). Each import proves itself: the saved directory is loaded back and must give the
source model's logits on a chat-formatted probe, with the same tokens and chat template.

The directory is built in a hidden staging directory beside its target and renamed into place (one atomic
rename), so a killed import never leaves a directory that looks complete, and two processes importing the
same source both end with the winner's (identical) directory. A staging directory left by a killed process
on this host is removed by the next import into the same folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlme_pipeline.models.building import BUILDING
from rlme_pipeline.models.tiny import cache_root
from rlme_pipeline.storage.crash import crash_point
from rlme_pipeline.storage.store import sha256_file

GGUF_PREFIX = "gguf:"
GGUF_MAGIC = b"GGUF"
FORMAT = 1  # bump when what an import writes changes: the cache key includes it
RECORD = "rlme_import.json"
STAGING = ".importing-"
# What a hub import downloads: weights as safetensors only (rlme never loads pickles), config, tokenizer.
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]
PROBE = [{"role": "user", "content": "What is 2+3? Answer briefly."}]


class ImportFailed(ValueError):
    """The source cannot be imported: one line naming it and the fix."""


@dataclass(frozen=True)
class Source:
    kind: str  # "gguf" (a GGUF file) or "dir" (an HF directory, a hub snapshot included)
    path: Path
    ref: str  # as the user wrote it


def imports_dir() -> Path:
    return cache_root() / "imports"


def import_model(src: str, out: str | None = None) -> Path:
    """The HF directory of `src` (gguf:PATH or a .gguf path, an HF directory, or a hub id), imported now
    unless it already is. `out`: that directory instead of the content-keyed cache; an existing `out`
    holding this source's import is reused, anything else there is refused."""
    source = parse(src)
    key = import_key(source)
    target = Path(out).expanduser().absolute() if out else imports_dir() / key
    if holds(target, key):
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ImportFailed(
            f"out {str(target)!r} exists and holds no import of {src!r} ({RECORD}); give a new directory or remove it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}{socket.gethostname()}-{os.getpid()}-", dir=target.parent))
    try:
        started = time.perf_counter()
        check = convert(source, staging)
        record = {
            "format": FORMAT,
            "key": key,
            "source": {"kind": source.kind, "ref": source.ref, "path": str(source.path), "sha256": content_sha(source)},
            "check": check,
            "seconds": round(time.perf_counter() - started, 1),
            "versions": _versions(),
        }
        (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        install(staging, target, key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --- sources ------------------------------------------------------------------------------------------
def parse(src: str) -> Source:
    """What `src` names. A GGUF file must exist and start with the GGUF magic; a path that looks local
    must exist; anything else is taken as a hub id and downloaded (safetensors only)."""
    raw = src.removeprefix(GGUF_PREFIX)
    path = Path(raw).expanduser()
    if src.startswith(GGUF_PREFIX) or path.suffix.lower() == ".gguf":
        return Source("gguf", check_gguf(raw, src), src)
    if path.is_dir():
        return Source("dir", path.resolve(), src)
    if path.exists() or raw.startswith(("/", "./", "../", "~")) or raw.count("/") > 1:
        raise ImportFailed(
            f"{src!r} is not a model directory or a GGUF file; give an HF directory, gguf:PATH, or a hub id (org/name)"
        )
    return Source("dir", download(raw), src)


def check_gguf(path: str, ref: str) -> Path:
    """The GGUF file at `path`, checked to exist and to be GGUF (cheap: preflight calls it before
    anything loads)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ImportFailed(
            f"{ref!r}: no GGUF file at {str(p)!r}; give the path of a .gguf file "
            "(for SmolLM2-135M-Instruct: `make real-models`, docs/models.md)"
        )
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ImportFailed(f"{ref!r}: {str(p)!r} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    return p.resolve()


def download(repo_id: str) -> Path:
    """A hub model's files (safetensors weights, config, tokenizer) in the hub cache; the only network
    access of an import, and only when the user names a hub id."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except (HFValidationError, OSError) as e:  # OSError: offline, not found, HTTP errors, no disk
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ImportFailed(
            f"{repo_id!r}: not a local path, and downloading it from the hub failed ({type(e).__name__}: {first}); "
            "check the id and the network (HF_HUB_OFFLINE unset), or give a local directory or gguf:PATH"
        ) from None


_sha_cache: dict[tuple, str] = {}


def content_sha(source: Source) -> str:
    """sha256 of the source's bytes (a directory: of its top-level files' names and hashes), cached per
    process by path, size and mtime: a config resolves its references many times per iteration."""
    files = [source.path] if source.kind == "gguf" else sorted(f for f in source.path.iterdir() if f.is_file())
    stat = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if stat not in _sha_cache:
        if source.kind == "gguf":
            _sha_cache[stat] = sha256_file(source.path)
        else:
            h = hashlib.sha256()
            for f in files:
                h.update(f.name.encode() + b"\0" + sha256_file(f).encode() + b"\n")
            _sha_cache[stat] = h.hexdigest()
    return _sha_cache[stat]


def import_key(source: Source) -> str:
    return hashlib.sha256(f"rlme-import/{FORMAT}/{source.kind}/{content_sha(source)}".encode()).hexdigest()[:32]


# --- the conversion -----------------------------------------------------------------------------------
def convert(source: Source, out: Path) -> dict:
    """Write the source as an ordinary HF directory into `out`; returns the logits check's record."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.kind == "gguf":
        require_gguf()
        where = {"pretrained_model_name_or_path": source.path.parent, "gguf_file": source.path.name}
        with BUILDING:
            model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(**where)
        plain_copy(model).save_pretrained(out)  # the copy is dropped here: one fewer model in memory
    else:
        if not any(source.path.glob("*.safetensors")):
            if ggufs := sorted(source.path.glob("*.gguf")):
                raise ImportFailed(f"{source.ref!r} holds GGUF files: import one as gguf:{ggufs[0]}")
            raise ImportFailed(
                f"{source.ref!r} has no *.safetensors weights; rlme never loads pickled (.bin/.pt) weights: "
                "convert them to safetensors first"
            )
        with BUILDING:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype="auto", use_safetensors=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        model.save_pretrained(out)
    crash_point("import:mid")  # the weights are written, the tokenizer and the record not yet
    if tokenizer.model_max_length > 10**12:  # "no limit" (GGUF keeps it in the model config): the model's own
        tokenizer.model_max_length = model.config.max_position_embeddings
    save_tokenizer(tokenizer, out)
    check = check_same(model, tokenizer, out, source.ref)
    readable(out)
    return check


# How a tokenizer was loaded, which transformers writes back into tokenizer_config.json: not a property of
# the tokenizer, and `local_files_only: true` is wrong once the directory is shared or pushed.
LOADER_KEYS = ("is_local", "local_files_only")


def save_tokenizer(tokenizer, out: Path) -> None:
    """tokenizer.save_pretrained, without the loader's state in tokenizer_config.json."""
    tokenizer.save_pretrained(out)
    cfg = Path(out) / "tokenizer_config.json"
    if cfg.is_file():
        doc = json.loads(cfg.read_text())
        if any(k in doc for k in LOADER_KEYS):
            cfg.write_text(json.dumps({k: v for k, v in doc.items() if k not in LOADER_KEYS}, indent=2) + "\n")


def readable(folder: Path) -> None:
    """Give every file the mode of an ordinarily created one (transformers writes weights through a 0600
    temp file, mkdtemp makes a 0700 directory): a cache may be read by another user, e.g. a vLLM server."""
    mode = (folder / "tokenizer_config.json").stat().st_mode & 0o777  # written with open(): the umask's mode
    for f in folder.rglob("*"):
        if f.is_file():
            os.chmod(f, mode)
    os.chmod(folder, mode | (mode & 0o444) >> 2)


def plain_copy(model):
    """A GGUF-loaded model as an ordinary one: `save_pretrained` refuses a model that carries a quantizer,
    so the same weights go into a model built from its config without the quantization settings."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with BUILDING:
        plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain.eval()


def check_same(model, tokenizer, out: Path, ref: str) -> dict:
    """Load `out` back as any user will and require the source's logits, token ids and chat template:
    the import is only cached once it is known to be the same model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved_tok = AutoTokenizer.from_pretrained(out)
    if saved_tok.chat_template != tokenizer.chat_template:
        raise ImportFailed(f"import of {ref!r}: the chat template did not survive saving the tokenizer")
    ids = probe_ids(tokenizer)
    if probe_ids(saved_tok) != ids:
        raise ImportFailed(f"import of {ref!r}: the saved tokenizer encodes the probe differently from the source's")
    with BUILDING:
        saved = AutoModelForCausalLM.from_pretrained(out, dtype=model.dtype).eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        diff = (saved(x).logits - model(x).logits).abs().max().item()
    if diff != 0.0:
        raise ImportFailed(
            f"import of {ref!r}: the saved model's logits differ from the source's by up to {diff:.3g}; "
            "please report it with `rlme --version` and the transformers version"
        )
    return {"probe_tokens": len(ids), "max_abs_logit_diff": diff, "chat_template": tokenizer.chat_template is not None}


def probe_ids(tokenizer) -> list[int]:
    """A short input in the model's own chat format (plain text for a base model without a template)."""
    if tokenizer.chat_template:
        enc = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, tokenize=True)
        return list(enc["input_ids"])  # transformers 5: a BatchEncoding
    return tokenizer(PROBE[0]["content"])["input_ids"]


def require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportFailed("reading GGUF files needs the gguf package: pip install 'rlme[gguf]'") from None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("rlme", "transformers", "torch", "gguf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


# --- installing atomically ----------------------------------------------------------------------------
def holds(target: Path, key: str) -> bool:
    """True when `target` is a finished import with this key. A directory only gets its record inside the
    staging directory, before the rename, so a half-written one never passes."""
    try:
        record = json.loads((target / RECORD).read_text())
    except (OSError, ValueError):
        return False
    return record.get("key") == key and (target / "config.json").is_file()


def install(staging: Path, target: Path, key: str) -> None:
    """Rename the finished staging directory into place: it replaces nothing but an empty directory, so
    when another process got there first its (identical) import stands and this one is dropped."""
    try:
        os.rename(staging, target)
    except OSError:
        if not holds(target, key):
            raise ImportFailed(
                f"out {str(target)!r} appeared during the import and holds something else; give a new directory"
            ) from None


def remove_stale_staging(folder: Path) -> None:
    """Remove staging directories of killed imports on this host (their process is gone); a live
    process's, or another host's on a shared disk, is left alone."""
    prefix = f"{STAGING}{socket.gethostname()}-"
    for d in folder.glob(f"{prefix}*"):
        pid = d.name.removeprefix(prefix).partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
