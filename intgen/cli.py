"""The `intgen` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from intgen import __version__
from intgen.backends import BackendConfig, BackendKind

app = typer.Typer(
    help="Build intervention (InT) datasets for LLM math reasoning.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
errors = Console(stderr=True)


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


@app.command("build-dataset")
def build_dataset() -> None:
    """Run every stage (sample, grade, propose, verify, export). Not built yet."""
    errors.print(
        "intgen build-dataset: the pipeline is not built yet (see the README's status note). "
        "Available today: `intgen problems` (problem loading) and the intgen.grading / intgen.steps APIs."
    )
    raise typer.Exit(code=2)


def _fail(message: str) -> None:
    errors.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    raise typer.Exit(code=2)


def load_price(path: Path | None, model: str) -> "Price | None":
    """A price table (TOML or JSON): {model: {input: USD per 1M tokens, output: USD per 1M tokens}}."""
    from intgen.calls import Price

    if path is None:
        return None
    if path.suffix == ".json":
        import json

        table = json.loads(path.read_text())
    else:
        import tomllib

        table = tomllib.loads(path.read_text())
    entry = table.get(model)
    if entry is None:
        _fail(f"{path}: no price for model {model!r}; models priced: {', '.join(table) or '(none)'}")
    return Price(float(entry["input"]), float(entry["output"]))


BackendOpt = Annotated[BackendKind, typer.Option("--backend", help="Model engine.")]
ModelOpt = Annotated[Optional[str], typer.Option(help="Model name (local: a GGUF path; default: bundled SmolLM2-135M-Instruct).")]
BaseUrlOpt = Annotated[Optional[str], typer.Option(help="Server URL (openai: e.g. http://127.0.0.1:8000/v1; gemini: API endpoint).")]
ApiKeyEnvOpt = Annotated[Optional[str], typer.Option(help="Environment variable holding the API key (default OPENAI_API_KEY / GEMINI_API_KEY).")]
ConcurrencyOpt = Annotated[int, typer.Option(help="Requests in flight at once (openai, gemini).")]
StructuredOpt = Annotated[str, typer.Option(help="openai: how to send a JSON schema: json_schema (OpenAI, vLLM, SGLang), json_object (llama-cpp-python), none.")]
ContinuationOpt = Annotated[str, typer.Option(help="openai: how to continue an assistant message: chat (vLLM continue_final_message) or completions (client-side chat template).")]
ChatTemplateOpt = Annotated[Optional[str], typer.Option(help="openai + completions: chat template file, .gguf file or tokenizer name.")]
ThinkingOpt = Annotated[Optional[int], typer.Option(help="gemini: thinking budget in tokens.")]


def backend_config(
    backend: BackendKind, model: str | None, base_url: str | None, api_key_env: str | None, concurrency: int,
    structured_output: str, continuation: str, chat_template: str | None, thinking_budget: int | None,
) -> BackendConfig:
    return BackendConfig(
        kind=backend, model=model, base_url=base_url, api_key_env=api_key_env, concurrency=concurrency,
        structured_output=structured_output, continuation=continuation, chat_template=chat_template,
        thinking_budget=thinking_budget,
    )


@app.command("sample")
def sample(
    problems: Annotated[str, typer.Option(help="Problem set: a file, a dataset folder or a Hub dataset id.")],
    run_dir: Annotated[Path, typer.Option(help="Run directory (created if needed; rerunning resumes).")],
    backend: BackendOpt = BackendKind.local,
    model: ModelOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    concurrency: ConcurrencyOpt = 32,
    structured_output: StructuredOpt = "json_schema",
    continuation: ContinuationOpt = "chat",
    chat_template: ChatTemplateOpt = None,
    thinking_budget: ThinkingOpt = None,
    samples: Annotated[int, typer.Option(help="Attempts per problem (K).")] = 4,
    max_tokens: Annotated[int, typer.Option(help="Token limit per attempt.")] = 4096,
    temperature: Annotated[float, typer.Option()] = 0.7,
    top_p: Annotated[float, typer.Option()] = 0.8,
    top_k: Annotated[int, typer.Option(help="0 disables top-k.")] = 20,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed (fixed seeds make runs repeatable).")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N problems.")] = None,
    batch_size: Annotated[int, typer.Option(help="Problems per batch (one parquet part each).")] = 64,
    prices: Annotated[Optional[Path], typer.Option(help="Price table (TOML/JSON) to report cost.")] = None,
    skip_bad_rows: Annotated[bool, typer.Option(help="Skip malformed problem rows (each is reported).")] = False,
    force: Annotated[bool, typer.Option(help="Recompute a stage whose settings changed.")] = False,
) -> None:
    """Sample K attempts per problem into RUN_DIR/samples/ (resumable; cached calls are never sent twice)."""
    from intgen.backends import make_backend
    from intgen.backends.base import Sampling
    from intgen.io import BadInputError, read_problems
    from intgen.runner import StageConfigChanged, run_sample
    from intgen.rundir import RunDir

    try:
        loaded = read_problems(problems, on_bad_row="skip" if skip_bad_rows else "error", limit=limit)
    except BadInputError as exc:
        _fail(str(exc))
    config = backend_config(backend, model, base_url, api_key_env, concurrency, structured_output, continuation, chat_template, thinking_budget)
    engine = make_backend(config)
    run = RunDir(run_dir)
    sampling = Sampling(temperature, top_p, top_k or None, max_tokens, (), seed)
    try:
        entry = run_sample(
            run, loaded.frame, engine, samples=samples, sampling=sampling, batch_size=batch_size,
            price=load_price(prices, engine.model), force=force,
        )
    except StageConfigChanged as exc:
        _fail(str(exc))
    finally:
        engine.close()
        run.close()
    calls = entry["calls"]
    last = entry["last_run"]
    console.print(
        f"samples: {entry['rows']} attempts ({entry['truncated']} truncated, failed: {entry['failed_rows'] or 'none'}); "
        f"this run sent {last['requests_sent']} requests, {last['cache_hits']} cache hits, "
        f"{last['prompt_tokens']}+{last['completion_tokens']} tokens; total tokens "
        f"{calls['prompt_tokens']}+{calls['completion_tokens']}"
        + (f", cost ${calls['cost_usd']:.4f}" if calls["cost_usd"] is not None else ""),
        highlight=False,
    )


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
