"""`rlme evolve` on the tiny demo: a noise proposer is rejected cleanly and touches nothing but its own
proposal; the rules proposer lowers the probe win share, is chosen by the declared criteria, and every
number in the proposal can be recomputed from the score sets it wrote."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import polars as pl
import pytest
from rlme_flows.cli import app
from typer.testing import CliRunner

from rlme_pipeline import scoreset
from rlme_pipeline.config import ProposerConfig
from rlme_pipeline.evolve import proposal, rank
from rlme_pipeline.jobs.evolve import evolve
from rlme_pipeline.storage.run import Run
from rlme_pipeline.storage.verify import verify
from tests.conftest import PINNED, copy_run, trained_demo


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models) -> Run:
    """Two committed iterations of the demo (labels in the data, two evaluators), trained once, with the
    demo's training settings pinned here (4 samples a prompt, one small step an iteration, the probe every
    iteration), so that tuning the demo does not move the numbers this test checks."""
    return trained_demo(tmp_path_factory.mktemp("trained"), iterations=2, **PINNED)


@pytest.fixture
def run(trained, tmp_path) -> Run:
    return copy_run(trained, tmp_path)


def tree(root: Path, skip: tuple[str, ...] = ("proposals",)) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] not in skip
    }


def read_json(run: Run, name: str, logical: str):
    return json.loads(run.store.read_bytes(proposal.unit(run, name).path(logical)))


def test_noise_proposer_is_rejected_cleanly_and_the_run_is_untouched(run):
    before = tree(Path(run.store.root))
    spec = ProposerConfig(model="tiny:policy", backend="hf", max_new_tokens=64)
    m = evolve(run, "noise", spec, candidates=3)

    assert tree(Path(run.store.root)) == before  # not one byte outside proposals/noise, no score set
    assert not (Path(run.store.root) / "scoresets").exists()
    assert proposal.unit(run, "noise").committed() and m.chosen is None
    assert [c["status"] for c in m.candidates] == ["rejected"] * 3
    drafts = read_json(run, "noise", "candidates.json")
    for c in drafts:
        assert c["raw"], "the proposer was asked and answered (the prompt fits its context)"
        assert c["reason"] and "\n" not in c["reason"]
    prompt = run.store.read_bytes(proposal.unit(run, "noise").path("prompt.txt")).decode()
    assert "Is the answer correct?" in prompt and "edits:" in prompt
    assert m.current["measures"]["probe_win_share"] is not None
    with pytest.raises(proposal.ProposalExists, match="choose another --name"):
        evolve(run, "noise", spec, candidates=3)


def test_rules_proposer_lowers_the_probe_share_and_is_chosen(run):
    before = tree(Path(run.store.root), skip=("proposals", "scoresets"))
    m = evolve(run, "r", ProposerConfig(model="rules"), candidates=5)
    assert tree(Path(run.store.root), skip=("proposals", "scoresets")) == before

    cur = m.current["measures"]
    accepted = [c for c in m.candidates if c["status"] == "accepted"]
    assert len(accepted) == 5 and all(c["source"].startswith("rules:") for c in accepted)
    # the declared rule, by hand: eligible = spread gate, paraphrase stability and AUROC tolerance; lowest probe
    # win share wins (ties below)
    eligible = [
        c
        for c in accepted
        if c["measures"]["spread"] >= 0.5 * cur["spread"]
        and c["measures"]["stability"] is not None
        and c["measures"]["stability"] >= 0.5
        and (cur["auroc_reward"] is None or c["measures"]["auroc_reward"] >= cur["auroc_reward"] - 0.05)
    ]
    assert [c["index"] for c in eligible] == [c["index"] for c in accepted if c["ineligible"] is None]
    down = lambda x: math.inf if x is None else -x  # noqa: E731  (higher is better)
    best = min(  # ties: higher AUROC of the reward, then higher spread, then the earlier candidate
        eligible,
        key=lambda c: (
            c["measures"]["probe_win_share"],
            down(c["measures"]["auroc_reward"]),
            down(c["measures"]["spread"]),
            c["index"],
        ),
    )
    assert m.chosen == best["index"]
    chosen = best["measures"]
    assert chosen["probe_win_share"] < cur["probe_win_share"]  # the probe share went down

    # the chosen set is a file `rlme rescore --questions` reads, equal to what was scored
    u = proposal.unit(run, "r")
    chosen_file = Path(run.store.root) / u.path("chosen.yaml")
    questions = scoreset.load_questions(chosen_file)
    defn = scoreset.load_definition(run, best["scoreset"])
    assert len(questions) == len(run.config().questions) + 1
    # scored with each question's paraphrase at weight 0; chosen.yaml holds the questions alone
    para = {p["question_id"]: p for p in best["paraphrases"]}
    assert [p["source"] for p in para.values()] == ["template", "template", "edit"]  # the demo's own, the library's
    assert defn.questions == questions + [
        q.model_copy(update={"id": para[q.id]["id"], "text": para[q.id]["text"], "weight": 0.0}) for q in questions
    ]
    # stability, by hand from the committed score set: per evaluator x question, pearson(question, paraphrase)
    sc = pl.concat([scoreset.read_table(run, best["scoreset"], i, "scores.parquet") for i in (0, 1)])
    wide = sc.filter(pl.col("status") == "ok").pivot(
        on="question_id", index=["rollout_id", "evaluator"], values="p_yes"
    )
    r = [g.select(pl.corr(q.id, para[q.id]["id"])).item() for _, g in wide.group_by("evaluator") for q in questions]
    r = [x for x in r if x is not None and math.isfinite(x)]
    assert chosen["stability"] == pytest.approx(sum(r) / len(r), rel=1e-9)
    assert cur["stability"] is None  # training's scores hold no paraphrases

    # its measures come from its committed score set: the training aggregation gives the same rewards
    rewards = pl.concat([scoreset.read_table(run, best["scoreset"], i, "rewards.parquet") for i in (0, 1)])
    assert chosen["rollouts"] == rewards.height == 64
    assert chosen["reward_mean"] == pytest.approx(float(rewards["reward"].mean()), rel=1e-9)
    groups = rewards.group_by("iteration", "prompt_id").agg(s=pl.col("reward").std(ddof=0))
    cfg = run.config()
    total = sum(abs(e.weight * q.weight) for e in cfg.evaluators for q in questions)
    assert chosen["spread"] == pytest.approx(float(groups["s"].mean()) / total, rel=1e-9)

    # the record: every file listed and intact, the criteria written beside the numbers
    assert not run.check_files(u.manifest().files)
    scores = read_json(run, "r", "scores.json")
    assert scores["criteria"] == rank.Criteria().model_dump() and scores["chosen"] == m.chosen
    assert {c["scoreset"] for c in accepted} <= set(scoreset.committed_scoresets(run))
    rep = verify(run)  # `rlme verify` re-hashes the proposal with the iterations and score sets
    assert rep.ok and rep.checked_files > sum(len(run.manifest(i).files) for i in (0, 1)) + len(u.manifest().files)


def test_rerun_of_an_interrupted_proposal_reuses_its_drafts(run):
    spec = ProposerConfig(model="rules")
    first = proposal.prepare(run, "again", spec, 2)
    files = proposal.unit(run, "again").read_record("prepare").files
    assert proposal.prepare(run, "again", spec, 2) == first
    assert proposal.unit(run, "again").read_record("prepare").files == files
    m = evolve(run, "again", spec, candidates=2)
    assert [c["index"] for c in m.candidates] == [0, 1]


def test_cli_evolve_user_errors_are_one_line(run):
    r = CliRunner().invoke(app, ["evolve", run.url, "--proposer", "rules", "--name", "a/b"])
    assert r.exit_code == 2 and r.output.startswith("error: --name 'a/b'"), r.output
    r = CliRunner().invoke(app, ["evolve", run.url, "--proposer", "rules", "--iterations", "7:9"])
    assert r.exit_code == 2 and "--iterations '7:9'" in r.output, r.output
    r = CliRunner().invoke(app, ["evolve", run.url, "--proposer", "x", "--backend", "tgi"])
    assert r.exit_code == 2 and "--backend: Input should be 'hf', 'vllm' or 'openai'" in r.output, r.output
