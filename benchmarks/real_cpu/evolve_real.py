"""(4) `rlme evolve RUN --proposer <SmolLM2's directory>` on a run the real model trained: the CLI as a user
runs it (Prefect's temporary server included), then the committed proposal read back.

What it counts, per draft (docs/evolve.md): parsed (the proposer's text was valid edits YAML that changes the
questions), passed the gates (measured and eligible: label AUROC, spread, paraphrase stability), won (the
proposal's choice, which must also beat the current set's probe win share). A 135M proposer may write no
valid YAML at all; that is a result too, and the rejection reasons say what it wrote instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks._common import ROOT


def run_evolve(
    run_url: str, proposer: str, name: str, candidates: int, iterations: str, max_new_tokens: int, probe_prompts: int
) -> dict:
    cmd = [sys.executable, "-m", "rlme_flows.cli", "evolve", run_url, "--proposer", proposer, "--name", name]
    cmd += ["--candidates", str(candidates), "--iterations", iterations, "--max-new-tokens", str(max_new_tokens)]
    cmd += ["--probe-prompts", str(probe_prompts)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=7200)
    if p.returncode != 0:
        raise RuntimeError(f"rlme evolve failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    manifest = json.loads(_read(run_url, name))
    return {"stdout": p.stdout, "manifest": manifest}


def _read(run_url: str, name: str) -> str:
    from rlme_pipeline.evolve import proposal
    from rlme_pipeline.storage.run import Run

    return proposal.unit(Run.from_url(run_url), name).manifest().model_dump_json()


def counts(manifest: dict) -> dict:
    cands = manifest["candidates"]
    parsed = [c for c in cands if c["status"] != "rejected"]
    passed = [c for c in parsed if not c.get("ineligible")]
    return {
        "drafts": len(cands),
        "parsed": len(parsed),
        "passed gates": len(passed),
        "won": int(manifest["chosen"] is not None),
        "why": manifest["why"],
        "rejections": [c.get("reason") for c in cands if c["status"] == "rejected"],
        "ineligible": [c.get("ineligible") for c in parsed if c.get("ineligible")],
    }
