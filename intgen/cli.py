"""The `intgen` command line."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from intgen import __version__
from intgen.backends import BackendKind
from intgen.config import DEFAULTS, ContinuationMode, ProposeStyle, StructuredOutput
from intgen.stages.verify import Condition

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


def _fail(message: str) -> NoReturn:
    errors.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
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
    except (TypeError, ValueError) as exc:
        _fail(f"{path}: {exc}" if not overrides else str(exc))


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    from intgen.stages.export import funnel_rows

    table = Table(title=f"intgen: {run_dir}")
    table.add_column("stage")
    table.add_column("count", justify="right")
    for name, value in funnel_rows(summary):
        table.add_row(name, value)
    console.print(table)
    if summary["table1"]["conditions"]:
        from intgen.stages.export import table1_rows

        conditions = Table(title="Table 1 (per problem; ratios to original-step, 95% bootstrap intervals)")
        for name in ("continue from", "solved / problems", "mean accuracy", "solved vs orig.", "accuracy vs orig."):
            conditions.add_column(name, justify="left" if name == "continue from" else "right")
        for row in table1_rows(summary["table1"]):
            conditions.add_row(*row)
        console.print(conditions)
    dataset = run_dir / "dataset"
    if summary["kept"]:
        console.print(f"dataset: {dataset}  (datasets.load_dataset(\"{dataset}\", \"sft\"))", highlight=False,
                      soft_wrap=True)
    else:
        console.print(f"dataset: {dataset}  (the sft config is empty: no intervention was kept; the interventions "
                      f"config shows why: datasets.load_dataset(\"{dataset}\", \"interventions\"))", highlight=False,
                      soft_wrap=True)


def _run_or_fail(action: Callable[[], Any]) -> Any:
    from intgen.io import BadInputError
    from intgen.driver import StageConfigChanged

    try:
        return action()
    except (BadInputError, StageConfigChanged, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


D = DEFAULTS  # every option's default comes from RunConfig
EXIT_BAD_INPUT = 2  # a bad setting, file or run directory: nothing was done
EXIT_FAILURES = 3  # the run finished, but some model calls failed: rerunning the same command retries them

BackendOpt = Annotated[BackendKind, typer.Option("--backend", help="Model engine.")]
ModelOpt = Annotated[Optional[str], typer.Option(help="Model name (local: a GGUF path; default: bundled SmolLM2-135M-Instruct).")]
BaseUrlOpt = Annotated[Optional[str], typer.Option(help="Server URL (openai: e.g. http://127.0.0.1:8000/v1; gemini: API endpoint).")]
ApiKeyEnvOpt = Annotated[Optional[str], typer.Option(help="Environment variable holding the API key (default OPENAI_API_KEY / GEMINI_API_KEY).")]
ConcurrencyOpt = Annotated[int, typer.Option(help="Requests in flight at once (openai, gemini).")]
RequestTimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for one try of a request (openai, gemini).")]
MaxTriesOpt = Annotated[int, typer.Option(help="Tries per request before its failure is recorded (a rerun tries again).")]
StructuredOpt = Annotated[StructuredOutput, typer.Option(help="openai: how to send a JSON schema: json_schema (OpenAI, vLLM, SGLang), json_object (llama-cpp-python), none.")]
ContinuationOpt = Annotated[ContinuationMode, typer.Option(help="openai: how to continue an assistant message: chat (vLLM continue_final_message) or completions (client-side chat template).")]
ChatTemplateOpt = Annotated[Optional[str], typer.Option(help="openai + completions: chat template file, .gguf file or tokenizer name (also counts tokens per sample).")]
ThinkingOpt = Annotated[Optional[int], typer.Option(help="gemini: thinking budget in tokens.")]
MaxModelLenOpt = Annotated[Optional[int], typer.Option(help="The model's context in tokens, where the server does not report it (continuations are cut to fit).")]
VllmArgOpt = Annotated[Optional[list[str]], typer.Option("--vllm-arg", help="vllm backend: one engine argument, key=value (repeatable), e.g. --vllm-arg tensor_parallel_size=2.")]
ProposerBackendOpt = Annotated[Optional[BackendKind], typer.Option(help="Proposer engine (default: the policy's; self-proposed).")]
ProposerModelOpt = Annotated[Optional[str], typer.Option(help="Proposer model (default: the policy model).")]
ProposerUrlOpt = Annotated[Optional[str], typer.Option(help="Proposer server URL.")]
ProblemColumnOpt = Annotated[Optional[str], typer.Option(help="Column holding the problem text (default: problem, question, ...).")]
AnswerColumnOpt = Annotated[Optional[str], typer.Option(help="Column holding the final answer (default: answer, ...).")]
SolutionColumnOpt = Annotated[Optional[str], typer.Option(help="Column holding the reference solution (default: reference_solution, then solution).")]
SplitOpt = Annotated[Optional[str], typer.Option(help="Split of a dataset folder or Hub dataset (default: its only split).")]
SubsetOpt = Annotated[Optional[str], typer.Option(help="Config (subset) of a Hub dataset.")]
SamplesOpt = Annotated[int, typer.Option(help="Attempts per problem (K).")]
MaxTokensOpt = Annotated[int, typer.Option(help="Token limit per attempt.")]
TemperatureOpt = Annotated[float, typer.Option()]
TopPOpt = Annotated[float, typer.Option()]
TopKOpt = Annotated[int, typer.Option(help="0 disables top-k.")]
SeedOpt = Annotated[int, typer.Option(help="Sampling seed: the same config and seed give the same dataset.")]
LimitOpt = Annotated[Optional[int], typer.Option(help="Use only the first N problems.")]
HardOnlyOpt = Annotated[bool, typer.Option(help="Propose only for problems whose pass rate is at most --hard-threshold.")]
HardThresholdOpt = Annotated[float, typer.Option(help="Pass-rate ceiling for --hard-only.")]
ProposalsOpt = Annotated[int, typer.Option(help="Proposals per failed attempt (P).")]
ProposeStyleOpt = Annotated[ProposeStyle, typer.Option(help="two-turn (the paper's: solve with the reference, then critique) or single-turn.")]
ProposeMaxTokensOpt = Annotated[int, typer.Option(help="Token limit per proposal.")]
ProposeTemperatureOpt = Annotated[float, typer.Option()]
StructuredProposalsOpt = Annotated[bool, typer.Option(help="Constrain proposals by a JSON schema where the backend can.")]
IncludeTruncatedOpt = Annotated[bool, typer.Option(help="Also propose for attempts cut off by max tokens.")]
AllowNoReferenceOpt = Annotated[bool, typer.Option(help="Propose for problems without a reference solution (the prompt then says only the final answer is known).")]
ContinuationsOpt = Annotated[int, typer.Option(help="Continuations per intervention (M).")]
VerifyMaxTokensOpt = Annotated[int, typer.Option(help="Token limit per continuation.")]
VerifyTemperatureOpt = Annotated[float, typer.Option()]
MinSuccessOpt = Annotated[int, typer.Option(help="Keep an intervention with at least this many correct continuations.")]
ConditionOpt = Annotated[Optional[list[Condition]], typer.Option("--condition", help="Verify conditions (repeatable): intervention, original-step, resample-step, problem-only.")]
SystemPromptOpt = Annotated[Optional[str], typer.Option(help="System prompt for the policy (same in sampling, SFT and RL).")]
SolvePromptOpt = Annotated[str, typer.Option(help="The policy's prompt (sample, verify, SFT and RL): a shipped file name or your own file with {{problem}}.")]
ReferencePromptOpt = Annotated[str, typer.Option(help="Turn 1 of the two-turn proposer prompt (solve guided by the reference): a shipped file name or your own file.")]
CritiquePromptOpt = Annotated[Optional[str], typer.Option(help="Turn 2 of the two-turn proposer prompt, or the single-turn prompt: a shipped file name or your own file. [default: propose_critique.md / propose_single.md]")]
GradeWorkersOpt = Annotated[int, typer.Option(help="Grading worker processes.")]
GradeTimeoutOpt = Annotated[float, typer.Option(help="Seconds of grading work per answer at most.")]
LenientOpt = Annotated[bool, typer.Option(help="Grade a response without \\boxed{} by the answer it states (for small models).")]
BatchSizeOpt = Annotated[int, typer.Option(help="Problems per batch (one parquet part each).")]
PricesOpt = Annotated[Optional[Path], typer.Option(help="Price table (TOML/JSON) to report cost.")]
SkipBadRowsOpt = Annotated[bool, typer.Option(help="Skip malformed problem rows (each is reported).")]
RunDirOpt = Annotated[Path, typer.Option(help="Run directory (created if needed; rerunning resumes).")]
ForceOpt = Annotated[bool, typer.Option(help="Recompute a stage whose settings changed (cached model calls are reused).")]
ProgressOpt = Annotated[bool, typer.Option(help="Show progress bars.")]

NOT_SETTINGS = ("ctx", "config", "run_dir", "force", "progress")


def _given(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The settings the user gave on the command line, as RunConfig values."""
    given = _explicit(ctx, {k: v for k, v in values.items() if k not in NOT_SETTINGS})
    for key, value in list(given.items()):
        if isinstance(value, Enum):
            given[key] = value.value
        elif isinstance(value, Path):
            given[key] = str(value)
    if "condition" in given:
        given["conditions"] = tuple(c.value if isinstance(c, Enum) else c for c in given.pop("condition"))
    if "vllm_arg" in given:
        given["vllm_args"] = _key_values(given.pop("vllm_arg"), "--vllm-arg")
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
        detail = "; ".join(f"{stage}: {', '.join(f'{k} {v}' for k, v in kinds.items())}" for stage, kinds in failed.items())
        errors.print(f"[yellow]{what} finished with failed calls ({detail}). Run the same command again to retry "
                     f"them (answered calls come from the cache).[/yellow]", markup=True, highlight=False)
        raise typer.Exit(code=EXIT_FAILURES)


@app.command("build-dataset")
def build_dataset(
    ctx: typer.Context,
    problems: Annotated[Optional[str], typer.Option(help="Problem set: a file, a dataset folder or a Hub id. Default: the 20 bundled examples (and the demo sizes).")] = None,
    run_dir: RunDirOpt = Path("runs/default"),
    config: Annotated[Optional[Path], typer.Option(help="TOML file of settings (the option names); options given here win.")] = None,
    problem_column: ProblemColumnOpt = None,
    answer_column: AnswerColumnOpt = None,
    solution_column: SolutionColumnOpt = None,
    split: SplitOpt = None,
    subset: SubsetOpt = None,
    backend: BackendOpt = BackendKind(D.backend),
    model: ModelOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    concurrency: ConcurrencyOpt = D.concurrency,
    request_timeout: RequestTimeoutOpt = D.request_timeout,
    max_tries: MaxTriesOpt = D.max_tries,
    structured_output: StructuredOpt = StructuredOutput(D.structured_output),
    continuation: ContinuationOpt = ContinuationMode(D.continuation),
    chat_template: ChatTemplateOpt = None,
    thinking_budget: ThinkingOpt = None,
    max_model_len: MaxModelLenOpt = None,
    vllm_arg: VllmArgOpt = None,
    proposer_backend: ProposerBackendOpt = None,
    proposer_model: ProposerModelOpt = None,
    proposer_base_url: ProposerUrlOpt = None,
    samples: SamplesOpt = D.samples,
    max_tokens: MaxTokensOpt = D.max_tokens,
    temperature: TemperatureOpt = D.temperature,
    top_p: TopPOpt = D.top_p,
    top_k: TopKOpt = D.top_k,
    seed: SeedOpt = D.seed,
    limit: LimitOpt = None,
    hard_only: HardOnlyOpt = D.hard_only,
    hard_threshold: HardThresholdOpt = D.hard_threshold,
    proposals: ProposalsOpt = D.proposals,
    propose_style: ProposeStyleOpt = ProposeStyle(D.propose_style),
    propose_max_tokens: ProposeMaxTokensOpt = D.propose_max_tokens,
    propose_temperature: ProposeTemperatureOpt = D.propose_temperature,
    structured: StructuredProposalsOpt = D.structured,
    include_truncated: IncludeTruncatedOpt = D.include_truncated,
    allow_no_reference: AllowNoReferenceOpt = D.allow_no_reference,
    continuations: ContinuationsOpt = D.continuations,
    verify_max_tokens: VerifyMaxTokensOpt = D.verify_max_tokens,
    verify_temperature: VerifyTemperatureOpt = D.verify_temperature,
    min_success: MinSuccessOpt = D.min_success,
    condition: ConditionOpt = None,
    system_prompt: SystemPromptOpt = None,
    solve_prompt: SolvePromptOpt = D.solve_prompt,
    reference_prompt: ReferencePromptOpt = D.reference_prompt,
    critique_prompt: CritiquePromptOpt = None,
    grade_workers: GradeWorkersOpt = D.grade_workers,
    grade_timeout: GradeTimeoutOpt = D.grade_timeout,
    lenient_answers: LenientOpt = D.lenient_answers,
    batch_size: BatchSizeOpt = D.batch_size,
    prices: PricesOpt = None,
    skip_bad_rows: SkipBadRowsOpt = D.skip_bad_rows,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Run every stage — sample, grade, propose, verify, export — resuming whatever is already done.

    With no options: the embedded demo (20 bundled problems, the local SmolLM2 engine, no key, no GPU).
    Exit status: 0 done; 2 bad input or settings; 3 done, but some model calls failed (rerun to retry them).
    """
    from intgen.config import read_config_file, resolve
    from intgen.pipeline import build_dataset as build

    try:
        settings = resolve(_given(ctx, dict(locals())), read_config_file(config) if config else {})
    except (TypeError, ValueError) as exc:
        _fail(str(exc))
    if settings.problems is None:
        console.print(
            "No --problems: running the embedded demo (20 bundled example problems on the local SmolLM2 engine, "
            f"K={settings.samples}, P={settings.proposals}, M={settings.continuations}).", highlight=False,
        )
    summary = _run_or_fail(lambda: build(settings, run_dir, force=force, progress=progress))
    _print_summary(summary, run_dir)
    _exit_for(summary["failed"], "the run")


@app.command("sample")
def sample(
    ctx: typer.Context,
    problems: Annotated[str, typer.Option(help="Problem set: a file, a dataset folder or a Hub dataset id.")],
    run_dir: RunDirOpt,
    problem_column: ProblemColumnOpt = None,
    answer_column: AnswerColumnOpt = None,
    solution_column: SolutionColumnOpt = None,
    split: SplitOpt = None,
    subset: SubsetOpt = None,
    backend: BackendOpt = BackendKind(D.backend),
    model: ModelOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    concurrency: ConcurrencyOpt = D.concurrency,
    request_timeout: RequestTimeoutOpt = D.request_timeout,
    max_tries: MaxTriesOpt = D.max_tries,
    structured_output: StructuredOpt = StructuredOutput(D.structured_output),
    continuation: ContinuationOpt = ContinuationMode(D.continuation),
    chat_template: ChatTemplateOpt = None,
    thinking_budget: ThinkingOpt = None,
    max_model_len: MaxModelLenOpt = None,
    vllm_arg: VllmArgOpt = None,
    samples: SamplesOpt = D.samples,
    max_tokens: MaxTokensOpt = D.max_tokens,
    temperature: TemperatureOpt = D.temperature,
    top_p: TopPOpt = D.top_p,
    top_k: TopKOpt = D.top_k,
    seed: SeedOpt = D.seed,
    limit: LimitOpt = None,
    batch_size: BatchSizeOpt = D.batch_size,
    prices: PricesOpt = None,
    skip_bad_rows: SkipBadRowsOpt = D.skip_bad_rows,
    system_prompt: SystemPromptOpt = None,
    solve_prompt: SolvePromptOpt = D.solve_prompt,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Sample K attempts per problem into RUN_DIR/samples/ (resumable; cached calls are never sent twice)."""
    from intgen.config import resolve
    from intgen.pipeline import load_config_problems, sample_problems

    try:
        settings = resolve(_given(ctx, dict(locals())), {})
    except (TypeError, ValueError) as exc:
        _fail(str(exc))
    loaded = _run_or_fail(lambda: load_config_problems(settings))
    entry = _in_run(run_dir, settings, lambda run, engine: sample_problems(run, settings, engine, loaded.frame, force,
                                                                          progress), settings.policy_backend())
    calls, last = entry["calls"], entry["last_run"]
    console.print(
        f"samples: {entry['rows']} attempts ({entry['truncated']} truncated, failed: {entry['failed_rows'] or 'none'}); "
        f"this run sent {last['requests_sent']} requests, {last['cache_hits']} cache hits, "
        f"{last['prompt_tokens']}+{last['completion_tokens']} tokens; total tokens "
        f"{calls['prompt_tokens']}+{calls['completion_tokens']}"
        + (f", cost ${calls['cost_usd']:.4f}" if calls["cost_usd"] is not None else ""),
        highlight=False,
    )
    _exit_for({"sample": entry["failed_rows"]} if entry["failed_rows"] else {}, "sample")


def _in_run(run_dir: Path, settings: "RunConfig", action: Callable[[Any, Any], dict[str, Any]],
            engine_config: Any = None) -> dict[str, Any]:
    """Run one stage command in the run directory (with its engine, if it needs one); save the settings."""
    from intgen.backends import make_backend
    from intgen.rundir import RunDir

    engine = _run_or_fail(lambda: make_backend(engine_config)) if engine_config is not None else None
    run = RunDir(run_dir)
    try:
        entry = _run_or_fail(lambda: action(run, engine))
        run.write_json("config.json", settings.to_dict())
    finally:
        if engine is not None:
            engine.close()
        run.close()
    return entry


@app.command("grade")
def grade(
    ctx: typer.Context,
    run_dir: RunDirOpt,
    hard_only: HardOnlyOpt = D.hard_only,
    hard_threshold: HardThresholdOpt = D.hard_threshold,
    grade_workers: GradeWorkersOpt = D.grade_workers,
    grade_timeout: GradeTimeoutOpt = D.grade_timeout,
    lenient_answers: LenientOpt = D.lenient_answers,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Grade every attempt in RUN_DIR/samples/ (verdicts into graded/, pass rates into pass_rates/)."""
    from intgen.pipeline import run_named_stage

    settings = _saved_config(run_dir, _given(ctx, dict(locals())))
    entry = _in_run(run_dir, settings, lambda run, _: run_named_stage(run, settings, "grade", None, force, progress))
    console.print(f"graded: {entry['correct']} correct, {entry['incorrect']} incorrect, {entry['ungradable']} "
                  f"ungradable {entry['ungradable_by_reason'] or ''}; {entry['problems_selected']} problems selected",
                  highlight=False)
    _exit_for({"grade": entry["failed_rows"]} if entry["failed_rows"] else {}, "grade")


@app.command("propose")
def propose(
    ctx: typer.Context,
    run_dir: RunDirOpt,
    proposals: ProposalsOpt = D.proposals,
    proposer_backend: ProposerBackendOpt = None,
    proposer_model: ProposerModelOpt = None,
    proposer_base_url: ProposerUrlOpt = None,
    propose_style: ProposeStyleOpt = ProposeStyle(D.propose_style),
    propose_max_tokens: ProposeMaxTokensOpt = D.propose_max_tokens,
    propose_temperature: ProposeTemperatureOpt = D.propose_temperature,
    structured: StructuredProposalsOpt = D.structured,
    include_truncated: IncludeTruncatedOpt = D.include_truncated,
    allow_no_reference: AllowNoReferenceOpt = D.allow_no_reference,
    reference_prompt: ReferencePromptOpt = D.reference_prompt,
    critique_prompt: CritiquePromptOpt = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Propose interventions for the failed attempts (into RUN_DIR/proposals/)."""
    from intgen.pipeline import run_named_stage

    settings = _saved_config(run_dir, _given(ctx, dict(locals())))
    entry = _in_run(run_dir, settings, lambda run, engine: run_named_stage(run, settings, "propose", engine, force,
                                                                          progress),
                    settings.proposer_config() or settings.policy_backend())
    console.print(f"proposals: {entry['rows']} for {entry['attempts']} failed attempts; accepted {entry['accepted']}; "
                  f"rejected {entry['rejected_by_reason'] or 'none'}", highlight=False)
    _exit_for({"propose": entry["failed_rows"]} if entry["failed_rows"] else {}, "propose")


@app.command("verify")
def verify(
    ctx: typer.Context,
    run_dir: RunDirOpt,
    continuations: ContinuationsOpt = D.continuations,
    verify_max_tokens: VerifyMaxTokensOpt = D.verify_max_tokens,
    verify_temperature: VerifyTemperatureOpt = D.verify_temperature,
    min_success: MinSuccessOpt = D.min_success,
    condition: ConditionOpt = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Continue each accepted intervention M times and keep the ones that lead to the answer."""
    from intgen.pipeline import run_named_stage
    from intgen.stages.export import table1_rows

    settings = _saved_config(run_dir, _given(ctx, dict(locals())))
    entry = _in_run(run_dir, settings, lambda run, engine: run_named_stage(run, settings, "verify", engine, force,
                                                                          progress), settings.policy_backend())
    for name, solved, accuracy, solved_ratio, accuracy_ratio in table1_rows(entry["table1"]):
        console.print(f"{name}: {solved} problems solved at least once, mean accuracy {accuracy}"
                      + (f", vs original-step {solved_ratio} solved, {accuracy_ratio} accuracy" if solved_ratio else ""),
                      highlight=False)
    console.print(f"verified: {entry['verified']}; kept: {entry['kept']}", highlight=False)
    _exit_for({"verify": entry["failed_rows"]} if entry["failed_rows"] else {}, "verify")


@app.command("export")
def export(run_dir: RunDirOpt) -> None:
    """Write RUN_DIR/dataset/ (parquet per config and a README.md dataset card)."""
    from intgen.stages.export import export as write
    from intgen.rundir import RunDir

    settings = _saved_config(run_dir, {})
    run = RunDir(run_dir)
    summary = _run_or_fail(lambda: write(run, settings))
    run.close()
    _print_summary(summary, run_dir)


@app.command("push")
def push(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with an exported dataset.")],
    repo_id: Annotated[str, typer.Argument(help="Hub dataset repo, e.g. me/my-int-data.")],
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Branch to push to (created if needed).")] = None,
    endpoint: Annotated[Optional[str], typer.Option(help="Hub endpoint (default: $HF_ENDPOINT or huggingface.co).")] = None,
) -> None:
    """Upload RUN_DIR/dataset to the Hub (token from $HF_TOKEN or `hf auth login`; never printed)."""
    from huggingface_hub.errors import HfHubHTTPError

    from intgen.hub import push_dataset
    from intgen.stages.export import funnel, write_card
    from intgen.rundir import RunDir

    settings = _saved_config(run_dir, {})
    run = RunDir(run_dir)
    _run_or_fail(lambda: write_card(run, settings, funnel(run), repo_id))  # the card's examples load the repo
    try:
        url = push_dataset(run.path / "dataset", repo_id, private=private, revision=revision, endpoint=endpoint)
    except (HfHubHTTPError, OSError) as exc:
        _fail(f"push to {repo_id} failed: {exc}")
    console.print(f"pushed {run.path / 'dataset'} to {repo_id}: {url}", highlight=False)


train_app = typer.Typer(help="The bundled TRL recipe: SFT on the sft config, then GRPO on the rl config.", no_args_is_help=True)
app.add_typer(train_app, name="train")

DatasetArg = Annotated[str, typer.Option(help="Exported dataset: RUN_DIR/dataset or a Hub repo id.")]
OutputOpt = Annotated[Path, typer.Option(help="Where the trained model is written.")]
TrainModelOpt = Annotated[Optional[str], typer.Option(help="Model folder, Hub id or .gguf file (default: the bundled SmolLM2-135M-Instruct, dequantised).")]
TrlConfigOpt = Annotated[Optional[Path], typer.Option(help="TRL settings file (YAML/JSON/TOML), passed to SFTConfig/GRPOConfig.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="One TRL setting, key=value (repeatable), e.g. --set learning_rate=1e-5.")]


def _train(
    kind: str, dataset: str, output_dir: Path, model: str | None, trl_config: Path | None, settings: list[str] | None,
    lenient: bool = False,
) -> None:
    from intgen import train

    try:
        overrides = train.read_overrides(trl_config, settings or [])
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    if kind == "sft":
        history = _run_or_fail(lambda: train.train_sft(dataset, output_dir, model, overrides))
    else:
        history = _run_or_fail(lambda: train.train_grpo(dataset, output_dir, model, overrides, lenient))
    if history and "dropped_rows" in history[0]:
        note = history.pop(0)
        console.print(f"sft rows: {note['rows']}, longest {note['longest_tokens']} tokens, max_length "
                      f"{note['max_length']}, dropped as longer: {note['dropped_rows']} (rows are never cut)",
                      highlight=False)
    losses = [row["loss"] for row in history if isinstance(row.get("loss"), (int, float))]
    rewards = [row["reward"] for row in history if isinstance(row.get("reward"), (int, float))]
    summary = f"{kind}: {len(losses)} logged steps"
    if losses:
        summary += f", loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    if rewards:
        summary += f", mean reward {sum(rewards) / len(rewards):.3f}"
    console.print(f"{summary}; model saved to {output_dir}", highlight=False)


@train_app.command("sft")
def train_sft(
    dataset: DatasetArg,
    output_dir: OutputOpt = Path("runs/sft-model"),
    model: TrainModelOpt = None,
    trl_config: TrlConfigOpt = None,
    settings: SetOpt = None,
) -> None:
    """TRL SFTTrainer on the sft config (loss on the completion only; paper defaults: lr 1e-6, 4 epochs, cosine, warm-up 0.1)."""
    _train("sft", dataset, output_dir, model, trl_config, settings)


@train_app.command("grpo")
def train_grpo(
    dataset: DatasetArg,
    output_dir: OutputOpt = Path("runs/grpo-model"),
    model: TrainModelOpt = None,
    trl_config: TrlConfigOpt = None,
    settings: SetOpt = None,
    lenient_answers: Annotated[bool, typer.Option(help="Reward answers stated without \\boxed{} too (small models).")] = False,
) -> None:
    """TRL GRPOTrainer on the rl config with the math-verify reward (paper defaults: 8 generations, no KL, lr 1e-6)."""
    _train("grpo", dataset, output_dir, model, trl_config, settings, lenient_answers)


@app.command("problems")
def problems(
    source: Annotated[str, typer.Argument(help="A .jsonl/.json/.parquet/.csv file, a dataset folder or a Hub dataset id.")],
    problem_column: Annotated[Optional[str], typer.Option(help="Column holding the problem text.")] = None,
    answer_column: Annotated[Optional[str], typer.Option(help="Column holding the final answer.")] = None,
    solution_column: Annotated[Optional[str], typer.Option(help="Column holding the reference solution.")] = None,
    split: SplitOpt = None,
    config: Annotated[Optional[str], typer.Option(help="Config (subset) of a Hub dataset.")] = None,
    skip_bad_rows: Annotated[bool, typer.Option(help="Skip malformed rows (each is reported) instead of stopping.")] = False,
    limit: Annotated[Optional[int], typer.Option(help="Load at most this many problems.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the loaded problems to this .parquet or .jsonl file.")] = None,
) -> None:
    """Load a problem set, report what was found (and skipped), optionally save it normalised."""
    from intgen.io import BadInputError, read_problems

    try:
        result = read_problems(
            source,
            problem_column=problem_column,
            answer_column=answer_column,
            solution_column=solution_column,
            split=split,
            config=config,
            on_bad_row="skip" if skip_bad_rows else "error",
            limit=limit,
        )
    except BadInputError as exc:
        errors.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(code=2) from None
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
        if out.suffix == ".parquet":
            frame.write_parquet(out)
        else:
            frame.write_ndjson(out)
        console.print(f"wrote {out}")
