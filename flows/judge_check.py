"""rlme_judge_check: before training, how well the configured judges separate the base policy's own right
and wrong answers, against the thresholds docs/paper_mini.md measured (docs/judge_check.md)."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from rich import box
from rich.console import Console
from rich.table import Table
from rlme_flows.config_io import load, public_options
from rlme_flows.train import artifact_key
from rlme_tasks.steps import as_tasks

from rlme_pipeline.backends.session import Backends
from rlme_pipeline.judging import check
from rlme_pipeline.storage.store import Store

COLUMNS = ["evaluator", "question_id", "weight", "n", "n_correct", "auroc_reward", "auroc_p_yes", "p_yes_right",
           "p_yes_wrong", "ece", "verdict"]  # fmt: skip


@flow(name="rlme_judge_check", log_prints=True)
def rlme_judge_check(
    config: str,
    prompts: int = 16,
    samples: int = 4,
    probe_prompts: int = 4,
    out: str | None = None,
    storage_options: dict | None = None,
) -> dict:
    """config: a YAML config (path or fsspec URL); out: where the tables go (never a run directory);
    storage_options: non-secret fsspec options for `out`."""
    opts = public_options(storage_options)
    cfg = load(config)
    labelled = check.check_inputs(cfg, prompts, samples)  # again: a deployment's run skips the CLI's checks
    if out is not None:
        check.check_out(cfg, out, opts)

    def judge_check() -> dict:  # the one step, a task: the report's summary (small) is what it returns
        with Backends(cfg.vllm_settings()) as backends:
            result = check.run(cfg, labelled, samples, probe_prompts, backends)
        if out is not None:
            result.summary["files"] = check.write(result, Store(out, opts))
        return result.summary

    report = as_tasks()("judge-check", judge_check)()
    key = artifact_key(cfg.run.id) + "-judge-check"
    rows = [{c: r.get(c) for c in COLUMNS} for r in report["judges"]]
    create_table_artifact(key=key, table=rows, description=f"judge-check of {config}: {report['verdict']}")
    create_markdown_artifact(key=key + "-md", markdown="\n".join(lines(report)))
    return report


def _num(x, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def lines(report: dict) -> list[str]:
    """The report's verdict and its reasons, as text lines (the CLI's screen and the flow's artifact)."""
    r, t = report["reward"], report["thresholds"]
    acc = _num(report["accuracy"], ".1%")
    se = f" ± {r['auroc_se']:.3f} (one standard error)" if r.get("auroc_se") is not None else ""
    out = [
        f"policy: {report['samples']} samples of {report['prompts']} labelled prompts, {report['correct']} right "
        f"({acc})",
        f"judges' reward (as training sums it): AUROC {_num(r['auroc_reward'])}{se}; mean reward right "
        f"{_num(r['reward_right'], '.4g')}, wrong {_num(r['reward_wrong'], '.4g')}",
        f"verdict: {report['verdict'].upper()} ({report['why']})",
        f"thresholds on the reward's AUROC: below {t['hacked_below']} likely to be reward-hacked, "
        f"{t['hacked_below']}-{t['good_from']} marginal, from {t['good_from']} good ({t['source']})",
    ]
    p = report.get("probe") or {}
    if p:
        alarm = "ALARM" if p["probe/alarm"] else "ok"
        out.append(
            f"judge-hacking probe: up to {p['probe/share_max']:.0%} of content-free answers judged positive "
            f"({alarm}, alarm above {p['alarm_share']:.0%})"
        )
    if report.get("failed_judgements"):
        out.append(f"failed judgements: {report['failed_judgements']} (left out of the AUROCs)")
    return out


def render(report: dict, console: Console) -> None:
    """One screen: a row per evaluator x question, then the verdict and its reasons."""
    title = "judge-check: the judges on the base policy's own samples"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("judge", min_width=12)
    for head in ("right/n", "AUROC\nreward", "AUROC\nP(yes)", "P(yes)\nright/wrong", "ECE"):
        table.add_column(head, justify="right", no_wrap=True)
    table.add_column("verdict", min_width=10)
    style = {"good": "green", "marginal": "yellow", "likely to be reward-hacked": "bold red"}
    for r in report["judges"]:
        table.add_row(
            f"{r['evaluator']} / {r['question_id']}",
            f"{r['n_correct']}/{r['n']}",
            _num(r["auroc_reward"]),
            _num(r["auroc_p_yes"]),
            f"{_num(r['p_yes_right'], '.2f')}/{_num(r['p_yes_wrong'], '.2f')}",
            _num(r["ece"], ".2f"),
            f"[{style.get(r['verdict'], 'dim')}]{r['verdict']}[/]",
        )
    console.print(table)
    for line in lines(report):
        console.print(line, soft_wrap=True, highlight=False)
    for f in report.get("files", []):
        console.print(f"  {f}", soft_wrap=True, highlight=False)
