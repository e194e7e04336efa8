"""export: the run as a Hugging Face dataset folder (parquet per config and a README.md card).

- `sft`: TRL's conversational prompt-completion format. prompt = [the problem, as the user message the
  policy saw], completion = [the attempt's steps before the error + the intervention]. Never the suffix.
- `rl`: the distinct problems with their gold answers and reference solutions, for GRPO; the prompt is
  the same user message (and system prompt) as in `sft` (the InT release used different ones, a defect).
- `interventions`: every proposal, accepted or not, with its verification results.
- `samples`: every attempt with its grade.

Both prompts come from `sample.solve_messages`, the function that built the prompts the policy was
sampled with.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import yaml

from intgen import __version__
from intgen.resources import Prompt, fill, resource_path
from intgen.rundir import RunDir, atomic_write_text, file_digest
from intgen.stages.sample import solve_messages

if TYPE_CHECKING:
    from intgen.config import RunConfig

CONFIGS = ("sft", "rl", "interventions", "samples")
STAGE_NAMES = ("sample", "grade", "propose", "verify")
MESSAGES = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))


def prompt_column(solve_template: str, system_prompt: str | None, problem: str = "problem") -> pl.Expr:
    """The chat prompt the policy saw, as a list of {role, content}."""
    return pl.col(problem).map_elements(lambda text: solve_messages(text, solve_template, system_prompt),
                                        return_dtype=MESSAGES)


def completion_column(text: str = "intervened_text") -> pl.Expr:
    return pl.concat_list([pl.struct(role=pl.lit("assistant"), content=pl.col(text))])


def dataset_tables(run: RunDir, solve: Prompt, system_prompt: str | None) -> dict[str, pl.LazyFrame]:
    """The four configs, as lazy frames over the run's tables."""
    prompt = prompt_column(solve.text, system_prompt).alias("prompt")
    problems = run.scan("problems")
    verdicts = run.scan("verify").filter(pl.col("condition") == "intervention").select(
        "proposal_id", "continuations", "successes", "ungradable", "success_rate", "kept", "true_continuation"
    )
    interventions = run.scan("proposals").join(verdicts, on="proposal_id", how="left").with_columns(
        pl.col("kept").fill_null(False)
    )
    sft = (
        interventions.filter(pl.col("kept"))
        .join(problems.select("problem_id", "problem", "source"), on="problem_id")
        .select(
            prompt, completion_column().alias("completion"), "problem_id", "attempt_id", "proposal_id",
            "error_step", "intervention", "successes", "continuations", "success_rate", "true_continuation", "source",
        )
        .sort("proposal_id")
    )
    selected = run.scan("pass_rates").filter("selected").select("problem_id", "pass_rate")
    rl = problems.join(selected, on="problem_id", maintain_order="left").select(
        prompt, "answer", "solution", "problem_id", "source", "pass_rate"
    )
    return {"sft": sft, "rl": rl, "interventions": interventions.sort("proposal_id"), "samples": run.scan("graded")}


def write_config(folder: Path, table: pl.LazyFrame) -> None:
    """One config's parquet file, named by its content: `datasets` caches a local folder under a hash of
    the card's data_files entries, so a fixed name would serve one run's rows for another run's folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".train.parquet.tmp"
    table.sink_parquet(tmp)
    path = folder / f"train-{file_digest(tmp)}.parquet"
    for old in folder.glob("train-*.parquet"):
        if old != path:
            old.unlink()
    tmp.replace(path)


def export(run: RunDir, config: RunConfig, skipped_rows: int = 0) -> dict[str, Any]:
    """Write RUN/dataset/ in the Hub's folder layout: one parquet file per config and a README.md card."""
    for name in STAGE_NAMES:
        if not str(run.stage_entry(name).get("status", "")).startswith("done"):
            raise FileNotFoundError(f"{run.path}: the {name!r} stage has not finished; run it first")
    tables = dataset_tables(run, config.prompt("solve"), config.system_prompt)
    for name in CONFIGS:
        write_config(run.path / "dataset" / name, tables[name])
    summary = funnel(run, skipped_rows)
    write_card(run, config, summary, str(run.path / "dataset"))
    return summary


def export_file(dataset_dir: Path, config_name: str) -> Path:
    """The parquet file of one config in an exported dataset folder."""
    [path] = sorted((dataset_dir / config_name).glob("train-*.parquet"))
    return path


# --- the funnel and the card ----------------------------------------------------------------------

def funnel(run: RunDir, skipped_rows: int = 0) -> dict[str, Any]:
    stages = run.manifest()["stages"]
    sample, graded, proposals, verify = (stages[name] for name in STAGE_NAMES)
    tokens = {name: stages[name].get("calls", {}) for name in ("sample", "propose", "verify")}
    costs = [t.get("cost_usd") for t in tokens.values()]
    return {
        "problems": sample.get("problems"),
        "skipped_problem_rows": skipped_rows,
        "attempts": sample["rows"],
        "correct": graded["correct"],
        "incorrect": graded["incorrect"],
        "ungradable": graded["ungradable"],
        "problems_selected": graded["problems_selected"],
        "proposals": proposals["rows"],
        "rejected": proposals["rejected_by_reason"],
        "verified": verify["by_condition"].get("intervention", {}).get("proposals", 0),
        "kept": verify["kept"],
        "by_condition": verify["by_condition"],
        "prompt_tokens": sum(t.get("prompt_tokens", 0) for t in tokens.values()),
        "completion_tokens": sum(t.get("completion_tokens", 0) for t in tokens.values()),
        "tokens_by_stage": {s: (t.get("prompt_tokens", 0), t.get("completion_tokens", 0)) for s, t in tokens.items()},
        "cost_usd": None if any(c is None for c in costs) else round(sum(costs), 6),
    }


def funnel_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    rejected = ", ".join(f"{k}: {v}" for k, v in sorted(summary["rejected"].items())) or "none"
    cost = "n/a (no --prices)" if summary["cost_usd"] is None else f"${summary['cost_usd']:.4f}"
    rows = [
        ("problems", str(summary["problems"])),
        ("attempts", str(summary["attempts"])),
        ("correct / incorrect / ungradable", f"{summary['correct']} / {summary['incorrect']} / {summary['ungradable']}"),
        ("problems selected for proposals", str(summary["problems_selected"])),
        ("proposals", str(summary["proposals"])),
        ("rejected, by reason", rejected),
        ("verified", str(summary["verified"])),
        ("kept", str(summary["kept"])),
        ("tokens (prompt + completion)", f"{summary['prompt_tokens']} + {summary['completion_tokens']}"),
        ("cost", cost),
    ]
    if "seconds" in summary:
        rows.append(("time", f"{summary['seconds']} s"))
    return rows


def write_card(run: RunDir, config: RunConfig, summary: dict[str, Any], load_path: str) -> None:
    """RUN/dataset/README.md; `load_path` is what the card's examples load (a folder or a Hub repo id)."""
    out = run.path / "dataset"
    files = {name: export_file(out, name) for name in CONFIGS}
    rows = {name: pl.scan_parquet(path).select(pl.len()).collect().item() for name, path in files.items()}
    atomic_write_text(out / "README.md", dataset_card(run, config, rows, files, summary, load_path))


def card_front_matter(config: RunConfig, rows: dict[str, int], files: dict[str, Path]) -> str:
    """The card's YAML: configs with their data files, licence, language, task, size, tags."""
    size = max(rows.values())
    category = "n<1K" if size < 1_000 else "1K<n<10K" if size < 10_000 else "10K<n<100K" if size < 100_000 else "100K<n<1M"
    front = {
        "configs": [
            {"config_name": name, "data_files": [{"split": "train", "path": f"{name}/{files[name].name}"}],
             **({"default": True} if name == "sft" else {})}
            for name in CONFIGS
        ],
        "license": config.license,
        "language": ["en"],
        "task_categories": ["text-generation"],
        "size_categories": [category],
        "tags": ["math", "reasoning", "intervention-training", "intgen", "synthetic"],
        "pretty_name": "intgen intervention dataset",
    }
    return yaml.safe_dump(front, sort_keys=False).strip()


def dataset_card(
    run: RunDir, config: RunConfig, rows: dict[str, int], files: dict[str, Path], summary: dict[str, Any],
    load_path: str,
) -> str:
    from intgen.grading import grader_version

    stages = run.manifest()["stages"]
    proposer = config.proposer_config()
    prompts = [config.prompt("solve"), *config.propose_prompts()]
    funnel_table = "| stage | count |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in funnel_rows(summary))
    usage = "| stage | prompt tokens | completion tokens |\n|---|---|---|\n" + "\n".join(
        f"| {stage} | {p} | {c} |" for stage, (p, c) in summary["tokens_by_stage"].items()
    )
    return fill(
        resource_path("data_cards", "card.md").read_text(encoding="utf-8"),
        yaml=card_front_matter(config, rows, files),
        title="intgen intervention dataset",
        intgen_version=__version__,
        min_success=str(config.min_success),
        continuations=str(config.continuations),
        rows_sft=str(rows["sft"]), rows_rl=str(rows["rl"]), rows_interventions=str(rows["interventions"]),
        rows_samples=str(rows["samples"]),
        load_path=load_path,
        problems=config.problems or "intgen's bundled example problems",
        n_problems=str(summary["problems"]),
        policy=f"{config.backend}: {stages['sample']['fingerprint']['model']} (sample and verify stages)",
        proposer="the policy model (self-proposed)" if proposer is None
        else f"{proposer.kind.value}: {stages['propose']['fingerprint']['model']}",
        samples=str(config.samples), temperature=str(config.temperature), top_p=str(config.top_p),
        top_k=str(config.top_k), max_tokens=str(config.max_tokens), seed=str(config.seed),
        proposals=str(config.proposals), propose_style=config.propose_style, structured=str(config.structured).lower(),
        grader=f"{grader_version()} (per-item time limit {config.grade_timeout} s)",
        prompts=", ".join(p.label() for p in prompts),
        funnel=funnel_table,
        usage=usage,
    )
