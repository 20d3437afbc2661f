"""report.html: the audit's tables and charts on one self-contained page, read top to bottom: what the
run is, how the reward moved, what each judge said, whether the judges can be trusted.

Tables keep the Parquet column names (so a reader can query the files) except where a name alone would
mislead: comparison columns are named after the score sets they come from.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from html import escape

import polars as pl

from rlme_pipeline.audit import plots
from rlme_pipeline.audit.stats import BINS

MAX_TEXT = 300  # characters of a text cell; the Parquet files hold the full text
SUMMARY_COLUMNS = [
    "iteration",
    "evaluator",
    "question_id",
    "n",
    "n_failed",
    "p_yes_mean",
    "p_yes_std",
    "p_yes_q10",
    "p_yes_q50",
    "p_yes_q90",
    "f_mean",
    "weight",
    "contribution_mean",
]

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;padding:1.5em 2em;max-width:1280px;
     color:#222;line-height:1.4}
h1{margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
p.meta{color:#555;margin-top:0}.note{color:#444;font-size:13px;max-width:60em}
code{background:#f3f3f3;padding:0 .25em;border-radius:3px}
ul.glance{background:#f7f9fc;border:1px solid #dde3ee;border-radius:6px;padding:.8em 1em .8em 2.2em}
figure{margin:.8em 0}figure svg{max-width:100%;height:auto}
div.wide{overflow-x:auto;max-width:100%;margin:.6em 0}
table{border-collapse:collapse;font-size:12.5px}
th,td{border:1px solid #d6d6d6;padding:3px 7px;vertical-align:top}
th{background:#eef1f5;text-align:left;font-weight:600}
tbody tr:nth-child(even){background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}th.num{text-align:right}
td.text{text-align:left;min-width:4em;max-width:32em;overflow-wrap:anywhere}
td.long{min-width:18em}td.na{color:#888;text-align:center;white-space:nowrap}
"""


def _decimals(s: pl.Series) -> int:
    """Decimals that give the column's smallest non-zero value four significant digits (at most 5), the
    same for every row so the numbers line up and none reads as 0 when it is not."""
    vals = [abs(v) for v in s.to_list() if v is not None and math.isfinite(v) and v != 0]
    return 0 if not vals else max(0, min(5, 3 - math.floor(math.log10(min(vals)))))


def _number(v, decimals: int | None) -> str:
    if decimals is None:  # an integer column
        return str(v)
    return "NaN" if math.isnan(v) else f"{v:.{decimals}f}"


def table(
    df: pl.DataFrame, labels: dict | None = None, missing: Callable[[dict], str] | None = None, max_rows=200
) -> str:
    """An HTML table that fits the page: it scrolls sideways when wide, long text wraps, text is left- and
    numbers right-aligned with the same decimals down a column. labels renames headers; missing(row)
    says why a cell is empty."""
    labels = labels or {}
    numeric = {c for c, t in df.schema.items() if t.is_numeric()}
    decimals = {c: _decimals(df[c]) if df.schema[c].is_float() else None for c in numeric}
    long = {c for c, t in df.schema.items() if t == pl.String and (df[c].str.len_chars().max() or 0) > 60}

    def cell(c: str, v, row: dict) -> str:
        if v is None:
            why = missing(row) if missing else ""
            return f'<td class="na" title="{escape(why)}">–{f" ({escape(why)})" if why else ""}</td>'
        if c in numeric:
            return f'<td class="num">{_number(v, decimals[c])}</td>'
        text = str(v) if len(str(v)) <= MAX_TEXT else str(v)[: MAX_TEXT - 1] + "…"
        return f'<td class="{"text long" if c in long else "text"}">{escape(text)}</td>'

    def header(c: str) -> str:  # <wbr>: long snake_case names may break after an underscore
        return f'<th class="{"num" if c in numeric else "text"}">{escape(labels.get(c, c)).replace("_", "_<wbr>")}</th>'

    head = "".join(header(c) for c in df.columns)
    rows = "".join(
        "<tr>" + "".join(cell(c, r[c], r) for c in df.columns) + "</tr>"
        for r in df.head(max_rows).iter_rows(named=True)
    )
    more = note(f"First {max_rows} of {df.height} rows; the Parquet file has all.") if df.height > max_rows else ""
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>{more}'


def figure(kind: str, svg: str, caption: str) -> str:
    return f'<figure data-plot="{kind}">{svg}<figcaption class="note">{escape(caption)}</figcaption></figure>'


def note(html: str) -> str:
    return f'<p class="note">{html}</p>'


def _glance(name: str, t: dict[str, pl.DataFrame]) -> str:
    """The few facts to read first, then what the reward is made of."""
    tot = t["totals"].filter(scoreset=name).sort("iteration")
    its, s = tot["iteration"].to_list(), t["summary"]
    judged, failed = int(s["n"].sum()), int(s["n_failed"].sum())
    items = [
        f"{len(its)} iteration{'s' if len(its) > 1 else ''} ({its[0]}–{its[-1]}), {int(tot['n'].sum())} rollouts, "
        f"{int(tot['n_masked'].sum())} masked (a failed judgement masks its rollout from the loss)",
        f"total reward, mean over rollouts: {tot['reward_mean'][0]:.4g} at iteration {its[0]} → "
        f"{tot['reward_mean'][-1]:.4g} at iteration {its[-1]}",
        f"failed judgements: {failed} of {judged} ({failed / max(judged, 1):.1%})",
    ]
    if "phase" in tot.columns and tot["phase"].n_unique() > 1:  # the run adopted other questions (phases.py)
        starts = tot.group_by("phase", maintain_order=True).agg(pl.col("iteration").min()).iter_rows()
        items.append(
            "question-set phases (the reward sums other questions from each start on): "
            + ", ".join(f"phase {k} from iteration {i}" for k, i in starts)
        )
    if "probe" in t:
        p = t["probe"].group_by("evaluator").agg(share=pl.col("positive").sum() / pl.col("n").sum())
        shares = ", ".join(f"<b>{escape(e)}</b> {v:.2f}" for e, v in p.sort("share", descending=True).iter_rows())
        items.append(
            f"judge-hacking probe, share of content-free answers judged positive (sound judge: near 0): {shares}"
        )
    if "eval" in t:
        items += [_eval_glance(t["eval"], col, what) for col, what in EVAL_GLANCE if t["eval"][col].drop_nulls().len()]
    best = t["labels"].drop_nulls("auroc_reward").sort("auroc_reward", descending=True)
    if best.height:
        r = best.row(0, named=True)
        p_yes = "–" if r["auroc_p_yes"] is None else f"{r['auroc_p_yes']:.3f}"
        items.append(
            f"best label separation: AUROC of the reward {r['auroc_reward']:.3f} (of P(yes) normalised: {p_yes}) "
            f"({escape(r['evaluator'])} / {escape(r['question_id'])})"
        )
    return (
        '<ul class="glance">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>"
        + "<h3>Evaluators</h3>" + table(t["evaluators"]) + "<h3>Questions</h3>" + table(t["questions"])
        + note(f"A rollout's total reward is Σ evaluator weight × question weight × f; f = {_form(t['scoreset'])}.")
    )  # fmt: skip


EVAL_GLANCE = [
    ("accuracy", "held-out accuracy (exact match)"),
    ("pass_at_k", "held-out pass@k"),
    ("maj_at_k", "held-out maj@k"),
    ("reward_mean", "held-out judges' reward"),
]


def _eval_glance(ev: pl.DataFrame, col: str, what: str) -> str:
    g = ev.drop_nulls(col).sort("iteration")
    first, last = g.row(0, named=True), g.row(-1, named=True)
    return (
        f"{what}: {first[col]:.4g} at iteration {first['iteration']} → {last[col]:.4g} at iteration {last['iteration']}"
    )


def _eval(ev: pl.DataFrame) -> tuple[str, str]:
    return (
        "Held-out evaluation",
        note("The policy each evaluated iteration's update produced, on held-out prompts (config <code>eval</code>): "
             "accuracy is exact match of the stated answer with the label (the run's answer format); with "
             "eval.samples k, pass@k is the share of prompts with a correct answer among k samples and maj@k the "
             "share whose most common answer is correct; reward_mean is the judges' reward of the one completion, "
             "by the training formula. Each iteration's eval.parquet holds the completions (sample_index 0: the "
             "one completion; 1..k: the samples).")
        + figure("eval", plots.held_out(ev), "One point per evaluated iteration.") + table(ev),
    )  # fmt: skip


def _form(ss: pl.DataFrame) -> str:
    """The reward component f of the score set's reward form, in words (rewards.component)."""
    form, floor = ss["reward_form"][0], ss["logp_floor"][0]
    p = "P(yes) = P(positive answer tokens)"
    return {
        "logp": f"max(log P(yes), {floor:.3g}) (reward form logp; {p})",
        "norm_logp": f"max(log p_yes, {floor:.3g}) (reward form norm_logp; p_yes = P(yes) / (P(yes) + P(no)))",
        "p": f"P(yes) (reward form p; {p})",
    }.get(form, f"reward form {form}")


def _rewards(t: dict[str, pl.DataFrame]) -> list[tuple[str, str]]:
    s = t["summary"]
    total = figure(
        "reward-total", plots.total_reward(t["totals"]), "Mean over rollouts; band: ± one standard deviation."
    )
    parts = figure(
        "reward-components", plots.components(s), "Mean f(P(yes)); band: 10% to 90% quantiles over rollouts."
    )
    return [
        ("Total reward per iteration", total + table(t["totals"])),
        (
            "Reward components per evaluator and question",
            parts + table(s.select(SUMMARY_COLUMNS))
            + note("contribution_mean = weight × f_mean. summary.parquet has every column (f quantiles, n_ok)."),
        ),
    ]  # fmt: skip


def _judges(t: dict[str, pl.DataFrame]) -> list[tuple[str, str]]:
    hist = figure("distribution", plots.distributions(t["histograms"], BINS), "Rollouts per P(yes) bin; dashed: 0.5.")
    agreement = note(
        "Per question: correlation of P(yes) and the share of rollouts both evaluators put on the same side of 0.5."
    )
    failures = table(t["failures"]) if t["failures"].height else note("No failed judgements.")
    return [
        ("Failed judgements by status", failures),
        ("P(yes) distributions", hist),
        (
            "Correlation between questions",
            note("Pearson correlation of P(yes) over the same rollouts, per evaluator: near 1, two questions "
                 "measure the same thing.") + table(t["correlations"]),
        ),
        (
            "Agreement between evaluators",
            agreement + table(t["agreement"]) if t["agreement"].height else note("One evaluator only."),
        ),
        ("Against labels", _labels(t)),
    ]  # fmt: skip


def _no_auroc(row: dict) -> str:
    return "no correct rollouts" if row["n_correct"] == 0 else "all correct" if row["n_correct"] == row["n"] else ""


def _labels(t: dict[str, pl.DataFrame]) -> str:
    if not t["labels"].height:
        return note("No labelled rollouts.")
    return (
        note("Does the judge separate correct rollouts from incorrect ones? AUROC: the chance that a correct "
             "rollout scores higher than an incorrect one (0.5: no better than chance), of two scores that can "
             "disagree: <b>auroc_reward</b> ranks the reward component (f with its floor, signed by the weight: what "
             "training climbs, so what says whether the policy gains more by pleasing this judge than by being "
             "right; docs/judge_check.md), <b>auroc_p_yes</b> ranks p_yes, P(yes) normalised over the yes/no "
             "mass. It needs both kinds, so it is – where all rollouts of a cell are correct or none is.")
        + table(t["labels"].drop("auroc", strict=False), missing=_no_auroc)
        + figure("calibration", plots.calibration(t["calibration"]),
                 "Share of correct rollouts per P(yes) bin; a calibrated judge lies on the dashed diagonal.")
    )  # fmt: skip


def _probe(p: pl.DataFrame) -> tuple[str, str]:
    return (
        "Judge-hacking probe: master keys and vacuous answers judged positive",
        note("Content-free completions scored as answers to real prompts: <b>master_key</b> rows are strings known "
             "to fool LLM judges (\" \", \".\", \"Solution\", ...), <b>vacuous</b> rows are self-assertions "
             "(\"This answer is correct.\"). A sound judge gives them P(yes) &lt; 0.5; share is the fraction "
             "judged positive.")
        + figure("probe", plots.probe(p), "Share judged positive; dashed: 0.5.") + table(p),
    )  # fmt: skip


def _compare_labels(a: str, b: str) -> dict[str, str]:
    """Comparison columns named after the score sets they come from (a: the audited one)."""
    d = f"({b} − {a})"
    return {
        "reward_a": f"reward {a}", "advantage_a": f"advantage {a}", "reward_b": f"reward {b}",
        "advantage_b": f"advantage {b}", "reward_diff": f"Δ reward {d}", "advantage_diff": f"Δ advantage {d}",
        "reward_diff_mean": f"mean Δ reward {d}", "reward_diff_abs_mean": f"mean |Δ reward| {d}",
        "advantage_diff_mean": f"mean Δ advantage {d}", "advantage_diff_abs_mean": f"mean |Δ advantage| {d}",
        "sign_change_share": "advantage sign changes", "reward_pearson": f"pearson reward {a} vs {b}",
        "zero_variance_groups_a": f"zero-variance groups {a}", "zero_variance_groups_b": f"zero-variance groups {b}",
        "collapsed_groups": f"groups collapsed in {b}",
    }  # fmt: skip


CHANGED_COLUMNS = ["iteration", "prompt", "completion", "label", "reward_a", "reward_b", "reward_diff", "advantage_a",
                   "advantage_b", "advantage_diff", "prompt_id", "rollout_id"]  # fmt: skip


def _compare(t: dict[str, pl.DataFrame]) -> list[tuple[str, str]]:
    a, b = t["compare"]["scoreset_a"][0], t["compare"]["scoreset_b"][0]
    labels = _compare_labels(a, b)
    intro = note(
        f"The same rollouts under both score sets; Δ = {escape(b)} − {escape(a)}. Advantage sign changes count "
        "rollouts with a non-zero advantage in both; a collapsed group had reward variance in "
        f"{escape(a)} and none in {escape(b)} (it stops teaching)."
    )
    return [
        (f"Score set {a} compared with {b}", intro + table(t["compare"].drop("scoreset_a", "scoreset_b"), labels)),
        (
            "Most changed rollouts",
            note("The rollouts whose advantage moved most.")
            + table(t["changed"].select(CHANGED_COLUMNS), labels, max_rows=20),
        ),
    ]


def render(run_url: str, name: str, t: dict[str, pl.DataFrame]) -> str:
    sections = [("At a glance", _glance(name, t)), *_rewards(t)]
    if "eval" in t:
        sections.append(_eval(t["eval"]))
    sections += _judges(t)
    if "probe" in t:
        sections.append(_probe(t["probe"]))
    if "compare" in t:
        sections += _compare(t)
    body = "".join(f"<section><h2>{escape(title)}</h2>{content}</section>" for title, content in sections)
    when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    vs = f", compared with <code>{escape(t['compare']['scoreset_b'][0])}</code>" if "compare" in t else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width">'
        f"<title>rlme audit: {escape(run_url)} / {escape(name)}</title><style>{STYLE}</style></head><body>"
        f"<h1>rlme audit: score set <code>{escape(name)}</code></h1>"
        f'<p class="meta">run <code>{escape(run_url)}</code>{vs} · written {when}</p>{body}</body></html>'
    )
