"""`rlme verify`: re-hash every committed file of a run (iterations and score sets) against its manifest
and say what is wrong. Checkpoint files that retention deleted (retention.py: listed by the iteration's
PRUNED.json, whose entries must be the manifest's own) are counted as pruned, not reported missing."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlme_pipeline import scoreset
from rlme_pipeline.evolve import proposal
from rlme_pipeline.storage import phases, retention
from rlme_pipeline.storage.run import Commit, CorruptRun, Run, Unit, check_files


@dataclass
class Report:
    run: str
    checked_iterations: list[int] = field(default_factory=list)
    checked_scoresets: list[str] = field(default_factory=list)  # committed score sets (shards of the others)
    checked_files: int = 0
    checked_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    pruned_iterations: list[int] = field(default_factory=list)  # whose checkpoint retention deleted
    pruned_files: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def check(self, run: Run, unit: Unit, iteration: int | None = None) -> bool:
        """Re-hash one committed unit's files (an iteration's, less what retention pruned); False when
        its manifest itself is damaged."""
        try:
            m = unit.manifest()
        except CorruptRun as e:
            self.problems.append(str(e))
            return False
        gone = self.pruned(run, iteration, m) if iteration is not None else set()
        files = [f for f in m.files if f.path not in gone]
        self.checked_files += len(files)
        self.checked_bytes += sum(f.bytes for f in files)
        self.problems += check_files(run.store, files)
        return True

    def pruned(self, run: Run, i: int, m: Commit) -> set[str]:
        """The paths iteration i's PRUNED.json accounts for; a record that lists anything but the
        manifest's own checkpoint entries (same path, same sha256) is a problem and accounts for nothing."""
        where = run.store.where(retention.rel(i))
        try:
            rec = retention.record(run, i)
        except ValueError as e:
            self.problems.append(f"{where}: not a valid pruning record ({type(e).__name__}); its files are checked")
            return set()
        if rec is None:
            return set()
        committed = {f.path: f.sha256 for f in m.files if "/checkpoint/" in f.logical}
        if foreign := [f.path for f in rec.files if committed.get(f.path) != f.sha256]:
            self.problems.append(
                f"{where}: lists files that are not this iteration's committed checkpoint: {foreign[:3]}"
            )
            return set()
        self.pruned_iterations.append(i)
        self.pruned_files += len(rec.files)
        return set(committed) & {f.path for f in rec.files}


def verify(run: Run) -> Report:
    rep = Report(run.url)
    if not run.store.exists("run.json"):
        rep.problems.append(f"{run.store.where('run.json')}: missing (is {run.url} a run?)")
    else:
        try:
            cfg = run.config()
        except Exception as e:  # a config error or a torn file: report it, keep checking the iterations
            rep.problems.append(
                f"{run.store.where('run.json')}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]})"
            )
        else:
            try:  # the question-set phases: each record parses and follows the one before
                phases.read(run, cfg.questions)
            except CorruptRun as e:
                rep.problems.append(str(e))
    for i in run.committed():
        if rep.check(run, run.unit(i), iteration=i):
            rep.checked_iterations.append(i)
    for name in scoreset.names(run):
        ss = scoreset.unit(run, name)
        if ss.committed():
            if rep.check(run, ss):
                rep.checked_scoresets.append(name)
            continue
        for shard in scoreset.shard_units(run, name):  # in progress: its committed shards are committed data
            if shard.committed():
                rep.check(run, shard)
    for name in proposal.names(run):  # rlme evolve's proposals
        if (u := proposal.unit(run, name)).committed():
            rep.check(run, u)
    return rep
