"""`rlme gc`: find and remove what no record or manifest references (killed attempts, replaced files).

Considered: the iteration directories (a checkpoint that retention pruned counts as unreferenced), the
score sets under scoresets/, and temp files anywhere; run.json
and the lease are never touched. Files listed by a stage record of an uncommitted iteration are kept:
they are finished work a resume will reuse. A score set is collected as far as its commits prove: in a
committed score set everything its manifest does not list (the merged shards, killed merges); in one
still in progress only what a committed shard does not list, since a re-score (which takes no lease) may
be writing the rest. On S3, multipart uploads that a killed process left open under the run are aborted
too (they are invisible but billed). Deleting takes the run's lease, so gc never races a trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlme_pipeline import scoreset
from rlme_pipeline.storage import retention
from rlme_pipeline.storage.lease import Lease
from rlme_pipeline.storage.run import Run, iter_dir


@dataclass
class Plan:
    files: list[str] = field(default_factory=list)  # relative to the run
    bytes: int = 0
    uploads: list[dict] = field(default_factory=list)  # open multipart uploads: Key, UploadId


def referenced(run: Run, i: int) -> set[str]:
    """What iteration i's manifest and records name, less the checkpoint files its PRUNED.json says
    retention deleted (left behind only when a crash cut the deletion short: gc finishes it)."""
    keep = run.unit(i).referenced()
    if (rec := retention.record(run, i)) is not None:
        keep = (keep - {f.path for f in rec.files}) | {retention.rel(i)}
    return keep


def scoreset_leftovers(run: Run, name: str) -> list[str]:
    """Files under scoresets/{name} that no commit of it references."""
    ss = scoreset.unit(run, name)
    if ss.committed():
        keep = ss.referenced() | {ss.rel(scoreset.DEFINITION)}
        return [rel for rel in run.store.find(ss.dir) if rel not in keep]
    out = []
    for shard in scoreset.shard_units(run, name):
        if shard.committed():
            keep = shard.referenced()
            out += [rel for rel in run.store.find(shard.dir) if rel not in keep]
    return out


def plan(run: Run) -> Plan:
    p = Plan()
    for i in run.iterations():
        keep = referenced(run, i)
        p.files += [rel for rel in run.store.find(iter_dir(i)) if rel not in keep]
    for name in scoreset.names(run):
        p.files += scoreset_leftovers(run, name)
    p.files += [rel for rel in run.store.find() if ".tmp-" in rel.rsplit("/", 1)[-1] and rel not in p.files]
    for rel in p.files:
        try:
            p.bytes += run.store.size(rel)
        except FileNotFoundError:
            pass
    p.uploads = open_uploads(run)
    return p


def open_uploads(run: Run) -> list[dict]:
    fs = run.store.fs
    if not hasattr(fs, "list_multipart_uploads"):
        return []
    bucket, _, prefix = run.store.root.partition("/")
    return [u for u in fs.list_multipart_uploads(bucket) if u["Key"].startswith(prefix + "/")]


def apply(run: Run) -> Plan:
    """Delete under the lease, planning again inside it: a trainer that finished since a dry run may
    have referenced files that were leftovers then."""
    with Lease(run.store, purpose="gc"):
        p = plan(run)
        for rel in p.files:
            run.store.rm(rel)
        bucket = run.store.root.partition("/")[0]
        for u in p.uploads:
            run.store.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
    return p
