"""`rlme verify`: re-hash every committed file of a run against its manifest and say what is wrong."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlme_pipeline.run import CorruptRun, Run


@dataclass
class Report:
    run: str
    checked_iterations: list[int] = field(default_factory=list)
    checked_files: int = 0
    checked_bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(run: Run) -> Report:
    rep = Report(run.url)
    if not run.store.exists("run.json"):
        rep.problems.append(f"{run.store.where('run.json')}: missing (is {run.url} a run?)")
    else:
        try:
            run.config()
        except Exception as e:  # a config error or a torn file: report it, keep checking the iterations
            rep.problems.append(f"{run.store.where('run.json')}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]})")
    for i in run.committed():
        try:
            m = run.manifest(i)
        except CorruptRun as e:
            rep.problems.append(str(e))
            continue
        rep.checked_iterations.append(i)
        rep.checked_files += len(m.files)
        rep.checked_bytes += sum(f.bytes for f in m.files)
        rep.problems += run.check_files(m.files)
    return rep
