"""export: the run as a Hugging Face dataset folder (parquet per config and a README.md card, `dataset.card`).

- `sft`: TRL's conversational prompt-completion format. prompt = [the problem, as the user message the
  policy saw], completion = [the attempt's steps before the error + the intervention]. Never the suffix.
- `rl`: the distinct problems with their gold answers and reference solutions, for GRPO; the prompt is
  the same user message (and system prompt) as in `sft` (the InT release used different ones, a defect).
- `interventions`: every proposal, accepted or not, with its verification results and, where its step baselines
  ran, their successes and its lift (`intgen.lift`).
- `samples`: every attempt with its grade.
- `preference`: TRL's conversational preference type, one pair per kept intervention whose original-step baseline
  ran and that beat it (lift > 0): prompt = [the problem as the user message, the attempt's steps before the error
  as the start of the assistant's turn], chosen = the intervention, rejected = the original wrong step; Step-DPO's
  columns (`initial_reason_steps`, `full_chosen`, `full_rejected`, `answer`) and both arms' measured successes.
- `prm`: TRL's stepwise-supervision type, one row per attempt whose error step is backed by a kept intervention:
  `completions` = the attempt's steps up to the error, in order; `labels` = True before it, False at it (nothing
  after it: the error's position is all the run measured).

Both prompts come from `sample.solve_messages`, the function that built the prompts the policy was
sampled with.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from intgen.dataset.analysis import matched_units
from intgen.errors import MissingFile
from intgen.plan import MODEL_STAGES, STAGE_NAMES, STAGES
from intgen.resources import Prompt
from intgen.rundir import RunDir, file_digest
from intgen.stages.sample import solve_messages
from intgen.stages.verify import LIFT_COLUMNS, VERIFY_SCHEMA, intervened_text
from intgen.steps import join_steps, steps_at

if TYPE_CHECKING:
    from intgen.config import RunConfig

CONFIGS = ("sft", "rl", "interventions", "samples", "preference", "prm")
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
    verdicts = run.scan("verify", VERIFY_SCHEMA).filter(pl.col("condition") == "intervention").select(
        "proposal_id", "continuations", "successes", "ungradable", "success_rate", "kept", "true_continuation",
        *LIFT_COLUMNS, pl.col("error").is_null().alias("verified"), pl.col("matched").alias("in_table1"),
    )
    # an accepted proposal without a verify row was not verified (one per attempt, unless --verify-all-proposals)
    interventions = run.scan("proposals").join(verdicts, on="proposal_id", how="left").with_columns(
        pl.col("kept").fill_null(False), pl.col("verified").fill_null(False), pl.col("in_table1").fill_null(False)
    )
    sft = (
        interventions.filter(pl.col("kept"))
        .join(problems.select("problem_id", "problem", "source"), on="problem_id")
        .select(
            prompt, completion_column().alias("completion"), "problem_id", "attempt_id", "proposal_id",
            "error_step", "intervention", "successes", "continuations", "success_rate", "true_continuation", "source",
            *LIFT_COLUMNS,
        )
        .sort("proposal_id")
    )
    selected = run.scan("pass_rates").filter("selected").select("problem_id", "pass_rate")
    rl = problems.join(selected, on="problem_id", maintain_order="left").with_row_index("index").select(
        prompt, "answer", "solution", "problem_id", "source", "pass_rate",
        # what verl's RLHFDataset and reward managers read (see intgen.rewards.compute_score)
        pl.col("source").alias("data_source"), pl.lit("math").alias("ability"),
        pl.struct(style=pl.lit("rule"), ground_truth=pl.col("answer")).alias("reward_model"),
        pl.struct(index=pl.col("index").cast(pl.Int64), problem_id=pl.col("problem_id")).alias("extra_info"),
    )
    return {"sft": sft, "rl": rl, "interventions": interventions.sort("proposal_id"), "samples": run.scan("graded"),
            **step_tables(interventions, problems, run.scan("samples"), solve, system_prompt)}


PREFERENCE_RULE = ("one pair per kept intervention (by the run's keep rule) whose original-step baseline ran and "
                   "that solved more often than it (lift > 0): chosen = the intervention, rejected = the attempt's own "
                   "wrong step, both continuing the attempt's steps before the error")
PRM_RULE = ("one row per attempt with a kept intervention (its first kept proposal's error step): the steps before "
            "the error labelled True, the error step False, the steps after it left out")
# what each config's rows are (the report shows them; the card's template says the same at more length)
CONFIG_DEFINITIONS = {
    "sft": "one row per kept intervention: prompt = the problem as the user message, completion = the attempt's own "
           "steps before the error + the intervention (never the rest of the attempt)",
    "rl": "the distinct problems with gold answer and reference solution (GRPO; verl's columns too)",
    "interventions": "every proposal with its parse, leak check, verdict, continuations' successes and lift",
    "samples": "every attempt with its grade",
    "preference": PREFERENCE_RULE,
    "prm": PRM_RULE,
}


def step_tables(interventions: pl.LazyFrame, problems: pl.LazyFrame, samples: pl.LazyFrame, solve: Prompt,
                system_prompt: str | None) -> dict[str, pl.LazyFrame]:
    """The `preference` and `prm` configs, from the kept interventions and the attempts' own steps."""
    kept = (interventions.filter(pl.col("kept"))
            .join(problems.select("problem_id", "problem", "answer"), on="problem_id")
            .join(samples.select("attempt_id", "text"), on="attempt_id")
            .sort("attempt_id", "proposal_index").collect())  # an attempt's first kept proposal first
    pairs, labelled, seen = [], [], set()
    for row in kept.iter_rows(named=True):
        steps = steps_at(row["text"], row["step_ends"])
        error = row["error_step"]
        before = join_steps(steps[: error - 1])
        if row["attempt_id"] not in seen:
            seen.add(row["attempt_id"])
            labelled.append({"prompt": row["problem"], "completions": steps[:error],
                             "labels": [True] * (error - 1) + [False], "problem_id": row["problem_id"],
                             "attempt_id": row["attempt_id"], "proposal_id": row["proposal_id"], "error_step": error})
        if row["lift"] is None or row["lift"] <= 0:  # no original-step baseline, or not beaten
            continue
        messages = solve_messages(row["problem"], solve.text, system_prompt)
        wrong = steps[error - 1].rstrip()  # without the separator the next step followed: chosen has none either
        # both arms' continuations that decided the pair (with --top-up, the first M and the N more), so that
        # lift and lift_p follow from the row's own counts
        chosen = (row["successes"] + (row["top_up_successes"] or 0),
                  row["continuations"] + (row["top_up_continuations"] or 0))
        rejected = (row["baseline_successes"] + (row["baseline_top_up_successes"] or 0),
                    row["baseline_continuations"] + (row["baseline_top_up_continuations"] or 0))
        pairs.append({
            "prompt": [*messages, {"role": "assistant", "content": before}],
            "chosen": [{"role": "assistant", "content": row["intervention"].strip()}],
            "rejected": [{"role": "assistant", "content": wrong}],
            "initial_reason_steps": before,
            "full_chosen": intervened_text(steps, error, row["intervention"]),
            "full_rejected": before + wrong,
            "answer": row["answer"], "problem_id": row["problem_id"], "attempt_id": row["attempt_id"],
            "proposal_id": row["proposal_id"], "error_step": error,
            "chosen_successes": chosen[0], "chosen_continuations": chosen[1],
            "rejected_successes": rejected[0], "rejected_continuations": rejected[1],
            "lift": row["lift"], "lift_p": row["lift_p"],
            "chosen_success_rate": chosen[0] / chosen[1], "rejected_success_rate": rejected[0] / rejected[1],
        })
    return {"preference": pl.DataFrame(pairs, schema=PREFERENCE_SCHEMA).lazy(),
            "prm": pl.DataFrame(labelled, schema=PRM_SCHEMA).lazy()}


PREFERENCE_SCHEMA = {
    "prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES, "initial_reason_steps": pl.String,
    "full_chosen": pl.String, "full_rejected": pl.String, "answer": pl.String, "problem_id": pl.String,
    "attempt_id": pl.String, "proposal_id": pl.String, "error_step": pl.Int32, "chosen_successes": pl.Int32,
    "chosen_continuations": pl.Int32, "rejected_successes": pl.Int32, "rejected_continuations": pl.Int32,
    "lift": pl.Float64, "lift_p": pl.Float64, "chosen_success_rate": pl.Float64, "rejected_success_rate": pl.Float64,
}
PRM_SCHEMA = {
    "prompt": pl.String, "completions": pl.List(pl.String), "labels": pl.List(pl.Boolean), "problem_id": pl.String,
    "attempt_id": pl.String, "proposal_id": pl.String, "error_step": pl.Int32,
}


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


def require_current_export(run: RunDir, before: str) -> None:
    """The stages follow their inputs, and RUN/dataset was exported from them as they are now."""
    from intgen.driver import StaleRun, require_up_to_date, state_digest

    require_up_to_date(run, STAGES, before)
    analysis = run.read_json("analysis.json") or {}
    if analysis.get("exported_from") != state_digest(run, STAGES):
        raise StaleRun(f"{run.path}: the dataset was exported before the stages last changed: run `intgen export "
                       f"--run-dir {run.path}` before {before}")


def export(run: RunDir, config: RunConfig, skipped_rows: int = 0) -> dict[str, Any]:
    """Write RUN/dataset/ in the Hub's folder layout: one parquet file per config and a README.md card. Refused
    while a stage does not follow its input (e.g. proposals made again after verify ran)."""
    from intgen.driver import require_up_to_date

    for name in STAGE_NAMES:
        if not str(run.stage_entry(name).get("status", "")).startswith("done"):
            raise MissingFile(f"{run.path}: the {name!r} stage has not finished; run it first")
    require_up_to_date(run, STAGES, "exporting")
    tables = dataset_tables(run, config.prompt("solve"), config.system_prompt)
    for name in CONFIGS:
        write_config(run.path / "dataset" / name, tables[name])
    from intgen.dataset.release import write_release

    write_release(run, config)  # RUN/dataset/release/ with --release-layout (removed without it)
    summary = funnel(run, skipped_rows)
    write_analysis(run, summary)
    from intgen.dataset.card import write_card

    write_card(run, config, summary, str(run.path / "dataset"))
    return summary


def write_analysis(run: RunDir, summary: dict[str, Any]) -> None:
    """RUN/analysis.json: Table 1 (with the proposal that stood for each problem) and the funnel (what the
    summary, the card and the report show)."""
    from intgen.driver import state_digest

    table1 = summary["table1"] | {"units": matched_units(run.scan("verify", VERIFY_SCHEMA))}
    run.write_json("analysis.json", {"table1": table1, "funnel": {
        k: v for k, v in summary.items() if k not in ("table1", "tokens_by_stage")},
        "exported_from": state_digest(run, STAGES)})


def config_rows(dataset_dir: Path) -> dict[str, int]:
    """The rows of each config an exported dataset folder holds."""
    found = {name: sorted((dataset_dir / name).glob("train-*.parquet")) for name in CONFIGS}
    return {name: pl.scan_parquet(files).select(pl.len()).collect().item() for name, files in found.items() if files}


def export_file(dataset_dir: Path, config_name: str) -> Path:
    """The parquet file of one config in an exported dataset folder."""
    [path] = sorted((dataset_dir / config_name).glob("train-*.parquet"))
    return path


# --- the funnel and the card ----------------------------------------------------------------------

def funnel(run: RunDir, skipped_rows: int = 0) -> dict[str, Any]:
    stages = run.manifest()["stages"]
    sample, graded, proposals, verify = (stages[name] for name in STAGE_NAMES)
    tokens = {name: stages[name].get("calls", {}) for name in MODEL_STAGES}
    costs = [t.get("cost_usd") for t in tokens.values()]
    return {
        "problems": sample.get("problems"),
        "skipped_problem_rows": skipped_rows,
        "decontamination": {k: v for k, v in (stages.get("problems", {}).get("decontamination") or {}).items()
                            if k != "dropped_ids"} or None,
        "problems_without_reference": proposals.get("problems_without_reference", 0),
        "attempts": sample["rows"],
        "correct": graded["correct"],
        "incorrect": graded["incorrect"],
        "ungradable": graded["ungradable"],
        "problems_selected": graded["problems_selected"],
        "proposals": proposals["rows"],
        "rejected": proposals["rejected_by_reason"],
        "accepted": verify.get("accepted", 0),
        "not_verified": verify.get("not_verified", 0),
        "verified": verify["verified"],
        "kept": verify["kept"],
        "problems_with_kept": verify["problems_with_kept"],
        "intervention_continuations": verify["intervention_continuations"],
        "top_up_continuations": verify.get("top_up_continuations", 0),
        "intervention_correct": verify["intervention_correct"],
        "table1": verify["table1"],
        "keep_rule": verify.get("keep_rule") or {"rule": "paper", "min_success": None},
        "lift": verify.get("lift"),
        "failed": {name: stages[name].get("failed_rows", {}) for name in STAGE_NAMES
                   if stages[name].get("failed_rows")},
        "prompt_tokens": sum(t.get("prompt_tokens", 0) for t in tokens.values()),
        "completion_tokens": sum(t.get("completion_tokens", 0) for t in tokens.values()),
        "tokens_by_stage": {s: (t.get("prompt_tokens", 0), t.get("completion_tokens", 0),
                                t.get("cached_prompt_tokens", 0)) for s, t in tokens.items()},
        "cost_usd": None if any(c is None for c in costs) else round(sum(costs), 6),
    }
