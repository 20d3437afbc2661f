"""The `rlme` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text
from rlme_flows.local_prefect import local_prefect
from typer.core import TyperGroup

console = Console()


class UserError(Exception):
    """A mistake in what the user gave (`_fail`): one line naming the field or file and the fix."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class _Commands(TyperGroup):
    """Every command runs here: a UserError becomes one line and exit 2, or, with --debug (the invocation's
    context, set by `main`), the original error with its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            if (ctx.obj or {}).get("debug"):
                raise e.error from None
            console.print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Commands, help="Reinforcement Learning from Meta-Evaluation.", no_args_is_help=True, add_completion=False
)
models_app = typer.Typer(help="Model utilities.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _fail(e: Exception) -> None:
    """A user error: stops the command (see _Commands for how it is shown)."""
    raise UserError(e)


def _version(show: bool) -> None:
    if show:
        from rlme_pipeline.storage.run import code_version

        v = code_version()
        commit = f" (git {v['git_commit'][:12]})" if v["git_commit"] else ""
        console.print(f"rlme {v['version']}{commit}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version, exit"),
    debug: bool = typer.Option(False, "--debug", envvar="RLME_DEBUG", help="tracebacks instead of one-line errors"),
):
    """Reinforcement Learning from Meta-Evaluation."""
    ctx.obj = {"debug": debug}


@app.command()
def train(
    config: str = typer.Argument(..., help="YAML config (path or fsspec URL)"),
    iterations: Optional[int] = typer.Option(None, help="total iterations the run should reach"),
    storage: Optional[str] = typer.Option(None, help="storage root (overrides run.storage)"),
    run_id: Optional[str] = typer.Option(None, help="run id (overrides run.id)"),
    adopt: Optional[str] = typer.Option(
        None,
        help="train with these questions from the next iteration, as a recorded phase: "
        "{run}/proposals/NAME (its chosen set) or a questions YAML file (docs/evolve.md)",
    ),
):
    """Train (or continue) a run through the Prefect flow rlme_train."""
    from rlme_flows.config_io import load

    from rlme_pipeline.config import ConfigError
    from rlme_pipeline.evolve import adopt as adoption
    from rlme_pipeline.jobs.oom import StageOutOfMemory
    from rlme_pipeline.jobs.preflight import preflight
    from rlme_pipeline.jobs.train import check_resume_point
    from rlme_pipeline.storage import phases
    from rlme_pipeline.storage.lease import LeaseHeld, LeaseLost
    from rlme_pipeline.storage.run import CorruptRun, Run, RunMismatch
    from rlme_pipeline.storage.store import StorageError

    try:
        # Fail fast, before Prefect starts a server; the flow checks again for deployments. The store is
        # the run's own (run.storage_options included), so the check writes where training will.
        cfg = load(config, iterations=iterations, storage=storage, id=run_id)
        run = Run.for_config(cfg)
        adopted = adoption.load(adopt, cfg.run.storage_options) if adopt else None
        preflight(adoption.judged_with(cfg, adopted), run.root)
        run.check(phases.resume_config(run, cfg))  # a changed experiment on an existing run: old -> new
        check_resume_point(run)  # a damaged newest commit: refused here, not after Prefect has started
        if adopted:
            phases.next_phase(run, adopted)
        with local_prefect():  # before Prefect's import: it reads its settings then
            from rlme_flows.train import rlme_train

            state = rlme_train(
                config=config, iterations=iterations, storage=storage, run_id=run_id, adopt=adopt, return_state=True
            )
        if state.is_cancelled():  # another process holds the run's lease: the flow touched nothing
            _fail(RuntimeError(state.message))
        result = state.result()
    except (
        ConfigError,
        RunMismatch,
        StorageError,
        LeaseHeld,
        LeaseLost,
        CorruptRun,
        StageOutOfMemory,
        phases.AdoptionRefused,
    ) as e:
        _fail(e)
    _print_status(_open(result["run"], result.get("storage_options")))
    console.print(
        f"\n[bold green]outputs:[/] {result['run']}  (trained now: {result['trained_now'] or 'nothing, already there'})"
    )


def _print_status(run, as_json: bool = False) -> None:
    """The run's iterations (flows/status.py); a path without a run is a user error."""
    import json

    from rlme_flows.status import collect, render

    from rlme_pipeline.storage.run import CorruptRun
    from rlme_pipeline.storage.store import StorageError

    try:
        data = collect(run)
    except (ValueError, CorruptRun, StorageError, PermissionError) as e:  # ValueError: NoRun, ConfigError
        _fail(e)
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        render(data, console)


RUN_URI = typer.Argument(..., help="{storage}/{run_id}, e.g. ./runs/demo or s3://bucket/runs/demo")
# Non-secret fsspec options, as in run.storage_options; credentials come from the environment.
STORAGE_OPTION = typer.Option(
    [], "--storage-option", "-o", help="fsspec option KEY=VALUE, e.g. endpoint_url=http://minio:9000"
)


def _options(pairs: list[str]) -> dict:
    import yaml
    from rlme_flows.config_io import public_options

    opts = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            _fail(ValueError(f"--storage-option {p!r}: expected KEY=VALUE, e.g. endpoint_url=http://minio:9000"))
        opts[k] = yaml.safe_load(v)
    try:
        return public_options(opts, "--storage-option")
    except ValueError as e:
        _fail(e)


def _open(run_uri: str, options: dict | None = None):
    from rlme_pipeline.storage.run import Run

    try:
        return Run.from_url(run_uri, options)
    except ValueError as e:
        _fail(e)


def _existing(run_uri: str, options: dict):
    """The run at run_uri, which must exist under its own name (run.json), checked before Prefect starts."""
    from rlme_pipeline.storage.store import StorageError

    run = _open(run_uri, options)
    try:
        run.meta()
    except (ValueError, StorageError, PermissionError) as e:  # NoRun, RunMismatch (a copied run directory)
        _fail(e)
    return run


@app.command()
def status(
    run_uri: str = RUN_URI,
    storage_option: list[str] = STORAGE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="print everything as JSON (all metrics of every iteration)"),
):
    """Committed iterations of a run, their metrics, and any iteration not committed yet."""
    _print_status(_open(run_uri, _options(storage_option)), as_json)


@app.command()
def verify(run_uri: str = RUN_URI, storage_option: list[str] = STORAGE_OPTION):
    """Re-hash every committed file against its manifest; exit 1 when anything is missing or changed."""
    from rlme_pipeline.storage.verify import verify as check

    rep = check(_open(run_uri, _options(storage_option)))
    console.print(
        f"{rep.run}: {len(rep.checked_iterations)} committed iterations, {rep.checked_files} files, "
        f"{rep.checked_bytes / 1e6:.1f} MB re-hashed"
        + (
            f"; {rep.pruned_files} checkpoint files of iterations {rep.pruned_iterations} pruned by retention "
            "(their hashes stay in the manifests)"
            if rep.pruned_files
            else ""
        )
    )
    for p in rep.problems:
        console.print(f"[bold red]problem:[/] {p}", soft_wrap=True)
    if not rep.ok:
        raise typer.Exit(1)
    console.print("[bold green]ok:[/] every committed file matches its manifest")


@app.command()
def gc(
    run_uri: str = RUN_URI,
    storage_option: list[str] = STORAGE_OPTION,
    apply: bool = typer.Option(False, "--apply", help="delete (default: only list what would be deleted)"),
):
    """Remove files no manifest or stage record references (left by killed or repeated attempts)."""
    from rlme_pipeline.storage import gc as collect
    from rlme_pipeline.storage.lease import LeaseHeld
    from rlme_pipeline.storage.run import CorruptRun

    run = _open(run_uri, _options(storage_option))
    try:
        p = collect.apply(run) if apply else collect.plan(run)
    except (LeaseHeld, CorruptRun) as e:
        _fail(e)
    verb = "deleted" if apply else "would delete"
    for rel in p.files:
        console.print(f"{verb} {run.store.where(rel)}", soft_wrap=True)
    for u in p.uploads:
        console.print(f"{'aborted' if apply else 'would abort'} open multipart upload of {u['Key']}", soft_wrap=True)
    console.print(
        f"{verb} {len(p.files)} files ({p.bytes / 1e6:.1f} MB), {len(p.uploads)} open uploads"
        + ("" if apply else "; pass --apply to delete")
    )


@app.command()
def rescore(
    run_uri: str = RUN_URI,
    name: str = typer.Option(..., help="score set name: written to {run}/scoresets/{name}/"),
    questions: Optional[str] = typer.Option(
        None, help="YAML list of meta-questions, path or fsspec URL (same shape as config `questions`)"
    ),
    evaluators: Optional[str] = typer.Option(
        None, help="YAML list of evaluators, path or fsspec URL (same shape as config `evaluators`)"
    ),
    iterations: Optional[str] = typer.Option(None, help="committed iterations, as a slice: 3:7 is 3..6; default all"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted re-score of the same definition"),
    shard_rows: int = typer.Option(256, min=1, help="rollouts per shard: the unit of parallelism, memory and resume"),
    storage_option: list[str] = STORAGE_OPTION,
    ray: Optional[str] = typer.Option(
        None, help="run the shards on a Ray cluster: ray://HOST:10001, HOST:6379, auto or local (docs/scale.md)"
    ),
    ray_num_cpus: float = typer.Option(1.0, min=0, help="CPUs each Ray task asks for"),
    ray_num_gpus: float = typer.Option(0.0, min=0, help="GPUs each Ray task asks for"),
    ray_shards_per_task: int = typer.Option(
        4, min=1, help="shards each Ray task scores, loading the judges once for them"
    ),
):
    """Re-score stored rollouts with new meta-questions and/or evaluators (Prefect flow rlme_rescore)."""
    from rlme_pipeline import scoreset
    from rlme_pipeline.storage.store import StorageError

    opts = _options(storage_option)
    if questions is None and evaluators is None:
        _fail(ValueError("give --questions, --evaluators, or both"))
    run = _existing(run_uri, opts)
    try:  # the flow's own checks, run here first: a user error never becomes a failed flow run
        if questions:
            scoreset.load_questions(questions, opts)
        evs = scoreset.load_evaluators(evaluators, opts) if evaluators else run.config().evaluators
        scoreset.check_new(run, name, resume)
        scoreset.check_checkpoints(run, evs, scoreset.parse_iterations(iterations, run.committed()))
        if ray:
            from rlme_tasks.ray import check_address

            check_address(ray)
    except (ValueError, StorageError) as e:  # ConfigError and ScoresetExists are ValueErrors
        _fail(e)
    try:
        with local_prefect(shared=bool(ray)):  # Ray workers report their shards to the same server
            from rlme_flows.rescore import rlme_rescore

            result = rlme_rescore(
                run_uri=run_uri,
                name=name,
                questions=questions,
                evaluators=evaluators,
                iterations=iterations,
                resume=resume,
                shard_rows=shard_rows,
                storage_options=opts,
                ray=ray,
                ray_num_cpus=ray_num_cpus,
                ray_num_gpus=ray_num_gpus,
                ray_shards_per_task=ray_shards_per_task,
            )
    except ValueError as e:  # a definition that differs on --resume, a score set created meanwhile, --ray
        _fail(e)
    console.print(
        f"[bold green]score set:[/] {run_uri}/scoresets/{name}  "
        f"({result['shards_scored_now']} of {result['shards']} shards scored now"
        + (f", on {len(result['workers'])} Ray workers)" if ray else ")")
    )
    for f in result["files"]:
        console.print(f"  {f}")


@app.command()
def audit(
    run_uri: str = RUN_URI,
    out: str = typer.Option(..., help="output directory (or fsspec URL) for the Parquet tables and report.html"),
    scoreset: Optional[str] = typer.Option(None, help="score set to audit; default: the training scores"),
    compare: Optional[str] = typer.Option(
        None, help="second score set to compare with ('train' for the training scores)"
    ),
    probe_prompts: int = typer.Option(4, min=0, help="prompts for the judge-hacking probe; 0 skips it"),
    alarm_share: float = typer.Option(0.5, help="probe alarm when an evaluator judges more than this share positive"),
    storage_option: list[str] = STORAGE_OPTION,
):
    """Audit a run's reward data (Prefect flow rlme_audit): tables in OUT/*.parquet, OUT/report.html."""
    from rlme_pipeline.storage.store import StorageError, Store

    opts = _options(storage_option)
    run = _existing(run_uri, opts)
    for flag, name in (("--scoreset", scoreset), ("--compare", compare)):
        if flag == "--scoreset" or name is not None:
            _check_scoreset(run, flag, name)
    try:
        Store(out, opts).check_writable()
    except StorageError:
        _fail(
            ValueError(
                f"--out {out!r} is not writable; give a directory or bucket you can write "
                "(and its --storage-option flags)"
            )
        )
    try:
        with local_prefect():
            from rlme_flows.audit import rlme_audit

            d = rlme_audit(
                run_uri=run_uri,
                out=out,
                scoreset=scoreset,
                compare=compare,
                probe_prompts=probe_prompts,
                alarm_share=alarm_share,
                storage_options=opts,
            )
    except ValueError as e:
        _fail(e)
    console.print(f"[bold green]audit:[/] {d['out']}/report.html")
    for ev, share in d.get("probe_share", {}).items():
        console.print(
            f"  probe {ev}: {share:.2f} judged positive" + ("  [bold red]ALARM[/]" if share > alarm_share else "")
        )


@app.command()
def evolve(
    run_uri: str = RUN_URI,
    proposer: str = typer.Option(
        ..., help="'rules' (the shipped robustness library) or a model reference: a path, a hub id, tiny:policy"
    ),
    backend: str = typer.Option("hf", help="how the proposer model runs: hf, vllm or openai (the run's vllm settings)"),
    name: Optional[str] = typer.Option(None, help="proposal name: {run}/proposals/{name}/; default p-<UTC time>"),
    candidates: int = typer.Option(4, min=1, max=32, help="drafts to ask the proposer for"),
    iterations: Optional[str] = typer.Option(None, help="committed iterations to learn from and re-score; default all"),
    probe_prompts: int = typer.Option(4, min=1, help="prompts for the judge-hacking probe of each question set"),
    max_new_tokens: int = typer.Option(512, help="longest proposer answer, in tokens"),
    temperature: float = typer.Option(0.7, help="proposer sampling temperature"),
    dtype: str = typer.Option("float32", help="proposer dtype: float32, bfloat16, float16"),
    device: str = typer.Option("cpu", help="proposer device for the hf backend, e.g. cuda"),
    storage_option: list[str] = STORAGE_OPTION,
):
    """Propose edited meta-question sets, re-score the stored rollouts with each, rank them (docs/evolve.md)."""
    import datetime as dt

    from pydantic import ValidationError

    from rlme_pipeline import scoreset
    from rlme_pipeline.config import ProposerConfig
    from rlme_pipeline.evolve import proposal
    from rlme_pipeline.storage.store import StorageError

    opts = _options(storage_option)
    name = name or "p-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    try:
        spec = ProposerConfig(
            model=proposer,
            backend=backend,
            dtype=dtype,
            device=device,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
        )
    except ValidationError as e:  # the one definition of what a proposer may be (config.ProposerConfig)
        flag = lambda field: "--" + ("proposer" if field == "model" else field.replace("_", "-"))  # noqa: E731
        _fail(ValueError("; ".join(f"{flag(str(err['loc'][0]))}: {err['msg']}" for err in e.errors())))
    run = _existing(run_uri, opts)
    try:
        proposal.check_new(run, name)
        scoreset.parse_iterations(iterations, run.committed())
    except (ValueError, StorageError) as e:
        _fail(e)
    try:
        with local_prefect():
            from rlme_flows.evolve import rlme_evolve

            m = rlme_evolve(
                run_uri=run_uri,
                name=name,
                proposer=spec.model_dump(),
                candidates=candidates,
                iterations=iterations,
                probe_prompts=probe_prompts,
                storage_options=opts,
            )
    except ValueError as e:  # a candidate score set that exists with another definition
        _fail(e)
    _print_proposal(m)


def _print_proposal(m: dict) -> None:
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    console.print(f"[bold green]proposal:[/] {m['proposal']}")
    cur = m["current"]["measures"]
    console.print(
        f"  current: probe win {fmt(cur['probe_win_share'])}  AUROC(reward) {fmt(cur['auroc_reward'])}  spread {fmt(cur['spread'])}"
    )
    for c in m["candidates"]:
        if c["status"] == "rejected":
            console.print(f"  {c['index']} {c['source']}: rejected: {c['reason']}", soft_wrap=True, highlight=False)
            continue
        mm = c["measures"]
        line = f"probe win {fmt(mm['probe_win_share'])}  AUROC(reward) {fmt(mm['auroc_reward'])}  spread {fmt(mm['spread'])}"
        note = f"  (ineligible: {c['ineligible']})" if c["ineligible"] else ""
        console.print(f"  {c['index']} {c['source']}: {line}{note}", soft_wrap=True, highlight=False)
    console.print(f"[bold]chosen:[/] {m['why']}", soft_wrap=True)


def _check_scoreset(run, flag: str, name: str | None) -> None:
    """What the audit reads, looked up as the audit does (audit/sources.py), before Prefect starts."""
    from rlme_pipeline.audit.sources import load
    from rlme_pipeline.scoreset import TRAIN, committed_scoresets
    from rlme_pipeline.storage.store import StorageError

    try:
        load(run, name)
    except (ValueError, StorageError) as e:
        have = ", ".join([TRAIN, *committed_scoresets(run)])
        _fail(ValueError(f"{flag} {name or TRAIN}: {e}; choose one of: {have} (`rlme rescore` makes score sets)"))


@app.command("export")
def export_model(
    run_uri: str = RUN_URI,
    out: str = typer.Option(..., help="new local directory for the HF model (and its README.md model card)"),
    iteration: Optional[int] = typer.Option(
        None, help="committed iteration whose checkpoint to export; default the last"
    ),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16; default the run's policy.dtype"),
    merge_lora: bool = typer.Option(
        False, "--merge-lora", help="LoRA run: merge the adapter into its base (full weights); default: the adapter"
    ),
    push_to_hub: Optional[str] = typer.Option(
        None,
        "--push-to-hub",
        metavar="REPO",
        help="then upload OUT to this hub model repo (token: HF_TOKEN or hf auth login)",
    ),
    storage_option: list[str] = STORAGE_OPTION,
):
    """Write one committed checkpoint as an ordinary HF model directory with a model card (docs/models.md)."""
    from rlme_pipeline.models import export as exporting
    from rlme_pipeline.storage.retention import CheckpointPruned
    from rlme_pipeline.storage.run import CorruptRun
    from rlme_pipeline.storage.store import StorageError

    run = _existing(run_uri, _options(storage_option))
    try:
        if push_to_hub:
            exporting.check_push(push_to_hub)  # before minutes of exporting
        done = exporting.export(run, out, iteration=iteration, dtype=dtype, merge_lora=merge_lora)
    except (ValueError, CorruptRun, CheckpointPruned, StorageError) as e:  # ExportError, ConfigError (base)
        _fail(e)
    console.print(
        f"[bold green]exported:[/] {done.out}  (iteration {done.iteration}, {done.kind}, {done.dtype}, "
        f"{done.seconds:.1f} s)",
        soft_wrap=True,
    )
    if push_to_hub:
        try:
            url = exporting.push(done.out, push_to_hub, f"rlme export of {run.id} iteration {done.iteration}")
        except ValueError as e:
            _fail(e)
        console.print(f"[bold green]pushed:[/] {url}", soft_wrap=True)


@app.command("judge-check")
def judge_check(
    config: str = typer.Argument(..., help="YAML config (path or fsspec URL): its policy, data, evaluators, questions"),
    prompts: int = typer.Option(16, min=1, help="labelled prompts to sample (the first N in a stable order)"),
    samples: int = typer.Option(4, min=1, help="completions per prompt, drawn as training's generate stage draws"),
    probe_prompts: int = typer.Option(4, min=0, help="prompts for the judge-hacking probe; 0 skips it"),
    out: Optional[str] = typer.Option(None, help="directory (or fsspec URL) for judge_check.json and the tables"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON instead of the table"),
    storage_option: list[str] = STORAGE_OPTION,
):
    """Before training: do the judges separate the base policy's right answers from its wrong ones?
    AUROC of the reward and of P(yes), calibration, the probe, and a verdict (docs/judge_check.md)."""
    import json

    from rlme_flows.config_io import load

    from rlme_pipeline.config import ConfigError
    from rlme_pipeline.jobs.preflight import check_judges
    from rlme_pipeline.judging import check
    from rlme_pipeline.storage.store import StorageError

    opts = _options(storage_option)
    try:  # every input problem, before Prefect starts or any model loads
        cfg = load(config)
        check.check_inputs(cfg, prompts, samples)
        check_judges(cfg)
        if out is not None:
            check.check_out(cfg, out, opts)
    except (ConfigError, StorageError) as e:
        _fail(e)
    try:
        with local_prefect():
            from rlme_flows.judge_check import render, rlme_judge_check

            report = rlme_judge_check(
                config=config,
                prompts=prompts,
                samples=samples,
                probe_prompts=probe_prompts,
                out=out,
                storage_options=opts,
            )
    except (ConfigError, StorageError) as e:
        _fail(e)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render(report, console)


@models_app.command("make-tiny")
def make_tiny(
    out_dir: Path = typer.Argument(..., help="directory to write policy/ and evaluator/ into"), seed: int = 0
):
    """Write a tiny policy and evaluator (random Llama, byte-level BPE) as ordinary HF directories."""
    from rlme_pipeline.models.tiny import make_tiny as build

    paths = build(out_dir, seed=seed)
    for name, p in paths.items():
        console.print(f"{name}: {p}")


@models_app.command("import")
def import_model(
    src: str = typer.Argument(..., help="a GGUF file (gguf:PATH or *.gguf), an HF model directory, or a hub id"),
    out: Optional[str] = typer.Option(None, help="write here instead of the cache ($RLME_CACHE/imports/{key})"),
):
    """Convert a model once into an ordinary HF directory (safetensors, tokenizer, chat template); print its path."""
    import time

    from rlme_pipeline.models.importing import import_model as run_import

    started = time.perf_counter()
    try:
        path = run_import(src, out)
    except ValueError as e:  # ImportFailed
        _fail(e)
    console.print(f"[bold green]imported:[/] {path}  ({time.perf_counter() - started:.1f} s)", soft_wrap=True)


if __name__ == "__main__":
    app()
