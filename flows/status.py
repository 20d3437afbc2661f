"""What `rlme status` shows: a run's committed iterations and any iteration not committed yet, as data
(`--json`) and as text that fits the terminal, 80 columns when piped (a worker's log), without cutting a
number: columns that do not fit are left out of the table and named, and the newest iteration's metrics
are listed in full below it. A run that adopted other questions (phases.py) gets a `ph` column and a line
per adopted phase; a run with one phase reads as before."""

from __future__ import annotations

import io
import math

from rich import box
from rich.columns import Columns
from rich.console import Console
from rich.table import Table
from rich.text import Text

from rlme_pipeline.progress import duration
from rlme_pipeline.steps import steps_of
from rlme_pipeline.storage import phases
from rlme_pipeline.storage.run import NoRun, Run, iter_dir  # noqa: F401 (NoRun: what collect raises)


def collect(run: Run) -> dict:
    """Everything status shows, JSON-ready: the run, its question-set phases, its committed iterations
    (phase, metrics, seconds per stage) and the iterations with finished steps but no commit (running now,
    or interrupted)."""
    meta = run.meta()  # NoRun when the URL holds no run; RunMismatch for a copied run directory
    cfg, ps = run.config(), phases.read(run)
    committed = run.committed()
    manifests = [run.manifest(i) for i in committed]
    return {
        "run": run.url,
        "run_id": run.id,
        "config_hash": meta.get("config_hash"),
        "created_at": meta.get("created_at"),
        "iterations_target": cfg.run.iterations,
        "phases": [
            {"phase": p.phase, "from_iteration": p.from_iteration, "source": p.source,
             "questions_sha": p.questions_sha, "question_ids": [q.id for q in p.questions]}
            for p in ps.all
        ],
        "committed": [
            {"iteration": m.iteration, "phase": m.lineage.get("phase", ps.at(m.iteration).phase),
             "committed_at": m.committed_at, "seconds": round(sum(m.timings.values()), 3),
             "timings": m.timings, "metrics": m.metrics}
            for m in manifests
        ],
        "in_progress": [_in_progress(run, cfg, ps, i) for i in run.iterations() if i not in set(committed)],
    }  # fmt: skip


def _in_progress(run: Run, cfg, ps: phases.Phases, i: int) -> dict:
    """Steps with a record (done, in run order) and the seconds each took; the rest of the iteration's
    steps (the held-out eval where it is due) are still to do."""
    steps = steps_of(cfg, i)
    names = [n.removesuffix(".json") for n in run.store.ls(f"{iter_dir(i)}/stages") if n.endswith(".json")]
    done = sorted(names, key=lambda s: steps.index(s) if s in steps else len(steps))
    return {
        "iteration": i,
        "phase": ps.at(i).phase,
        "stages_done": done,
        "stages_todo": [s for s in steps if s not in done],
        "seconds": {s: round(run.read_record(i, s).seconds, 3) for s in done},
    }


# --- text -------------------------------------------------------------------------------------------------


def number(v) -> str:
    """A metric as at most 9 characters, never cut: 4 significant digits, exponent form when tiny or huge."""
    if v is None:
        return "–"
    if not isinstance(v, float) or not math.isfinite(v):
        return str(v)
    return "0" if v == 0 else f"{v:.2e}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.4g}"


def _probe(x: dict) -> str:
    v = x.get("probe/share_max")
    return number(v) + ("!" if x.get("probe/alarm") else "") if v is not None else "–"


def source(s: dict) -> str:
    """Where a phase's questions came from, as phases.py records it: a proposal, a file, the config."""
    if s.get("kind") == "proposal":
        return f"proposal {s.get('name')}" + (f", candidate {s['candidate']}" if s.get("candidate") is not None else "")
    if s.get("kind") == "file":
        return f"file {s.get('path')}"
    return " ".join([str(s.get("kind"))] + [f"{k} {v}" for k, v in s.items() if k != "kind"])


def _share(v) -> str:
    return "–" if v is None else f"{v:.1%}"


# (header, priority: lower stays longer as the terminal narrows, cell text from a committed row)
COLUMNS = [
    ("iter", 0, lambda r: str(r["iteration"])),
    ("reward", 0, lambda r: number(r["metrics"].get("reward_mean"))),
    ("±std", 2, lambda r: number(r["metrics"].get("reward_std"))),
    ("failed", 1, lambda r: _share(r["metrics"].get("failed_share"))),
    ("loss", 1, lambda r: number(r["metrics"].get("loss"))),
    ("kl", 3, lambda r: number(r["metrics"].get("kl"))),
    ("clip", 4, lambda r: number(r["metrics"].get("clip_ratio"))),
    ("probe", 2, lambda r: _probe(r["metrics"])),
    ("tokens", 5, lambda r: number(r["metrics"].get("completion_tokens_mean"))),
    ("time", 3, lambda r: duration(r["seconds"])),
]
# Held-out evaluation (config eval): shown only for runs that have it, so other tables stay as they were.
EVAL_COLUMNS = {
    "eval/accuracy": ("eval acc", 1, lambda r: _share(r["metrics"].get("eval/accuracy"))),
    "eval/pass_at_k": ("pass@k", 3, lambda r: _share(r["metrics"].get("eval/pass_at_k"))),
    "eval/maj_at_k": ("maj@k", 3, lambda r: _share(r["metrics"].get("eval/maj_at_k"))),
    "eval/reward_mean": ("eval rew", 2, lambda r: number(r["metrics"].get("eval/reward_mean"))),
}


# The question-set phase (phases.py): shown only for runs that adopted other questions, and kept at any width
# (2 characters; the rows mean little without it).
PHASE_COLUMN = ("ph", 0, lambda r: str(r["phase"]))


def columns_for(rows: list[dict], phased: bool = False) -> list:
    """COLUMNS, with the phase after iter when `phased`, and the eval columns after reward where some row
    has that metric."""
    extra = [c for k, c in EVAL_COLUMNS.items() if any(k in r["metrics"] for r in rows)]
    return COLUMNS[:1] + [PHASE_COLUMN] * phased + COLUMNS[1:2] + extra + COLUMNS[2:]


def _table(rows: list[dict], columns: list) -> Table:
    t = Table(box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False, show_edge=False)
    for header, _, _ in columns:
        t.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        t.add_row(*(cell(r) for _, _, cell in columns))
    return t


def _width(table: Table) -> int:
    """The table's natural width, rendered where nothing constrains it."""
    wide = Console(width=10_000, file=io.StringIO(), color_system=None)
    wide.print(table)
    return max((len(line.rstrip()) for line in wide.file.getvalue().splitlines()), default=0)


def fitted_table(console: Console, rows: list[dict], phased: bool = False) -> tuple[Table, list[str]]:
    """The widest table of COLUMNS (dropping the least important first) that fits the console, and the
    headers left out."""
    columns = columns_for(rows, phased)
    for level in sorted({p for _, p, _ in columns}, reverse=True):
        cols = [c for c in columns if c[1] <= level]
        table = _table(rows, cols)
        if _width(table) <= console.width:
            break
    return table, [h for h, p, _ in columns if p > level]


def render(status: dict, console: Console) -> None:
    rows, target = status["committed"], status["iterations_target"]
    console.print(Text.assemble(("run ", "bold"), status["run"]), soft_wrap=True)
    # The target is the one the run was created with (run.json); a later `--iterations` raises it, so past it
    # there is nothing to count against.
    done = f"{len(rows)} of {target}" if len(rows) <= target else f"{len(rows)}"
    console.print(f"{done} iterations committed", highlight=False)
    phased = len(status["phases"]) > 1
    for p in status["phases"][1:]:
        console.print(
            f"phase {p['phase']} from iteration {p['from_iteration']} ({source(p['source'])})", highlight=False
        )
    if rows:
        table, hidden = fitted_table(console, rows, phased)
        console.print(table)
        if any(r["metrics"].get("probe/alarm") for r in rows):
            console.print("! probe alarm: an evaluator judged content-free answers positive (docs/rescore_audit.md)")
        if any(k in r["metrics"] for r in rows for k in EVAL_COLUMNS):
            console.print(
                "eval: held-out prompts; acc: exact match with labels, rew: the judges' reward",
                highlight=False,
            )  # fmt: skip
        if phased:
            console.print("ph: the question-set phase the iteration was judged in (docs/evolve.md)", highlight=False)
        if hidden:
            console.print(f"not shown at {console.width} columns: {', '.join(hidden)} (all in --json)", highlight=False)
    for p in status["in_progress"]:
        done = ", ".join(f"{s} {duration(p['seconds'][s])}" for s in p["stages_done"]) or "nothing"
        todo = ", ".join(p["stages_todo"]) or "commit"
        where = f" (phase {p['phase']})" if phased else ""
        console.print(
            f"iteration {p['iteration']}{where} not committed: done {done}; to do: {todo} "
            "(running, or interrupted: `rlme train` resumes it)", highlight=False,
        )  # fmt: skip
    if rows:
        last = rows[-1]
        console.print(f"\niteration {last['iteration']}, committed {last['committed_at']}:", highlight=False)
        items = [f"{k} {number(v)}" for k, v in sorted(last["metrics"].items())]
        items += [f"seconds/{k} {number(v)}" for k, v in last["timings"].items()]
        console.print(Columns([Text(i, no_wrap=True) for i in items], padding=(0, 3)))
