"""The `intgen` command line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from intgen import __version__
from intgen.backends import BackendKind

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
    saved = json.loads(path.read_text())
    try:
        return resolve(overrides, from_saved(saved).to_dict())
    except (TypeError, ValueError) as exc:
        _fail(str(exc))


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    from intgen.stages.export import funnel_rows

    table = Table(title=f"intgen: {run_dir}")
    table.add_column("stage")
    table.add_column("count", justify="right")
    for name, value in funnel_rows(summary):
        table.add_row(name, value)
    console.print(table)
    console.print(f"dataset: {run_dir / 'dataset'}  (datasets.load_dataset(\"{run_dir / 'dataset'}\", \"sft\"))")


def _run_or_fail(action: Callable[[], Any]) -> Any:
    from intgen.io import BadInputError
    from intgen.driver import StageConfigChanged

    try:
        return action()
    except (BadInputError, StageConfigChanged, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


BackendOpt = Annotated[BackendKind, typer.Option("--backend", help="Model engine.")]
ModelOpt = Annotated[Optional[str], typer.Option(help="Model name (local: a GGUF path; default: bundled SmolLM2-135M-Instruct).")]
BaseUrlOpt = Annotated[Optional[str], typer.Option(help="Server URL (openai: e.g. http://127.0.0.1:8000/v1; gemini: API endpoint).")]
ApiKeyEnvOpt = Annotated[Optional[str], typer.Option(help="Environment variable holding the API key (default OPENAI_API_KEY / GEMINI_API_KEY).")]
ConcurrencyOpt = Annotated[int, typer.Option(help="Requests in flight at once (openai, gemini).")]
StructuredOpt = Annotated[str, typer.Option(help="openai: how to send a JSON schema: json_schema (OpenAI, vLLM, SGLang), json_object (llama-cpp-python), none.")]
ContinuationOpt = Annotated[str, typer.Option(help="openai: how to continue an assistant message: chat (vLLM continue_final_message) or completions (client-side chat template).")]
ChatTemplateOpt = Annotated[Optional[str], typer.Option(help="openai + completions: chat template file, .gguf file or tokenizer name.")]
ThinkingOpt = Annotated[Optional[int], typer.Option(help="gemini: thinking budget in tokens.")]
ProposerBackendOpt = Annotated[Optional[BackendKind], typer.Option(help="Proposer engine (default: the policy's; self-proposed).")]
ProposerModelOpt = Annotated[Optional[str], typer.Option(help="Proposer model (default: the policy model).")]
ProposerUrlOpt = Annotated[Optional[str], typer.Option(help="Proposer server URL.")]
SamplesOpt = Annotated[int, typer.Option(help="Attempts per problem (K).")]
TemperatureOpt = Annotated[float, typer.Option()]
TopPOpt = Annotated[float, typer.Option()]
TopKOpt = Annotated[int, typer.Option(help="0 disables top-k.")]
SeedOpt = Annotated[int, typer.Option(help="Sampling seed: the same config and seed give the same dataset.")]
LimitOpt = Annotated[Optional[int], typer.Option(help="Use only the first N problems.")]
HardOnlyOpt = Annotated[bool, typer.Option(help="Propose only for problems whose pass rate is at most --hard-threshold.")]
HardThresholdOpt = Annotated[float, typer.Option(help="Pass-rate ceiling for --hard-only.")]
ProposalsOpt = Annotated[int, typer.Option(help="Proposals per failed attempt (P).")]
ProposeStyleOpt = Annotated[str, typer.Option(help="two-turn (the paper's: solve with the reference, then critique) or single-turn.")]
ProposeMaxTokensOpt = Annotated[int, typer.Option(help="Token limit per proposal.")]
ProposeTemperatureOpt = Annotated[float, typer.Option()]
StructuredProposalsOpt = Annotated[bool, typer.Option(help="Constrain proposals by a JSON schema where the backend can.")]
IncludeTruncatedOpt = Annotated[bool, typer.Option(help="Also propose for attempts cut off by max tokens.")]
ContinuationsOpt = Annotated[int, typer.Option(help="Continuations per intervention (M).")]
VerifyMaxTokensOpt = Annotated[int, typer.Option(help="Token limit per continuation.")]
VerifyTemperatureOpt = Annotated[float, typer.Option()]
MinSuccessOpt = Annotated[int, typer.Option(help="Keep an intervention with at least this many correct continuations.")]
ConditionOpt = Annotated[Optional[list[str]], typer.Option("--condition", help="Verify conditions (repeatable): intervention, original-step, resample-step, problem-only.")]
GradeWorkersOpt = Annotated[int, typer.Option(help="Grading worker processes.")]
LenientOpt = Annotated[bool, typer.Option(help="Grade a response without \\boxed{} by the answer it states (for small models).")]
BatchSizeOpt = Annotated[int, typer.Option(help="Problems per batch (one parquet part each).")]
PricesOpt = Annotated[Optional[Path], typer.Option(help="Price table (TOML/JSON) to report cost.")]
SkipBadRowsOpt = Annotated[bool, typer.Option(help="Skip malformed problem rows (each is reported).")]
RunDirOpt = Annotated[Path, typer.Option(help="Run directory (created if needed; rerunning resumes).")]
ForceOpt = Annotated[bool, typer.Option(help="Recompute a stage whose settings changed (cached model calls are reused).")]
ProgressOpt = Annotated[bool, typer.Option(help="Show progress bars.")]
SolvePromptOpt = Annotated[Optional[str], typer.Option(help="The policy's prompt (sample, verify, SFT and RL): a shipped file name or your own file with {{problem}}. [default: solve.md]")]
ReferencePromptOpt = Annotated[Optional[str], typer.Option(help="Turn 1 of the two-turn proposer prompt (solve guided by the reference): a shipped file name or your own file. [default: propose_reference.md]")]
CritiquePromptOpt = Annotated[Optional[str], typer.Option(help="Turn 2 of the two-turn proposer prompt, or the single-turn prompt: a shipped file name or your own file. [default: propose_critique.md / propose_single.md]")]


@app.command("build-dataset")
def build_dataset(
    ctx: typer.Context,
    problems: Annotated[Optional[str], typer.Option(help="Problem set: a file, a dataset folder or a Hub id. Default: the 20 bundled examples (and the demo sizes).")] = None,
    run_dir: RunDirOpt = Path("runs/default"),
    config: Annotated[Optional[Path], typer.Option(help="TOML file of settings (RunConfig field names); options given here win.")] = None,
    backend: BackendOpt = BackendKind.local,
    model: ModelOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    concurrency: ConcurrencyOpt = 32,
    structured_output: StructuredOpt = "json_schema",
    continuation: ContinuationOpt = "chat",
    chat_template: ChatTemplateOpt = None,
    thinking_budget: ThinkingOpt = None,
    proposer_backend: ProposerBackendOpt = None,
    proposer_model: ProposerModelOpt = None,
    proposer_base_url: ProposerUrlOpt = None,
    samples: SamplesOpt = 4,
    max_tokens: Annotated[int, typer.Option(help="Token limit per attempt.")] = 16384,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 0.8,
    top_k: TopKOpt = 20,
    seed: SeedOpt = 0,
    limit: LimitOpt = None,
    hard_only: HardOnlyOpt = False,
    hard_threshold: HardThresholdOpt = 0.0,
    proposals: ProposalsOpt = 4,
    propose_style: ProposeStyleOpt = "two-turn",
    propose_max_tokens: ProposeMaxTokensOpt = 8192,
    propose_temperature: ProposeTemperatureOpt = 0.7,
    structured: StructuredProposalsOpt = True,
    include_truncated: IncludeTruncatedOpt = False,
    continuations: ContinuationsOpt = 32,
    verify_max_tokens: VerifyMaxTokensOpt = 16384,
    verify_temperature: VerifyTemperatureOpt = 0.7,
    min_success: MinSuccessOpt = 1,
    condition: ConditionOpt = None,
    system_prompt: Annotated[Optional[str], typer.Option(help="System prompt for the policy (same in sampling, SFT and RL).")] = None,
    solve_prompt: SolvePromptOpt = None,
    reference_prompt: ReferencePromptOpt = None,
    critique_prompt: CritiquePromptOpt = None,
    grade_workers: GradeWorkersOpt = 2,
    lenient_answers: LenientOpt = False,
    batch_size: BatchSizeOpt = 64,
    prices: PricesOpt = None,
    skip_bad_rows: SkipBadRowsOpt = False,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Run every stage — sample, grade, propose, verify, export — resuming whatever is already done.

    With no options: the embedded demo (20 bundled problems, the local SmolLM2 engine, no key, no GPU).
    """
    from intgen.config import read_config_file, resolve
    from intgen.pipeline import build_dataset as build

    values = dict(locals())
    for name in ("ctx", "config", "run_dir", "force", "progress", "condition"):
        values.pop(name)
    explicit = _explicit(ctx, values)
    if condition:
        explicit["conditions"] = tuple(condition)
    for key in ("backend", "proposer_backend"):
        if isinstance(explicit.get(key), BackendKind):
            explicit[key] = explicit[key].value
    if "prices" in explicit:
        explicit["prices"] = str(explicit["prices"])
    try:
        settings = resolve(explicit, read_config_file(config) if config else {})
    except (TypeError, ValueError) as exc:
        _fail(str(exc))
    if settings.problems is None:
        console.print(
            "No --problems: running the embedded demo (20 bundled example problems on the local SmolLM2 engine, "
            f"K={settings.samples}, P={settings.proposals}, M={settings.continuations}).", highlight=False,
        )
    summary = _run_or_fail(lambda: build(settings, run_dir, force=force, progress=progress))
    _print_summary(summary, run_dir)


@app.command("sample")
def sample(
    problems: Annotated[str, typer.Option(help="Problem set: a file, a dataset folder or a Hub dataset id.")],
    run_dir: RunDirOpt,
    backend: BackendOpt = BackendKind.local,
    model: ModelOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    concurrency: ConcurrencyOpt = 32,
    structured_output: StructuredOpt = "json_schema",
    continuation: ContinuationOpt = "chat",
    chat_template: ChatTemplateOpt = None,
    thinking_budget: ThinkingOpt = None,
    samples: SamplesOpt = 4,
    max_tokens: Annotated[int, typer.Option(help="Token limit per attempt.")] = 4096,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 0.8,
    top_k: TopKOpt = 20,
    seed: SeedOpt = 0,
    limit: LimitOpt = None,
    batch_size: BatchSizeOpt = 64,
    prices: PricesOpt = None,
    skip_bad_rows: SkipBadRowsOpt = False,
    system_prompt: Annotated[Optional[str], typer.Option(help="System prompt for the policy.")] = None,
    solve_prompt: SolvePromptOpt = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Sample K attempts per problem into RUN_DIR/samples/ (resumable; cached calls are never sent twice)."""
    from intgen.backends import make_backend
    from intgen.config import RunConfig
    from intgen.pipeline import load_config_problems, sample_problems
    from intgen.rundir import RunDir

    settings = RunConfig(
        problems=problems, backend=backend.value, model=model, base_url=base_url, api_key_env=api_key_env,
        concurrency=concurrency, structured_output=structured_output, continuation=continuation,
        chat_template=chat_template, thinking_budget=thinking_budget, samples=samples, max_tokens=max_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, limit=limit, batch_size=batch_size,
        prices=None if prices is None else str(prices), skip_bad_rows=skip_bad_rows, system_prompt=system_prompt,
        **({"solve_prompt": solve_prompt} if solve_prompt else {}),
    )
    loaded = _run_or_fail(lambda: load_config_problems(settings))
    engine = make_backend(settings.policy_backend())
    run = RunDir(run_dir)
    try:
        entry = _run_or_fail(lambda: sample_problems(run, settings, engine, loaded.frame, force, progress))
        run.write_json("config.json", settings.to_dict())
    finally:
        engine.close()
        run.close()
    calls, last = entry["calls"], entry["last_run"]
    console.print(
        f"samples: {entry['rows']} attempts ({entry['truncated']} truncated, failed: {entry['failed_rows'] or 'none'}); "
        f"this run sent {last['requests_sent']} requests, {last['cache_hits']} cache hits, "
        f"{last['prompt_tokens']}+{last['completion_tokens']} tokens; total tokens "
        f"{calls['prompt_tokens']}+{calls['completion_tokens']}"
        + (f", cost ${calls['cost_usd']:.4f}" if calls["cost_usd"] is not None else ""),
        highlight=False,
    )


@app.command("grade")
def grade(
    ctx: typer.Context,
    run_dir: RunDirOpt,
    hard_only: HardOnlyOpt = False,
    hard_threshold: HardThresholdOpt = 0.0,
    grade_workers: GradeWorkersOpt = 2,
    grade_timeout: Annotated[float, typer.Option(help="Seconds per answer at most.")] = 5.0,
    lenient_answers: LenientOpt = False,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Grade every attempt in RUN_DIR/samples/ (verdicts into graded/, pass rates into pass_rates/)."""
    from intgen.pipeline import run_named_stage
    from intgen.rundir import RunDir

    settings = _saved_config(run_dir, _explicit(ctx, {"hard_only": hard_only, "hard_threshold": hard_threshold,
                                                      "grade_workers": grade_workers, "grade_timeout": grade_timeout,
                                                      "lenient_answers": lenient_answers}))
    run = RunDir(run_dir)
    entry = _run_or_fail(lambda: run_named_stage(run, settings, "grade", None, force, progress))
    run.write_json("config.json", settings.to_dict())
    console.print(f"graded: {entry['correct']} correct, {entry['incorrect']} incorrect, {entry['ungradable']} "
                  f"ungradable {entry['ungradable_by_reason'] or ''}; {entry['problems_selected']} problems selected",
                  highlight=False)


@app.command("propose")
def propose(
    ctx: typer.Context,
    run_dir: RunDirOpt,
    proposals: ProposalsOpt = 4,
    proposer_backend: ProposerBackendOpt = None,
    proposer_model: ProposerModelOpt = None,
    proposer_base_url: ProposerUrlOpt = None,
    propose_style: ProposeStyleOpt = "two-turn",
    propose_max_tokens: ProposeMaxTokensOpt = 8192,
    propose_temperature: ProposeTemperatureOpt = 0.7,
    structured: StructuredProposalsOpt = True,
    include_truncated: IncludeTruncatedOpt = False,
    reference_prompt: ReferencePromptOpt = None,
    critique_prompt: CritiquePromptOpt = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Propose interventions for the failed attempts (into RUN_DIR/proposals/)."""
    from intgen.backends import make_backend
    from intgen.pipeline import run_named_stage
    from intgen.rundir import RunDir

    given = _explicit(ctx, {k: v for k, v in locals().items() if k not in ("ctx", "run_dir", "force", "progress")})
    if isinstance(given.get("proposer_backend"), BackendKind):
        given["proposer_backend"] = given["proposer_backend"].value
    settings = _saved_config(run_dir, given)
    engine = make_backend(settings.proposer_config() or settings.policy_backend())
    run = RunDir(run_dir)
    try:
        entry = _run_or_fail(lambda: run_named_stage(run, settings, "propose", engine, force, progress))
        run.write_json("config.json", settings.to_dict())
    finally:
        engine.close()
        run.close()
    console.print(f"proposals: {entry['rows']} for {entry['attempts']} failed attempts; accepted {entry['accepted']}; "
                  f"rejected {entry['rejected_by_reason'] or 'none'}", highlight=False)


@app.command("verify")
def verify(
    ctx: typer.Context,
    run_dir: RunDirOpt,
    continuations: ContinuationsOpt = 32,
    verify_max_tokens: VerifyMaxTokensOpt = 16384,
    verify_temperature: VerifyTemperatureOpt = 0.7,
    min_success: MinSuccessOpt = 1,
    condition: ConditionOpt = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Continue each accepted intervention M times and keep the ones that lead to the answer."""
    from intgen.backends import make_backend
    from intgen.pipeline import run_named_stage
    from intgen.rundir import RunDir

    given = _explicit(ctx, {"continuations": continuations, "verify_max_tokens": verify_max_tokens,
                            "verify_temperature": verify_temperature, "min_success": min_success})
    if condition:
        given["conditions"] = tuple(condition)
    settings = _saved_config(run_dir, given)
    engine = make_backend(settings.policy_backend())
    run = RunDir(run_dir)
    try:
        entry = _run_or_fail(lambda: run_named_stage(run, settings, "verify", engine, force, progress))
        run.write_json("config.json", settings.to_dict())
    finally:
        engine.close()
        run.close()
    for name, row in entry["by_condition"].items():
        console.print(f"{name}: {row['solved']}/{row['proposals']} solved at least once, "
                      f"mean success rate {row['mean_success_rate']:.4f}", highlight=False)
    console.print(f"kept: {entry['kept']}", highlight=False)


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
    split: Annotated[str, typer.Option(help="Split of a dataset folder or Hub dataset.")] = "test",
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
