"""The `intgen` command line."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from intgen import __version__
from intgen.errors import UserError

if TYPE_CHECKING:
    from intgen.config import RunConfig

app = typer.Typer(
    help="Build intervention (InT) datasets for LLM math reasoning.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
errors = Console(stderr=True, soft_wrap=True)  # error messages stay on one copyable line


def _version(value: bool) -> None:
    if value:
        console.print(f"intgen {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = None,
) -> None:
    """Build intervention (InT) datasets for LLM math reasoning."""
    import logging

    from rich.logging import RichHandler

    handler = RichHandler(console=errors, show_time=False, show_path=False, markup=False)
    logging.getLogger("intgen").handlers[:] = [handler]
    logging.getLogger("intgen").setLevel(logging.INFO)


def _fail(message: str) -> NoReturn:
    from rich.markup import escape

    errors.print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False)
    raise typer.Exit(code=2)


def _explicit(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The options the user actually gave (on the command line or through the environment)."""
    given = {}
    for name, value in values.items():
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            given[name] = value
    return given


def _saved_config(run_dir: Path, overrides: dict[str, Any]) -> "RunConfig":
    import json

    from intgen.config import from_saved, resolve

    path = run_dir / "config.json"
    if not path.is_file():
        _fail(f"{run_dir}: no config.json; start the run with `intgen sample` or `intgen build-dataset`")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        _fail(f"{path}: unreadable ({exc}); fix or delete it and pass the settings again")
    try:
        return resolve(overrides, from_saved(saved).to_dict())
    except UserError as exc:
        _fail(f"{path}: {exc}" if not overrides else str(exc))


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    from intgen.dataset.card import funnel_rows

    table = Table(title=f"intgen: {run_dir}")
    table.add_column("stage")
    table.add_column("count", justify="right")
    for name, value in funnel_rows(summary):
        table.add_row(name, value)
    console.print(table)
    if summary["table1"]["conditions"]:
        from intgen.dataset.card import table1_rows, table1_selection

        conditions = Table(title="Table 1 (per problem; ratios to original-step, 95% bootstrap intervals)")
        for name in ("continue from", "solved / problems", "mean accuracy", "solved vs orig.", "accuracy vs orig."):
            conditions.add_column(name, justify="left" if name == "continue from" else "right")
        for row in table1_rows(summary["table1"]):
            conditions.add_row(*row)
        console.print(conditions)
        console.print(f"Table 1 is counted on: {table1_selection(summary['table1'])}. Which proposal stood for each "
                      f"problem: {run_dir / 'analysis.json'} (table1.units).", highlight=False, soft_wrap=True)
    dataset = run_dir / "dataset"
    if summary["kept"]:
        console.print(f"dataset: {dataset}  (datasets.load_dataset(\"{dataset}\", \"sft\"))", highlight=False,
                      soft_wrap=True)
    else:
        console.print(f"dataset: {dataset}  (the sft config is empty: no intervention was kept; the interventions "
                      f"config shows why: datasets.load_dataset(\"{dataset}\", \"interventions\"))", highlight=False,
                      soft_wrap=True)


def _run_or_fail(action: Callable[[], Any]) -> Any:
    """Run `action`; what the user can fix (a `UserError`: a setting, an input, the run directory) is one line,
    exit 2, and so is an OSError about a named path (not found, not writable, disk full). Anything else is a bug
    and keeps its traceback."""
    try:
        return action()
    except UserError as exc:
        _fail(str(exc))
    except OSError as exc:
        if exc.filename is None:
            raise
        _fail(f"{exc.filename}: {exc.strerror or exc}")


EXIT_FAILURES = 3  # the run finished, but some model calls failed: rerunning the same command retries them

RunDirOpt = Annotated[Path, typer.Option(help="Run directory (created if needed; rerunning resumes).")]
ForceOpt = Annotated[bool, typer.Option(help=(
    "Recompute a stage whose settings changed (cached model calls are reused)."))]
ProgressOpt = Annotated[bool, typer.Option(help="Show progress bars.")]


# --- the settings' options, made from their fields (intgen.config) -----------------------------------

def _option(spec: dataclasses.Field, section: str) -> tuple[Any, Any]:
    """A setting's typer annotation and default: its type (an Enum for choices, a repeatable option for a list, a
    table or a joined setting), its help and range, its flag; `--help` groups the options by section."""
    from rich.markup import escape

    from intgen.config import RunConfig
    from intgen.setting import described, kind_of

    kind, optional = kind_of(RunConfig, spec.name)
    meta = spec.metadata
    option = typer.Option(*([meta["option"]] if meta["option"] else []), help=escape(described(spec)),
                          rich_help_panel=f"{section} settings")
    choices = meta["choices"]
    if kind in ("list", "table") or meta["join"]:
        return Annotated[Optional[list[choices or str]], option], None  # type: ignore[valid-type]
    value_type = choices or {"bool": bool, "int": int, "float": float, "str": str}[kind]
    default = choices(spec.default) if choices is not None and spec.default is not None else spec.default
    return Annotated[Optional[value_type] if optional else value_type, option], default  # type: ignore[valid-type]


def settings_options(*sections: str, without: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> Callable:
    """Give a command the options of these sections' settings (less `without`, plus the settings `extra`): they
    reach it as `**settings`, each under its field's name."""
    from intgen.config import FIELDS, SECTIONS

    sections = tuple(SECTIONS) if sections == ("all",) else sections
    section_of = {f.name: name for name, section in SECTIONS.items() for f in dataclasses.fields(section)}
    names = [f.name for section in sections for f in dataclasses.fields(SECTIONS[section])]
    names = [name for name in names + list(extra) if name not in without]

    def decorate(command: Callable) -> Callable:
        hints = typing.get_type_hints(command, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(command).parameters.values() if p.kind is not p.VAR_KEYWORD]
        generated = []
        for name in names:
            annotation, default = _option(FIELDS[name], section_of[name])
            generated.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                               annotation=annotation))

        @functools.wraps(command)
        def with_settings(**values: Any) -> Any:
            return command(**values)

        parameters = own + generated
        with_settings.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        with_settings.__annotations__ = {p.name: p.annotation for p in parameters}
        return with_settings

    return decorate


def _given(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The settings the user gave on the command line (or through the environment), as RunConfig values."""
    from intgen.config import FIELDS

    given = {}
    for name, value in _explicit(ctx, {k: v for k, v in values.items() if k in FIELDS}).items():
        spec = FIELDS[name]
        if isinstance(value, list):
            value = [v.value if isinstance(v, Enum) else v for v in value]
            if spec.metadata["join"]:  # several servers: one setting, comma-separated
                value = ",".join(value) if value else None
            elif isinstance(spec.default, tuple):
                value = tuple(value)
            else:
                value = _key_values(value, spec.metadata["option"] or "--" + name.replace("_", "-"))
        elif isinstance(value, Enum):
            value = value.value
        given[name] = value
    return given


def _key_values(pairs: list[str], option: str) -> dict[str, Any]:
    from intgen.train import parse_value

    found = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            _fail(f"{option} {pair!r}: expected key=value")
        found[key.strip().replace("-", "_")] = parse_value(value)
    return found


def _exit_for(failed: dict[str, Any], what: str) -> None:
    """Exit with EXIT_FAILURES when calls failed, saying so and that a rerun retries them."""
    if failed:
        detail = "; ".join(f"{stage}: {', '.join(f'{k} {v}' for k, v in kinds.items())}"
                           for stage, kinds in failed.items())
        errors.print(f"[yellow]{what} finished with failed calls ({detail}). Run the same command again to retry "
                     f"them (answered calls come from the cache).[/yellow]", markup=True, highlight=False)
        raise typer.Exit(code=EXIT_FAILURES)


@app.command("build-dataset")
@settings_options("all")
def build_dataset(
    ctx: typer.Context,
    run_dir: RunDirOpt = Path("runs/default"),
    config: Annotated[Optional[Path], typer.Option(help=(
        "TOML file of settings (the option names); options given here win."))] = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
    report: Annotated[bool, typer.Option(help="End by writing RUN_DIR/report.html (see `intgen report`).")] = True,
    **settings: Any,
) -> None:
    """Run every stage — sample, grade, propose, verify, export — resuming whatever is already done.

    With no options: the embedded demo (20 bundled problems, the local SmolLM2 engine, no key, no GPU).
    Exit status: 0 done; 2 bad input or settings; 3 done, but some model calls failed (rerun to retry them).
    """
    from intgen.config import read_config_file, resolve
    from intgen.pipeline import build_dataset as build

    try:
        given = _given(ctx, settings)
        run_config = resolve(given, read_config_file(config) if config else {})
    except UserError as exc:
        _fail(str(exc))
    if run_config.attempts and (unused := sorted({"samples", "max_tokens", "temperature"} & set(given))):
        console.print(f"warning: {', '.join('--' + n.replace('_', '-') for n in unused)} not used: with --attempts "
                      "no attempt is sampled (the file gives each problem's attempts)", highlight=False)
    if run_config.problems is None and run_config.attempts is None:
        from intgen.config import DEMO_MINUTES

        console.print(
            f"No --problems: running the embedded demo ({run_config.limit} bundled example problems on the local "
            f"SmolLM2 engine, K={run_config.samples}, P={run_config.proposals}, M={run_config.continuations}). It "
            f"takes about {DEMO_MINUTES} minutes on 2 CPU cores (less once the run directory has its cache).",
            highlight=False,
        )
    summary = _run_or_fail(lambda: build(run_config, run_dir, force=force, progress=progress))
    _print_summary(summary, run_dir)
    if report:
        from intgen.report import write_report

        path = _run_or_fail(lambda: write_report([run_dir]))
        console.print(f"report: {path}  (open it in a browser; `intgen report` writes it again)", highlight=False,
                      soft_wrap=True)
    _exit_for(summary["failed"], "the run")


@app.command("sample")
@settings_options("problems", "backend", "sample", "run", "executor", without=("decontaminate", "decontaminate_ngram"))
def sample(ctx: typer.Context, run_dir: RunDirOpt, force: ForceOpt = False, progress: ProgressOpt = True,
           **values: Any) -> None:
    """Sample K attempts per problem into RUN_DIR/samples/ (resumable; cached calls are never sent twice)."""
    from intgen.config import resolve
    from intgen.pipeline import load_config_problems, sample_problems

    if values["problems"] is None and values["attempts"] is None:
        _fail("--problems: give the problem set to sample (a benchmark name, a file, a folder or a Hub id)")
    try:
        settings = resolve(_given(ctx, values), {})
    except UserError as exc:
        _fail(str(exc))
    loaded = _run_or_fail(lambda: load_config_problems(settings))
    entry = _in_run(run_dir, settings, lambda run, engine: sample_problems(run, settings, engine, loaded.frame, force,
                                                                          progress), "sample")
    calls, last = entry["calls"], entry["last_run"]
    console.print(
        f"samples: {entry['rows']} attempts ({entry['truncated']} truncated, "
        f"failed: {entry['failed_rows'] or 'none'}); "
        f"this run sent {last['requests_sent']} requests, {last['cache_hits']} cache hits, "
        f"{last['prompt_tokens']}+{last['completion_tokens']} tokens; total tokens "
        f"{calls['prompt_tokens']}+{calls['completion_tokens']}"
        + (f", cost ${calls['cost_usd']:.4f}" if calls["cost_usd"] is not None else ""),
        highlight=False,
    )
    _exit_for({"sample": entry["failed_rows"]} if entry["failed_rows"] else {}, "sample")


def _in_run(run_dir: Path, settings: "RunConfig", action: Callable[[Any, Any], dict[str, Any]],
            stage: str | None = None) -> dict[str, Any]:
    """Run one command in the run directory, held by this process (with the engine of the model `stage` calls, as
    the pipeline's definition says); save the settings."""
    from contextlib import nullcontext

    from intgen.pipeline import open_engine
    from intgen.plan import model_config, step
    from intgen.rundir import held

    model = step(stage).model if stage else None

    def run_it() -> dict[str, Any]:
        with held(run_dir) as run:
            with open_engine(settings, model_config(settings, model)) if model else nullcontext() as engine:
                entry = action(run, engine)
            run.write_json("config.json", settings.to_dict())
            return entry

    return _run_or_fail(run_it)


@app.command("grade")
@settings_options("grade", "executor")
def grade(ctx: typer.Context, run_dir: RunDirOpt, force: ForceOpt = False, progress: ProgressOpt = True,
          **values: Any) -> None:
    """Grade every attempt in RUN_DIR/samples/ (verdicts into graded/, pass rates into pass_rates/)."""
    from intgen.pipeline import run_named_stage

    settings = _saved_config(run_dir, _given(ctx, values))
    entry = _in_run(run_dir, settings, lambda run, _: run_named_stage(run, settings, "grade", None, force, progress),
                    "grade")
    console.print(f"graded: {entry['correct']} correct, {entry['incorrect']} incorrect, {entry['ungradable']} "
                  f"ungradable {entry['ungradable_by_reason'] or ''}; {entry['problems_selected']} problems selected",
                  highlight=False)
    _exit_for({"grade": entry["failed_rows"]} if entry["failed_rows"] else {}, "grade")


@app.command("propose")
@settings_options("proposer", "propose", "executor")
def propose(ctx: typer.Context, run_dir: RunDirOpt, force: ForceOpt = False, progress: ProgressOpt = True,
            **values: Any) -> None:
    """Propose interventions for the failed attempts (into RUN_DIR/proposals/)."""
    from intgen.pipeline import run_named_stage

    settings = _saved_config(run_dir, _given(ctx, values))
    entry = _in_run(run_dir, settings, lambda run, engine: run_named_stage(run, settings, "propose", engine, force,
                                                                          progress), "propose")
    console.print(f"proposals: {entry['rows']} for {entry['attempts']} failed attempts; accepted {entry['accepted']}; "
                  f"rejected {entry['rejected_by_reason'] or 'none'}", highlight=False)
    _exit_for({"propose": entry["failed_rows"]} if entry["failed_rows"] else {}, "propose")


@app.command("verify")
@settings_options("verify", "executor")
def verify(ctx: typer.Context, run_dir: RunDirOpt, force: ForceOpt = False, progress: ProgressOpt = True,
           **values: Any) -> None:
    """Continue each accepted intervention M times and keep the ones that lead to the answer."""
    from intgen.dataset.card import table1_rows, table1_selection
    from intgen.pipeline import run_named_stage

    settings = _saved_config(run_dir, _given(ctx, values))
    entry = _in_run(run_dir, settings, lambda run, engine: run_named_stage(run, settings, "verify", engine, force,
                                                                          progress), "verify")
    for name, solved, accuracy, solved_ratio, accuracy_ratio in table1_rows(entry["table1"]):
        versus = f", vs original-step {solved_ratio} solved, {accuracy_ratio} accuracy" if solved_ratio else ""
        console.print(f"{name}: {solved} problems solved at least once, mean accuracy {accuracy}{versus}",
                      highlight=False)
    if entry["table1"]["conditions"]:
        console.print(f"(Table 1 counted on: {table1_selection(entry['table1'])})", highlight=False, soft_wrap=True)
    console.print(f"verified: {entry['verified']} (accepted {entry['accepted']}, not verified "
                  f"{entry['not_verified']}); kept: {entry['kept']}", highlight=False)
    _exit_for({"verify": entry["failed_rows"]} if entry["failed_rows"] else {}, "verify")


@app.command("export")
@settings_options("dataset")
def export(ctx: typer.Context, run_dir: RunDirOpt, **values: Any) -> None:
    """Write RUN_DIR/dataset/ (parquet per config and a README.md dataset card)."""
    from intgen.dataset.export import export as write

    settings = _saved_config(run_dir, _given(ctx, values))
    summary = _in_run(run_dir, settings, lambda run, _: write(run, settings))
    _print_summary(summary, run_dir)


@app.command("push")
def push(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with an exported dataset.")],
    repo_id: Annotated[str, typer.Argument(help="Hub dataset repo, e.g. me/my-int-data.")],
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Branch to push to (created if needed).")] = None,
    endpoint: Annotated[Optional[str], typer.Option(help=(
        "Hub endpoint (default: $HF_ENDPOINT or huggingface.co)."))] = None,
    report: Annotated[bool, typer.Option(help="Put the run's HTML report beside the dataset (report.html).")] = True,
) -> None:
    """Upload RUN_DIR/dataset to the Hub: the card, each config's parquet file and the HTML report, in one commit
    (token from $HF_TOKEN or `hf auth login`; never printed). The local card is changed only after a successful
    upload."""
    from intgen.dataset.card import card_text
    from intgen.dataset.export import funnel, require_current_export
    from intgen.hub import push_dataset
    from intgen.report import write_report
    from intgen.rundir import atomic_write_text

    settings = _saved_config(run_dir, {})

    def upload(run: Any, _: Any) -> str:
        if not (run.path / "dataset" / "README.md").is_file():
            raise UserError(f"{run.path / 'dataset'}: no exported dataset (run `intgen export` first)")
        require_current_export(run, "pushing")
        card = card_text(run, settings, funnel(run), repo_id)  # the card's examples load the repo
        page = write_report([run.path]) if report else None  # written again: it shows the run as pushed
        url = push_dataset(run.path / "dataset", repo_id, card, private=private, revision=revision,
                           endpoint=endpoint, report=page)
        atomic_write_text(run.path / "dataset" / "README.md", card)
        return url

    url = _in_run(run_dir, settings, upload)
    console.print(f"pushed {run_dir / 'dataset'} to {repo_id}: {url}", highlight=False)


@app.command("report")
def report_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help=(
        "A dataset run directory, or one or more eval run directories."))],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help=(
        "Where to write (default: RUN_DIR/report.html)."))] = None,
) -> None:
    """Write one self-contained HTML file to look at a run in any browser, offline: for a dataset run the
    settings, funnel, Table 1, distributions and a trace viewer of every proposal; for eval runs pass@k curves,
    per-problem accuracy and, for two or more, the comparison."""
    from intgen.report import write_report

    path = _run_or_fail(lambda: write_report(run_dirs, out))
    console.print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB)", highlight=False, soft_wrap=True)


# --- measuring: intgen eval, intgen eval compare, intgen eval-localize ---------------------------------

class Protocol(str, Enum):
    intgen = "intgen"  # the options as given (defaults: RunConfig's)
    paper = "paper"  # the paper's Table 4: 128 rollouts, 16,384 tokens, T 0.7, top_p 0.8, top_k 20


eval_app = typer.Typer(help="Measure a model on a benchmark: avg@K, pass@k, maj@K (and `eval compare`).")
app.add_typer(eval_app, name="eval")


@eval_app.callback(invoke_without_command=True)
@settings_options("problems", "backend", "sample", "grade", "run", "executor",
                  without=("solution_column", "decontaminate", "decontaminate_ngram", "hard_only", "hard_threshold",
                           "attempts", "attempt_column"))
def eval_run(
    ctx: typer.Context,
    run_dir: RunDirOpt = Path("runs/eval"),
    protocol: Annotated[Protocol, typer.Option(help=(
        "paper: K=128, 16,384 tokens, T 0.7, top_p 0.8, top_k 20 (options given here still win)."))] = Protocol.intgen,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
    **values: Any,
) -> None:
    """Sample K attempts per problem with the dataset's solve prompt and grade them (the pipeline's sample and
    grade stages: cached, resumable); write RUN_DIR/eval.json and print avg@K, pass@k, maj@K with 95% intervals."""
    if ctx.invoked_subcommand is not None:
        return
    from intgen.config import resolve
    from intgen.evals.metrics import PAPER_PROTOCOL
    from intgen.pipeline import run_eval

    problems = values["problems"]
    if problems is None:
        _fail("--problems: name a benchmark (math500, gsm8k, aime24, amc23, imo-answerbench) or give a file")
    given = _given(ctx, values)
    try:
        settings = resolve((PAPER_PROTOCOL if protocol is Protocol.paper else {}) | given, {})
    except UserError as exc:
        _fail(str(exc))
    prompt = _run_or_fail(lambda: settings.prompt("solve"))
    console.print(
        f"eval {problems}: {settings.backend} {settings.model or 'SmolLM2-135M-Instruct (bundled)'}; protocol "
        f"{protocol.value}: K={settings.samples}, max tokens {settings.max_tokens}, T {settings.temperature}, top_p "
        f"{settings.top_p}, top_k {settings.top_k}, seed {settings.seed}; prompt {Path(prompt.name).name} (sha256 "
        f"{prompt.sha256[:12]})", highlight=False, markup=False)
    report = _run_or_fail(lambda: run_eval(settings, run_dir, force=force, progress=progress))
    _print_eval(report, settings.samples)
    console.print(f"written: {run_dir / 'eval.json'} (graded attempts: {run_dir / 'graded'})", highlight=False)
    _exit_for({"sample": report["failed_calls"]} if report["failed_calls"] else {}, "eval")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _print_eval(report: dict[str, Any], samples: int) -> None:
    from intgen.evals.metrics import ks

    keys = [f"avg@{samples}", *(f"pass@{k}" for k in ks(samples)), f"maj@{samples}", "ungradable", "truncated"]
    groups = {"all": report} | (report["by_source"] if len(report["by_source"]) > 1 else {})
    table = Table(title=f"{report['problems']} problems (95% bootstrap intervals over problems)")
    table.add_column("metric")
    for name in groups:
        table.add_column(name, justify="right")
    for key in keys:
        cells = []
        for group in groups.values():
            low, high = group["ci95"].get(key, (None, None))
            interval = f" [{_percent(low)}, {_percent(high)}]" if low is not None else ""
            cells.append(_percent(group.get(key)) + interval)
        table.add_row(key, *cells)
    console.print(table)
    for row in report.get("skipped_problem_rows", []):
        console.print(f"skipped {row}", highlight=False, markup=False)
    if report.get("failed_calls"):
        failed = ", ".join(f"{kind} {count}" for kind, count in report["failed_calls"].items())
        unanswered = report.get("unanswered_problems") or []
        which = f": {', '.join(unanswered[:10])}" if unanswered else ""
        console.print(f"failed calls ({failed}) are left out of every metric; {len(unanswered)} problem(s) had no "
                      f"answered attempt and are not scored{which}", highlight=False, markup=False)


@eval_app.command("compare")
def eval_compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Eval run directories; the first is the baseline.")],
) -> None:
    """The runs side by side on the problems they share: avg@K, the difference to the first with a paired
    bootstrap interval, and the problems solved (>= 1 correct) by one and not the other."""
    from intgen.evals.metrics import compare
    from intgen.rundir import RunDir

    if len(run_dirs) < 2:
        _fail("eval compare: give at least two eval run directories")
    tables = {}
    for index, path in enumerate(run_dirs):
        name = path.name if path.name not in tables else f"{path.name}#{index + 1}"
        if not (path / "eval.json").is_file():
            _fail(f"{path}: no eval.json; run `intgen eval --run-dir {path}` first")
        tables[name] = _run_or_fail(lambda: RunDir(path).table("graded"))
    result = compare(tables)
    base = next(iter(tables))
    table = Table(title=f"{result['problems']} shared problems; differences to {base} (95% paired bootstrap)")
    for column in ("run", "avg accuracy", "difference", "solved only here", f"solved only by {base}"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, entry in result["runs"].items():
        low, high = entry.get("difference_ci95", (None, None))
        difference = ("" if low is None
                      else f"{100 * entry['difference']:+.2f} pts [{100 * low:+.2f}, {100 * high:+.2f}]")
        table.add_row(name, _percent(entry["avg"]), difference,
                      str(len(entry.get("solved_only_here", []))) if low is not None else "",
                      str(len(entry.get(f"solved_only_by_{base}", []))) if low is not None else "")
    console.print(table)
    for name, entry in result["runs"].items():
        if entry["unanswered"]:
            console.print(f"{name} did not answer {len(entry['unanswered'])} problem(s), left out of the comparison: "
                          f"{', '.join(entry['unanswered'][:10])}", highlight=False, markup=False)
        if entry.get("solved_only_here"):
            console.print(f"solved only by {name}: {', '.join(entry['solved_only_here'])}", highlight=False,
                          markup=False)
        if entry.get(f"solved_only_by_{base}"):
            console.print(f"solved by {base}, not by {name}: {', '.join(entry[f'solved_only_by_{base}'])}",
                          highlight=False, markup=False)


@app.command("eval-localize")
@settings_options("backend", without=("continuation",), extra=("seed", "batch_size"))
def eval_localize(
    ctx: typer.Context,
    problems: Annotated[Optional[list[Path]], typer.Option("--problems", help=(
        "ProcessBench subset file(s): a JSON list or JSON lines of {id, problem, steps, label, ...}, or the "
        "shipped processbench-gsm8k (repeatable: one subset each)."))] = None,
    run_dir: RunDirOpt = Path("runs/localize"),
    critic_prompt: Annotated[str, typer.Option(help=(
        "intgen (the proposer's critique prompt, no reference solution), processbench (ProcessBench's protocol: "
        "paragraphs from 0, the index in \\boxed{}), or your own file with the markers of one of them."))] = "intgen",
    max_tokens: Annotated[int, typer.Option(help="Token limit per reply.")] = 16384,
    temperature: Annotated[Optional[float], typer.Option(help=(
        "Default: 0 (greedy, ProcessBench's protocol); 0.7 with --vote > 1."))] = None,
    vote: Annotated[int, typer.Option(help=(
        "Samples per item; the prediction is their majority (ProcessBench uses 8)."))] = 1,
    structured: Annotated[bool, typer.Option(help=(
        "intgen prompt: constrain the reply by the proposer's JSON schema where the backend can."))] = True,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N items of each file.")] = None,
    score_run: Annotated[Optional[Path], typer.Option(help=(
        "Instead of asking a model: score this run's own proposals against --labels."))] = None,
    labels: Annotated[Optional[Path], typer.Option(help=(
        "With --score-run: JSON (lines) of {attempt_id, label}, label the 0-based first wrong step of intgen's "
        "step split, -1 for none."))] = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
    **values: Any,
) -> None:
    """How well does the proposer find the first wrong step? ProcessBench's metric (per subset: accuracy on
    erroneous and on correct items, their harmonic mean F1; the mean F1 over subsets) into RUN_DIR/localize.json,
    one row per item into RUN_DIR/localize.parquet. Resumable: a rerun sends nothing twice."""
    from intgen.pipeline import run_localize, score_proposals

    if score_run is not None or labels is not None:
        if score_run is None or labels is None:
            _fail("--score-run and --labels go together: a run directory and the labels of its attempts")
        from intgen.evals.localize import read_labels

        label_rows = _run_or_fail(lambda: read_labels(labels))
        report = _run_or_fail(lambda: score_proposals(score_run, label_rows, run_dir))
        _print_localize(report)
        return
    if not problems:
        _fail("--problems: give a ProcessBench subset file, or the shipped processbench-gsm8k")
    config, settings = _localize_settings(ctx, values, {"critic_prompt": critic_prompt, "max_tokens": max_tokens,
                                                        "temperature": temperature, "vote": vote,
                                                        "structured": structured, "problems": problems})
    items = _run_or_fail(lambda: _read_items(problems, limit))
    s = settings.sampling
    console.print(
        f"eval-localize {', '.join(map(str, problems))} ({items.height} items): {config.backend} "
        f"{config.model or 'SmolLM2-135M-Instruct (bundled)'}; critic prompt {Path(settings.prompt.name).name} (sha256 "
        f"{settings.prompt.sha256[:12]}), T {s.temperature}{' (greedy)' if s.temperature == 0 else ''}, max tokens "
        f"{s.max_tokens}, vote {settings.vote}", highlight=False, markup=False)
    report = _run_or_fail(lambda: run_localize(items, settings, config.policy_backend(), run_dir,
                                               config.batch_size, force, progress))
    _print_localize(report)
    console.print(f"written: {run_dir / 'localize.json'}, {run_dir / 'localize.parquet'}", highlight=False)


def _read_items(paths: list[Path], limit: int | None) -> Any:
    from intgen.benchmarks import resolve_localize_set
    from intgen.evals.localize import read_item_files

    items = read_item_files([resolve_localize_set(path) for path in paths])
    return items if limit is None else items.group_by("subset", maintain_order=True).head(limit).select(items.columns)


def _localize_settings(ctx: typer.Context, settings: dict[str, Any], values: dict[str, Any]
                       ) -> tuple["RunConfig", Any]:
    """The backend's settings (checked as a run's are) and the localize stage's (`values`: its own options)."""
    from intgen.config import resolve
    from intgen.evals.localize import LocalizeSettings, critic_kind
    from intgen.resources import load_prompt

    given = _given(ctx, settings)
    vote, temperature = values["vote"], values["temperature"]
    if vote < 1:
        _fail(f"--vote: must be at least 1, got {vote}")
    try:
        config = resolve(given | {"problems": str(values["problems"][0])}, {})
        name = values["critic_prompt"]
        shipped = {"intgen": "localize_intgen.md", "processbench": "localize_processbench.md"}
        prompt = load_prompt(shipped.get(name, name))
        greedy_or_voting = 0.0 if vote == 1 else 0.7
        sampling = config.sampling(values["max_tokens"], temperature if temperature is not None else greedy_or_voting)
        localize = LocalizeSettings(critic_kind(prompt), prompt, sampling, vote, values["structured"])
    except UserError as exc:
        _fail(str(exc))
    return config, localize


def _print_localize(report: dict[str, Any]) -> None:
    table = Table(title="ProcessBench metric (unparseable replies count as wrong; failed calls are left out)")
    for column in ("subset", "items", "erroneous acc.", "correct acc.", "F1", "unparseable", "left out"):
        table.add_column(column, justify="left" if column == "subset" else "right")
    for name, row in report["subsets"].items():
        table.add_row(name, str(row["items"]), f"{_percent(row['error_acc'])} of {row['erroneous']}",
                      f"{_percent(row['correct_acc'])} of {row['correct']}", _percent(row["f1"]),
                      str(row["unparseable"]), str(row.get("left_out", 0)))
    console.print(table)
    console.print(f"mean F1 over {len(report['subsets'])} subset(s): {_percent(report['mean_f1'])}", highlight=False)


train_app = typer.Typer(help=(
    "The bundled TRL recipe: SFT on the sft config, then GRPO on the rl config; DPO on the preference config, a "
    "process reward model on the prm config."), no_args_is_help=True)
app.add_typer(train_app, name="train")

DatasetArg = Annotated[str, typer.Option(help="Exported dataset: RUN_DIR/dataset or a Hub repo id.")]
OutputOpt = Annotated[Path, typer.Option(help="Where the trained model is written.")]
TrainModelOpt = Annotated[Optional[str], typer.Option(help=(
    "Model folder, Hub id or .gguf file (default: the bundled SmolLM2-135M-Instruct, dequantised)."))]
TrlConfigOpt = Annotated[Optional[Path], typer.Option(help=(
    "TRL settings file (YAML/JSON/TOML), passed to SFTConfig/GRPOConfig/DPOConfig/PRMConfig."))]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help=(
    "One TRL setting, key=value (repeatable), e.g. --set learning_rate=1e-5."))]


def _train(
    kind: str, dataset: str, output_dir: Path, model: str | None, trl_config: Path | None, settings: list[str] | None,
    lenient: bool = False,
) -> None:
    from intgen import train

    overrides = _run_or_fail(lambda: train.read_overrides(trl_config, settings or []))
    if kind in ("sft", "dpo", "prm"):
        run = {"sft": train.train_sft, "dpo": train.train_dpo, "prm": train.train_prm}[kind]
        history = _run_or_fail(lambda: run(dataset, output_dir, model, overrides))
    else:
        history = _run_or_fail(lambda: train.train_grpo(dataset, output_dir, model, overrides, lenient))
    if history and "dropped_rows" in history[0]:
        note = history.pop(0)
        console.print(f"{kind} rows: {note['rows']}, longest {note['longest_tokens']} tokens, max_length "
                      f"{note['max_length']}, dropped as longer: {note['dropped_rows']} (rows are never cut)",
                      highlight=False)
    losses = [row["loss"] for row in history if isinstance(row.get("loss"), (int, float))]
    rewards = [row["reward"] for row in history if isinstance(row.get("reward"), (int, float))]
    summary = f"{kind}: {len(losses)} logged steps"
    if losses:
        summary += f", loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    if rewards:
        summary += f", mean reward {sum(rewards) / len(rewards):.3f}"
    margins = [row["rewards/margins"] for row in history if isinstance(row.get("rewards/margins"), (int, float))]
    if margins:
        summary += f", reward margin {margins[0]:.4f} -> {margins[-1]:.4f}"
    console.print(f"{summary}; model saved to {output_dir}", highlight=False)


@train_app.command("sft")
def train_sft(
    dataset: DatasetArg,
    output_dir: OutputOpt = Path("runs/sft-model"),
    model: TrainModelOpt = None,
    trl_config: TrlConfigOpt = None,
    settings: SetOpt = None,
) -> None:
    """TRL SFTTrainer on the sft config (loss on the completion only; paper defaults: lr 1e-6, 4 epochs, cosine,
    warm-up 0.1)."""
    _train("sft", dataset, output_dir, model, trl_config, settings)


@train_app.command("grpo")
def train_grpo(
    dataset: DatasetArg,
    output_dir: OutputOpt = Path("runs/grpo-model"),
    model: TrainModelOpt = None,
    trl_config: TrlConfigOpt = None,
    settings: SetOpt = None,
    lenient_answers: Annotated[bool, typer.Option(help=(
        "Reward answers stated without \\boxed{} too (small models)."))] = False,
) -> None:
    """TRL GRPOTrainer on the rl config with the math-verify reward (paper defaults: 8 generations, no KL, lr 1e-6)."""
    _train("grpo", dataset, output_dir, model, trl_config, settings, lenient_answers)


@train_app.command("dpo")
def train_dpo(
    dataset: DatasetArg,
    output_dir: OutputOpt = Path("runs/dpo-model"),
    model: TrainModelOpt = None,
    trl_config: TrlConfigOpt = None,
    settings: SetOpt = None,
) -> None:
    """TRL DPOTrainer on the preference config: the intervention over the original step, both continuing the
    assistant's turn (Step-DPO defaults: beta 0.4, lr 5e-7, cosine, warm-up 0.1, 128 pairs a step, 4 epochs)."""
    _train("dpo", dataset, output_dir, model, trl_config, settings)


@train_app.command("prm")
def train_prm(
    dataset: DatasetArg,
    output_dir: OutputOpt = Path("runs/prm-model"),
    model: TrainModelOpt = None,
    trl_config: TrlConfigOpt = None,
    settings: SetOpt = None,
) -> None:
    """TRL PRMTrainer on the prm config (a process reward model), where the installed TRL has one (0.13 to 1.13)."""
    _train("prm", dataset, output_dir, model, trl_config, settings)


@app.command("problems")
@settings_options("problems", without=("problems", "decontaminate", "decontaminate_ngram", "attempts",
                                       "attempt_column"))
def problems(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help=(
        "A benchmark name, a .jsonl/.json/.parquet/.csv file, a dataset folder or a Hub dataset id."))],
    out: Annotated[Optional[Path], typer.Option(help=(
        "Write the loaded problems to this .parquet or .jsonl file."))] = None,
    **values: Any,
) -> None:
    """Load a problem set, report what was found (and skipped), optionally save it normalised."""
    from intgen.config import resolve
    from intgen.pipeline import load_config_problems

    try:
        settings = resolve(_given(ctx, values) | {"problems": source}, {})
    except UserError as exc:
        _fail(str(exc))
    result = _run_or_fail(lambda: load_config_problems(settings))
    frame = result.frame
    table = Table(title=f"problems from {source}")
    for name in ("problems", "with reference solution", "skipped rows", "duplicates dropped"):
        table.add_column(name, justify="right")
    table.add_row(
        str(frame.height), str(frame["solution"].is_not_null().sum()), str(len(result.skipped)), str(result.duplicates)
    )
    console.print(table)
    for row in result.skipped:
        console.print(f"skipped {row}", highlight=False, markup=False)
    if out is not None:
        if not out.parent.is_dir():
            _fail(f"{out}: cannot write it: the folder {out.parent} does not exist")
        try:
            frame.write_parquet(out) if out.suffix == ".parquet" else frame.write_ndjson(out)
        except OSError as exc:
            _fail(f"{out}: cannot write it ({exc.strerror or exc})")
        console.print(f"wrote {out}")
