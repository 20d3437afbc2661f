"""`rlme verify`: re-hash every committed file of a run (iterations and score sets) against its manifest
and say what is wrong."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlme_pipeline import scoreset
from rlme_pipeline.evolve import proposal
from rlme_pipeline.run import CorruptRun, Run, Unit, check_files


@dataclass
class Report:
    run: str
    checked_iterations: list[int] = field(default_factory=list)
    checked_scoresets: list[str] = field(default_factory=list)  # committed score sets (shards of the others)
    checked_files: int = 0
    checked_bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def check(self, run: Run, unit: Unit) -> bool:
        """Re-hash one committed unit's files; False when its manifest itself is damaged."""
        try:
            m = unit.manifest()
        except CorruptRun as e:
            self.problems.append(str(e))
            return False
        self.checked_files += len(m.files)
        self.checked_bytes += sum(f.bytes for f in m.files)
        self.problems += check_files(run.store, m.files)
        return True


def verify(run: Run) -> Report:
    rep = Report(run.url)
    if not run.store.exists("run.json"):
        rep.problems.append(f"{run.store.where('run.json')}: missing (is {run.url} a run?)")
    else:
        try:
            run.config()
        except Exception as e:  # a config error or a torn file: report it, keep checking the iterations
            rep.problems.append(
                f"{run.store.where('run.json')}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]})"
            )
    for i in run.committed():
        if rep.check(run, run.unit(i)):
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
