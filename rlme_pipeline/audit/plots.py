"""The audit's charts, drawn by matplotlib and returned as inline SVG, so report.html stays one file that
opens offline, with real axes, ticks, labels and legends.

Figures are built with `matplotlib.figure.Figure`, not pyplot: no global figure registry, no GUI backend,
safe in a worker process. Text stays text in the SVG (`svg.fonttype: none`): small, sharp and searchable.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable

import matplotlib as mpl
import polars as pl
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

STYLE = {
    "svg.fonttype": "none",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "legend.framealpha": 0.8,
}
PANEL = (4.0, 2.8)  # inches per panel
MAX_COLUMNS = 3


def _svg(panels: list, draw: Callable[[Axes, object], None], sharex: bool = False, sharey: bool = False) -> str:
    """One figure with a panel per item of `panels` (at most MAX_COLUMNS a row), each drawn by draw(ax, item)."""
    cols = min(len(panels), MAX_COLUMNS) or 1
    rows = math.ceil(len(panels) / cols) or 1
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(PANEL[0] * cols, PANEL[1] * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False, sharex=sharex, sharey=sharey).ravel()
        for ax, item in zip(axes, panels):
            draw(ax, item)
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog: the SVG sits inside HTML


def _groups(df: pl.DataFrame, *keys: str) -> Iterable[tuple[tuple, pl.DataFrame]]:
    return df.group_by(*keys, maintain_order=True)


def _iterations(ax: Axes, xs: list[int]) -> None:
    """Iterations on the x axis: each one ticked when there are few, whole numbers otherwise."""
    its = sorted(set(xs))
    if len(its) <= 12:
        ax.set_xticks(its)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(its) == 1:
        ax.set_xlim(its[0] - 1, its[0] + 1)


def total_reward(totals: pl.DataFrame) -> str:
    """Mean total reward per iteration with a band of one standard deviation over rollouts; one panel per
    score set (score sets may weigh questions differently, so their scales need not match)."""

    def draw(ax: Axes, item):
        (name,), g = item
        x, m, s = g["iteration"].to_list(), g["reward_mean"].to_list(), g["reward_std"].fill_null(0.0).to_list()
        ax.fill_between(
            x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.2, label="± 1 std over rollouts"
        )
        if len(x) == 1:  # a band needs two points
            ax.errorbar(x, m, yerr=s, fmt="none", capsize=4, color="C0", alpha=0.5)
        ax.plot(x, m, marker="o", label="mean")
        _phase_starts(ax, g)
        ax.set(title=f"score set {name}", xlabel="iteration", ylabel="total reward")
        _iterations(ax, x)
        ax.legend(loc="best")

    return _svg(list(_groups(totals.sort("iteration"), "scoreset")), draw)


def held_out(table: pl.DataFrame) -> str:
    """The held-out evaluation per iteration: exact-match accuracy (where labels exist) and the judges'
    reward, one panel each (different units)."""
    panels = [
        (col, title, ylabel)
        for col, title, ylabel in (
            ("accuracy", "held-out accuracy", "exact match with the label"),
            ("reward_mean", "held-out judges' reward", "total reward, mean over prompts"),
        )
        if table[col].drop_nulls().len()
    ]

    def draw(ax: Axes, item):
        col, title, ylabel = item
        g = table.drop_nulls(col).sort("iteration")
        x = g["iteration"].to_list()
        ax.plot(x, g[col].to_list(), marker="o", color="C2", label=col)
        ax.set(title=title, xlabel="iteration (policy after its update)", ylabel=ylabel)
        if col == "accuracy":
            ax.set_ylim(-0.02, 1.02)
            _at_k(ax, table)
        _iterations(ax, x)

    return _svg(panels, draw)


def _at_k(ax: Axes, table: pl.DataFrame) -> None:
    """pass@k and maj@k beside the accuracy (same unit), where the eval drew k samples."""
    drawn = False
    for col, color in (("pass_at_k", "C0"), ("maj_at_k", "C1")):
        if col in table.columns and (g := table.drop_nulls(col).sort("iteration")).height:
            ax.plot(g["iteration"].to_list(), g[col].to_list(), marker="s", color=color, label=col.replace("_at_", "@"))
            drawn = True
    if drawn:
        ax.legend(loc="best", fontsize=8)


def _phase_starts(ax: Axes, g: pl.DataFrame) -> None:
    """A dotted line where the question set changed (a run's phases): the rewards on either side are
    sums over different questions, so a step there is the rubric's, not the policy's."""
    if "phase" not in g.columns or g["phase"].null_count() == g.height:
        return
    rows = g.select("iteration", "phase").drop_nulls().to_dicts()
    for prev, r in zip(rows, rows[1:]):
        if r["phase"] != prev["phase"]:
            ax.axvline(r["iteration"] - 0.5, color="C3", linestyle=":", linewidth=1.2)
            ax.annotate(f"phase {r['phase']}", (r["iteration"] - 0.5, 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -10), textcoords="offset points", color="C3", fontsize=8)  # fmt: skip


def components(summary: pl.DataFrame) -> str:
    """Per evaluator: the mean reward component f(p) of each question per iteration, with the band between
    the 10% and 90% quantiles over rollouts."""

    def draw(ax: Axes, item):
        (ev,), g = item
        for (q,), gq in _groups(g.sort("iteration"), "question_id"):
            x = gq["iteration"].to_list()
            line = ax.plot(x, gq["f_mean"].to_list(), marker="o", label=f"{q} (weight {gq['weight'][0]:g})")[0]
            ax.fill_between(x, gq["f_q10"].to_list(), gq["f_q90"].to_list(), color=line.get_color(), alpha=0.12)
        ax.set(title=f"evaluator {ev}", xlabel="iteration", ylabel="reward component f(p)")
        _iterations(ax, g["iteration"].to_list())
        ax.legend(loc="best")

    return _svg(list(_groups(summary, "evaluator")), draw)


def distributions(histograms: pl.DataFrame, bins: int) -> str:
    """P(yes) histograms, one panel per evaluator x question, with the 0.5 decision line."""

    def draw(ax: Axes, item):
        (ev, q), g = item
        ax.bar([(b + 0.5) / bins for b in g["bin"]], g["n"].to_list(), width=1 / bins, edgecolor="white")
        ax.axvline(0.5, color="0.4", linestyle="--", linewidth=1)
        ax.set(title=f"{ev} / {q}", xlabel="P(yes)", ylabel="rollouts", xlim=(0, 1))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))

    return _svg(list(_groups(histograms, "evaluator", "question_id")), draw, sharex=True)


def calibration(cal: pl.DataFrame) -> str:
    """Per evaluator: share of correct rollouts per P(yes) bin, one line per question, against the diagonal
    a calibrated judge lies on."""

    def draw(ax: Axes, item):
        (ev,), g = item
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="calibrated")
        for (q,), gq in _groups(g.sort("p_yes_mean"), "question_id"):
            ax.plot(gq["p_yes_mean"].to_list(), gq["correct_share"].to_list(), marker="o", label=q)
        ax.set(title=f"evaluator {ev}", xlabel="mean P(yes) in bin", ylabel="share correct", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left")

    return _svg(list(_groups(cal, "evaluator")), draw)


def probe(table: pl.DataFrame) -> str:
    """Share of content-free answers judged positive, per evaluator x question and probe kind."""

    def draw(ax: Axes, item):
        (ev,), g = item
        qs = g["question_id"].unique(maintain_order=True).to_list()
        kinds = g["kind"].unique(maintain_order=True).to_list()
        h = 0.8 / len(kinds)
        for k, kind in enumerate(kinds):
            gk = g.filter(kind=kind)
            ys = [qs.index(q) + (k - (len(kinds) - 1) / 2) * h for q in gk["question_id"]]
            bars = ax.barh(ys, gk["share"].to_list(), height=h, label=kind)
            ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=7)
        ax.axvline(0.5, color="0.4", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(qs)), qs)
        ax.invert_yaxis()
        ax.set(title=f"evaluator {ev}", xlabel="share judged positive (P(yes) > 0.5)", xlim=(0, 1))
        ax.legend(loc="lower right")

    return _svg(list(_groups(table, "evaluator")), draw)
