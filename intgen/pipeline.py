"""The whole InT pipeline over a run directory: sample, grade, propose, verify, export.

This is the one place where a run's settings (`RunConfig`) become each stage's settings; the CLI's
stage commands and `build-dataset` both go through it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import polars as pl

from intgen.backends import make_backend
from intgen.backends.base import Backend
from intgen.calls import Price
from intgen.config import RunConfig
from intgen.driver import Grader, run_stage, write_problems
from intgen.io import LoadResult, read_problems
from intgen.rundir import RunDir
from intgen.stages import Stage
from intgen.stages import grade, propose, sample, verify
from intgen.stages.export import export
from intgen.stages.verify import Condition

STAGES: list[Stage] = [sample.STAGE, grade.STAGE, propose.STAGE, verify.STAGE]


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


# --- each stage's settings, from the run's ---------------------------------------------------------

def sample_settings(config: RunConfig) -> sample.SampleSettings:
    return sample.SampleSettings(config.samples, config.sampling(), config.prompt("solve"), config.system_prompt)


def grade_settings(config: RunConfig) -> grade.GradeSettings:
    return grade.GradeSettings(config.grade_timeout, config.lenient_answers, config.hard_only, config.hard_threshold)


def propose_settings(config: RunConfig) -> propose.ProposeSettings:
    prompts = config.propose_prompts()
    return propose.ProposeSettings(
        config.proposals, config.sampling(config.propose_max_tokens, config.propose_temperature),
        critique_prompt=prompts[-1], reference_prompt=prompts[0] if len(prompts) == 2 else None,
        structured=config.structured, include_truncated=config.include_truncated,
    )


def verify_settings(config: RunConfig) -> verify.VerifySettings:
    return verify.VerifySettings(
        config.continuations, config.sampling(config.verify_max_tokens, config.verify_temperature),
        config.prompt("solve"), config.system_prompt, config.min_success,
        tuple(Condition(c) for c in config.conditions), config.lenient_answers,
    )


SETTINGS = {"sample": sample_settings, "grade": grade_settings, "propose": propose_settings, "verify": verify_settings}


def run_named_stage(run: RunDir, config: RunConfig, name: str, backend: Backend | None = None, force: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    """Run one stage of the pipeline (`sample`, `grade`, `propose` or `verify`) with the run's settings."""
    stage = next(s for s in STAGES if s.name == name)
    price = load_price(config.prices, backend.model) if backend is not None else None
    return run_stage(run, stage, SETTINGS[name](config), STAGES, backend=backend,
                     grader=Grader(config.grade_workers, config.grade_timeout), price=price, force=force,
                     progress=progress)


def sample_problems(run: RunDir, config: RunConfig, backend: Backend, problems: pl.DataFrame, force: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    """The problem set into `RUN/problems/`, then the sample stage."""
    write_problems(run, problems, config.batch_size, force)
    return run_named_stage(run, config, "sample", backend, force, progress)


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
        sample_problems(run, config, policy, loaded.frame, force, progress)
        run_named_stage(run, config, "grade", None, force, progress)
        run_named_stage(run, config, "propose", proposer, force, progress)
        run_named_stage(run, config, "verify", policy, force, progress)
    finally:
        if proposer is not policy:
            proposer.close()
        policy.close()
    run.write_json("config.json", config.to_dict())
    summary = export(run, config, skipped_rows=len(loaded.skipped))
    summary["seconds"] = round(time.monotonic() - started, 1)
    run.close()
    return summary
