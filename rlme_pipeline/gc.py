"""`rlme gc`: find and remove what no record or manifest references (killed attempts, replaced files).

Only the iteration directories and temp files are considered; run.json, the lease and anything this
module does not know (scoresets/, which keep their own manifests) are never touched. Files listed by a
stage record of an uncommitted iteration are kept: they are finished work a resume will reuse. On S3,
multipart uploads that a killed process left open under the run are aborted too (they are invisible
but billed). Deleting takes the run's lease, so gc never races a trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlme_pipeline.lease import Lease
from rlme_pipeline.run import MANIFEST, STAGES, Run, iter_dir


@dataclass
class Plan:
    files: list[str] = field(default_factory=list)  # relative to the run
    bytes: int = 0
    uploads: list[dict] = field(default_factory=list)  # open multipart uploads: Key, UploadId


def referenced(run: Run, i: int) -> set[str]:
    keep = {f"{iter_dir(i)}/{MANIFEST}"} | {f"{iter_dir(i)}/stages/{s}.json" for s in STAGES}
    if i in run.committed():
        keep |= {f.path for f in run.manifest(i).files}  # CorruptRun propagates: never gc a damaged commit
    for s in STAGES:
        try:
            keep |= {f.path for f in run.read_record(i, s).files}
        except (FileNotFoundError, ValueError):
            pass
    return keep


def plan(run: Run) -> Plan:
    p = Plan()
    for i in run.iterations():
        keep = referenced(run, i)
        for rel in run.store.find(iter_dir(i)):
            if rel not in keep:
                p.files.append(rel)
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
