"""The `intgen` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from intgen import __version__

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
