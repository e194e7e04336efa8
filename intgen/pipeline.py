"""The whole InT pipeline over a run directory: sample, grade, propose, verify, export."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from intgen import __version__
from intgen.backends import make_backend
from intgen.calls import Price
from intgen.config import RunConfig
from intgen.backends.base import Backend
from intgen.io import LoadResult, read_problems
from intgen.resources import file_sha256, resource_path
from intgen.rundir import RunDir, atomic_write_text
from intgen.runner import run_grade, run_propose, run_sample, run_verify
from intgen.stages.export import CONFIGS, completion_expr, prompt_expr

STAGES = ("samples", "graded", "proposals", "verify")


def load_price(path: str | Path | None, model: str) -> Price | None:
    """A price table (TOML or JSON): {model: {input: USD per 1M tokens, output: USD per 1M tokens}}."""
    if path is None:
        return None
    path = Path(path)
    if path.suffix == ".json":
        import json

        table = json.loads(path.read_text())
    else:
        import tomllib

        table = tomllib.loads(path.read_text())
    entry = table.get(model)
    if entry is None:
        raise ValueError(f"{path}: no price for model {model!r}; models priced: {', '.join(table) or '(none)'}")
    return Price(float(entry["input"]), float(entry["output"]))


def sample_with(run: RunDir, config: RunConfig, backend: Backend, problems: pl.DataFrame, force: bool = False,
                progress: bool = True) -> dict[str, Any]:
    return run_sample(run, problems, backend, samples=config.samples, sampling=config.sampling(),
                      prompt=config.solve_prompt, system_prompt=config.system_prompt, batch_size=config.batch_size,
                      price=load_price(config.prices, backend.model), force=force, progress=progress)


def grade_with(run: RunDir, config: RunConfig, force: bool = False, progress: bool = True) -> dict[str, Any]:
    return run_grade(run, workers=config.grade_workers, timeout=config.grade_timeout, lenient=config.lenient_answers,
                     hard_only=config.hard_only, hard_threshold=config.hard_threshold, force=force, progress=progress)


def propose_with(run: RunDir, config: RunConfig, backend: Backend, force: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    return run_propose(run, backend, proposals=config.proposals,
                       sampling=config.sampling(config.propose_max_tokens, config.propose_temperature),
                       style=config.propose_style, structured=config.structured,
                       include_truncated=config.include_truncated, grade_workers=config.grade_workers,
                       grade_timeout=config.grade_timeout, price=load_price(config.prices, backend.model),
                       force=force, progress=progress)


def verify_with(run: RunDir, config: RunConfig, backend: Backend, force: bool = False,
                progress: bool = True) -> dict[str, Any]:
    return run_verify(run, backend, continuations=config.continuations,
                      sampling=config.sampling(config.verify_max_tokens, config.verify_temperature),
                      min_success=config.min_success, conditions=config.conditions, solve_prompt=config.solve_prompt,
                      system_prompt=config.system_prompt, grade_workers=config.grade_workers,
                      grade_timeout=config.grade_timeout, lenient=config.lenient_answers,
                      price=load_price(config.prices, backend.model), force=force, progress=progress)


def load_config_problems(config: RunConfig) -> LoadResult:
    return read_problems(
        config.problem_source(), problem_column=config.problem_column, answer_column=config.answer_column,
        solution_column=config.solution_column, split=config.split, config=config.subset,
        on_bad_row="skip" if config.skip_bad_rows else "error", limit=config.limit,
    )


def build_dataset(config: RunConfig, run_dir: Path, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run every stage (resuming what is done) and export the dataset; returns the funnel summary."""
    started = time.monotonic()
    run = RunDir(run_dir)
    if run.read_json("config.json") is None:
        run.write_json("config.json", config.to_dict())
    loaded = load_config_problems(config)
    policy = make_backend(config.policy_backend())
    proposer_config = config.proposer_config()
    proposer = make_backend(proposer_config) if proposer_config else policy
    try:
        sample_with(run, config, policy, loaded.frame, force, progress)
        grade_with(run, config, force, progress)
        propose_with(run, config, proposer, force, progress)
        verify_with(run, config, policy, force, progress)
    finally:
        if proposer is not policy:
            proposer.close()
        policy.close()
    run.write_json("config.json", config.to_dict())
    summary = export(run, config, skipped_rows=len(loaded.skipped))
    summary["seconds"] = round(time.monotonic() - started, 1)
    run.close()
    return summary


# --- export ---------------------------------------------------------------------------------------

def export(run: RunDir, config: RunConfig, skipped_rows: int = 0) -> dict[str, Any]:
    """Write RUN/dataset/ in the Hub's folder layout: one parquet file per config and a README.md card."""
    for stage in STAGES:
        entry = run.manifest()["stages"].get(stage, {})
        if not str(entry.get("status", "")).startswith("done"):
            raise FileNotFoundError(f"{run.path}: the {stage!r} stage has not finished; run it first")
    template = resource_path("prompts", config.solve_prompt).read_text(encoding="utf-8")
    prompt = prompt_expr(template, config.system_prompt)
    problems = run.scan("problems")
    proposals = run.scan("proposals")
    verdicts = run.scan("verify").filter(pl.col("condition") == "intervention").select(
        "proposal_id", "continuations", "successes", "ungradable", "success_rate", "kept", "true_continuation"
    )
    interventions = proposals.join(verdicts, on="proposal_id", how="left").with_columns(pl.col("kept").fill_null(False))
    sft = (
        interventions.filter(pl.col("kept"))
        .join(problems.select("problem_id", "problem", "source"), on="problem_id")
        .select(
            prompt.alias("prompt"), completion_expr().alias("completion"), "problem_id", "attempt_id",
            "proposal_id", "error_step", "intervention", "successes", "continuations", "success_rate",
            "true_continuation", "source",
        )
        .sort("proposal_id")
    )
    selected = run.scan("pass_rates").filter("selected").select("problem_id", "pass_rate")
    rl = problems.join(selected, on="problem_id").select(
        prompt.alias("prompt"), "answer", "solution", "problem_id", "source", "pass_rate"
    )
    tables = {"sft": sft, "rl": rl, "interventions": interventions.sort("proposal_id"), "samples": run.scan("graded")}
    out = run.path / "dataset"
    for name in CONFIGS:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".train.parquet.tmp"
        tables[name].sink_parquet(tmp)
        # The file is named by its content: `datasets` caches a local folder under a hash of the card's
        # data_files entries, so a fixed name would serve one run's rows for another run's folder.
        path = folder / f"train-{file_sha256(tmp)[:16]}.parquet"
        for old in folder.glob("train-*.parquet"):
            if old != path:
                old.unlink()
        tmp.replace(path)
    summary = funnel(run, skipped_rows)
    write_card(run, config, summary, str(out))
    return summary


def write_card(run: RunDir, config: RunConfig, summary: dict[str, Any], load_path: str) -> None:
    """RUN/dataset/README.md; `load_path` is what the card's examples load (a folder or a Hub repo id)."""
    out = run.path / "dataset"
    files = {name: export_file(out, name) for name in CONFIGS}
    rows = {name: pl.scan_parquet(path).select(pl.len()).collect().item() for name, path in files.items()}
    solve_file = resource_path("prompts", config.solve_prompt)
    atomic_write_text(out / "README.md", dataset_card(run, config, rows, files, summary, solve_file, load_path))


def export_file(dataset_dir: Path, config_name: str) -> Path:
    """The parquet file of one config in an exported dataset folder."""
    [path] = sorted((dataset_dir / config_name).glob("train-*.parquet"))
    return path


def funnel(run: RunDir, skipped_rows: int = 0) -> dict[str, Any]:
    stages = run.manifest()["stages"]
    graded, proposals, verify = stages["graded"], stages["proposals"], stages["verify"]
    tokens = {s: stages[s].get("calls", {}) for s in ("samples", "proposals", "verify")}
    costs = [t.get("cost_usd") for t in tokens.values()]
    return {
        "problems": stages["samples"].get("problems"),
        "skipped_problem_rows": skipped_rows,
        "attempts": stages["samples"]["rows"],
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


def dataset_card(
    run: RunDir, config: RunConfig, rows: dict[str, int], files: dict[str, Path], summary: dict[str, Any],
    solve_file: Path, load_path: str,
) -> str:
    from intgen.grading import grader_version
    from intgen.resources import fill

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
    prompts = run.manifest()["stages"]["proposals"].get("prompt_files", [])
    prompt_hashes = [f"`{p}` (sha256 {file_sha256(resource_path('prompts', p))[:12]})" for p in [solve_file.name, *prompts]]
    proposer = config.proposer_config()
    funnel_table = "| stage | count |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in funnel_rows(summary))
    usage = "| stage | prompt tokens | completion tokens |\n|---|---|---|\n" + "\n".join(
        f"| {stage} | {p} | {c} |" for stage, (p, c) in summary["tokens_by_stage"].items()
    )
    template = resource_path("data_cards", "card.md").read_text(encoding="utf-8")
    return fill(
        template,
        yaml=yaml.safe_dump(front, sort_keys=False).strip(),
        title="intgen intervention dataset",
        intgen_version=__version__,
        min_success=str(config.min_success),
        continuations=str(config.continuations),
        rows_sft=str(rows["sft"]), rows_rl=str(rows["rl"]), rows_interventions=str(rows["interventions"]),
        rows_samples=str(rows["samples"]),
        load_path=load_path,
        problems=config.problems or "intgen's bundled example problems",
        n_problems=str(summary["problems"]),
        policy=f"{config.backend}: {run.manifest()['stages']['samples']['fingerprint']['model']} (sample and verify stages)",
        proposer="the policy model (self-proposed)" if proposer is None
        else f"{proposer.kind.value}: {run.manifest()['stages']['proposals']['fingerprint']['model']}",
        samples=str(config.samples), temperature=str(config.temperature), top_p=str(config.top_p),
        top_k=str(config.top_k), max_tokens=str(config.max_tokens), seed=str(config.seed),
        proposals=str(config.proposals), propose_style=config.propose_style, structured=str(config.structured).lower(),
        grader=f"{grader_version()} (per-item time limit {config.grade_timeout} s)",
        prompts=", ".join(prompt_hashes),
        funnel=funnel_table,
        usage=usage,
    )
