"""Adopting a question set in a running run as a recorded phase (phases.py): a proposal of the rules
proposer is adopted on the tiny demo, the run trains on in the new phase, resumes stay in it, any other
change is refused, the audit shows the phase, and a re-score with the run's own questions reproduces
training's scores and rewards on both sides of the boundary."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal
from rlme_flows.cli import app
from typer.testing import CliRunner

from rlme_pipeline import scoreset
from rlme_pipeline.audit.report import compute
from rlme_pipeline.config import ProposerConfig, validate_config
from rlme_pipeline.evolve import adopt, proposal
from rlme_pipeline.jobs.audit import audit
from rlme_pipeline.jobs.evolve import evolve
from rlme_pipeline.jobs.rescore import rescore
from rlme_pipeline.jobs.train import train
from rlme_pipeline.storage import phases
from rlme_pipeline.storage.run import Run, RunMismatch
from rlme_pipeline.storage.store import Store
from rlme_pipeline.storage.verify import verify
from tests.conftest import DEMO, PINNED, copy_run, demo_variant, trained_demo


@pytest.fixture(scope="module")
def proposed(tmp_path_factory, tiny_models) -> Run:
    """Two committed iterations of the demo and a committed rules proposal `r` that chose a set."""
    run = trained_demo(tmp_path_factory.mktemp("phases"), iterations=2, **PINNED)
    m = evolve(run, "r", ProposerConfig(model="rules"), candidates=3)
    assert m.chosen is not None, m.why
    return run


@pytest.fixture
def run(proposed, tmp_path) -> Run:
    return copy_run(proposed, tmp_path)


def demo(run: Run, iterations: int, **changes):
    cfg = validate_config(demo_variant(run.root.url, iterations=iterations, **PINNED))
    return cfg.model_copy(update=changes) if changes else cfg


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def test_adopted_proposal_is_a_recorded_phase_that_resumes_and_rescores(run, tmp_path):
    ref = f"{run.url}/proposals/r"
    adopted = adopt.load(ref)
    chosen = scoreset.load_questions(Path(run.store.root) / proposal.unit(run, "r").path("chosen.yaml"))
    assert adopted.questions == chosen and adopted.source["kind"] == "proposal"
    sha = phases.questions_sha(chosen)

    made = train(demo(run, 4), run, adopt=adopted)
    assert [m.iteration for m in made] == [2, 3]
    ps = phases.read(run)
    assert [(p.phase, p.from_iteration) for p in ps.all] == [(0, 0), (1, 2)]
    p1 = ps.latest
    assert p1.questions == chosen and p1.questions_sha == sha
    assert p1.source["manifest_sha256"] == run.store.sha256("proposals/r/MANIFEST.json")
    base = phases.questions_sha(run.config().questions)
    for i, (phase, qsha) in enumerate([(0, base), (0, base), (1, sha), (1, sha)]):
        lineage = run.manifest(i).lineage
        assert (lineage["phase"], lineage["questions_sha"]) == (phase, qsha)
        assert run.manifest(i).config_hash == run.manifest(0).config_hash  # the run's own experiment
        asked = set(run.read_table(i, "scores.parquet")["question_id"])
        assert asked == {q.id for q in (chosen if phase else run.config().questions)}
    new = ({q.id for q in chosen} - {q.id for q in run.config().questions}).pop()

    # given again (a retried flow), the adoption changes nothing
    assert phases.adopt(run, adopted) is None and len(phases.read(run).all) == 2

    # a resume without --adopt continues in the phase; so does a YAML edited to the adopted questions
    train(demo(run, 5), run)
    assert run.manifest(4).lineage["phase"] == 1
    assert train(demo(run, 5, questions=chosen), run) == []

    # any other change is still refused, naming the field; other questions get the --adopt fix
    with pytest.raises(RunMismatch, match=r"optimizer\.lr 0\.0001 -> 0\.0003"):
        train(demo(run, 6, optimizer=demo(run, 6).optimizer.model_copy(update={"lr": 3e-4})), run)
    with pytest.raises(RunMismatch, match="--adopt"):
        train(demo(run, 6, questions=chosen[:1]), run)
    assert run.committed() == [0, 1, 2, 3, 4]

    # a re-score with the run's own questions reproduces training across the boundary, bit for bit
    cfg = run.config()
    m = rescore(run, "same", evaluators=list(cfg.evaluators))
    assert set(m["phase_questions"]) == {str(i) for i in range(5)}
    key = ["rollout_id", "evaluator", "question_id"]
    for i in run.committed():
        assert_frame_equal(
            scoreset.read_table(run, "same", i, "scores.parquet").drop("scoreset").sort(key),
            run.read_table(i, "scores.parquet").drop("scoreset").sort(key),
            check_exact=True,
        )
        assert_frame_equal(
            scoreset.read_table(run, "same", i, "rewards.parquet").sort("rollout_id"),
            run.read_table(i, "rewards.parquet").sort("rollout_id"),
            check_exact=True,
        )

    # the audit shows the phases: a column of the totals, each phase's questions, a marker on the curve
    t = compute(run, probe_prompts=0)
    assert t["totals"].sort("iteration")["phase"].to_list() == [0, 0, 1, 1, 1]
    q = t["questions"].filter(question_id=new).row(0, named=True)
    assert (q["phase"], q["from_iteration"]) == (1, 2)
    added = t["summary"].filter(question_id=new)
    assert sorted(added["iteration"]) == [2, 2, 3, 3, 4, 4] and added["weight"].is_not_null().all()
    assert compute(run, "same", probe_prompts=0)["totals"]["phase"].to_list() == [0, 0, 1, 1, 1]
    out = Store(str(tmp_path / "audit"))
    audit(run, out, probe_prompts=0)
    html = (Path(out.root) / "report.html").read_text()
    assert "phase 1 from iteration 2" in html and html.count(">phase 1<") >= 1  # the glance and the plot label
    assert verify(run).ok


def test_adopt_errors_are_one_line_before_anything_starts(run, tmp_path):
    root = Path(run.store.root)
    before = tree(root)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- id: q\n  weight: 1.0\n")  # no text
    cli = ["train", str(DEMO), "--storage", run.root.url]
    r = CliRunner().invoke(app, [*cli, "--adopt", str(bad)])
    assert r.exit_code == 2 and r.output.startswith(f"error: --adopt {bad} is invalid: questions.0.text"), r.output
    assert len(r.output.strip().splitlines()) <= 2, r.output  # one (soft-wrapped) line
    r = CliRunner().invoke(app, [*cli, "--adopt", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "--adopt" in r.output and "no such file" in r.output, r.output
    r = CliRunner().invoke(app, [*cli, "--adopt", f"{run.url}/proposals/none"])
    assert r.exit_code == 2 and "no committed proposal there" in r.output, r.output
    # a proposal made against other questions than the run trains with is refused
    stale = adopt.load(f"{run.url}/proposals/r")
    stale = phases.Adoption(stale.questions, stale.source, run_id=stale.run_id, against="0" * 64)
    with pytest.raises(phases.AdoptionRefused, match="make a new proposal"):
        phases.next_phase(run, stale)
    assert tree(root) == before

    # a damaged phase record is damage: verify says so in one line
    good = yaml.safe_dump({"questions": [q.model_dump() for q in stale.questions]})
    (tmp_path / "good.yaml").write_text(good)
    p = phases.adopt(run, adopt.load(str(tmp_path / "good.yaml")))
    assert p is not None and p.from_iteration == 2 and p.source == {"kind": "file", "path": str(tmp_path / "good.yaml")}
    (root / phases.phase_rel(1)).write_text("{")
    rep = verify(run)
    assert not rep.ok and any("phase-0001.json is not a valid phase record" in x for x in rep.problems)
    assert pl.Series(rep.problems).str.contains("\n").sum() == 0
