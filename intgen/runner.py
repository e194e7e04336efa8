"""Drives stages over a run directory: batches of rows, each written atomically, progress in the manifest.

Each stage reads the previous stage's table part by part and writes one part per input part (the
`sample` stage: one per `batch_size` problems), so memory does not grow with the run. A finished part
(one without failed rows) is never computed again; a part with failures is recomputed, and the call
cache makes its good samples free. A stage's fingerprint (what it was computed from, including the
previous stage's fingerprint) is kept in the manifest: asking for a stage with other settings is
refused unless `force`, which recomputes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import polars as pl
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from intgen.backends.base import ERROR, Backend, Sampling, make_request
from intgen.calls import CallStats, Price, run_requests
from intgen.grading import are_equivalent, grade_many, grader_version
from intgen.resources import file_sha256, resource_path
from intgen.rundir import RunDir
from intgen.stages import grade as grade_stage
from intgen.stages import propose as propose_stage
from intgen.stages import sample as sample_stage
from intgen.stages import verify as verify_stage
from intgen.stages.verify import Condition
from intgen.steps import split_steps


class StageConfigChanged(RuntimeError):
    """A stage already in the run directory was computed with other settings."""


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def check_fingerprint(
    run: RunDir, stage: str, fingerprint: dict[str, Any], force: bool, companions: tuple[str, ...] = (),
    inputs: str | None = None,
) -> dict[str, Any]:
    """Start (or resume) a stage. Returns its previous manifest entry when its finished parts may be
    kept; otherwise clears the stage (and its companion tables) and returns {}. The fingerprint (the
    settings) is recorded before any work, so a killed stage resumes with its parts. `inputs` stands for
    the content of the stage's input table: when only it changed (an upstream failure was retried), the
    stage is recomputed without asking."""
    entry = run.manifest()["stages"].get(stage, {})
    old = entry.get("fingerprint")
    if old == fingerprint and entry.get("inputs") == inputs:
        return entry
    if old is not None and not force:
        changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        details = "; ".join(f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed)
        raise StageConfigChanged(
            f"{run.path}: stage {stage!r} was computed with other settings ({details}). "
            "Use another --run-dir, or pass --force to recompute it (cached model calls are reused)."
        )
    for name in (stage, *companions):  # parts without a matching fingerprint are of unknown origin
        run.clear_stage(name)
    run.record_stage(stage, {"status": "running", "fingerprint": fingerprint, "inputs": inputs})
    return {}


def stage_fingerprint(run: RunDir, stage: str) -> str:
    """A digest of a finished stage's settings (they chain: a stage's settings include its input's)."""
    return digest(_finished(run, stage)["fingerprint"])


def stage_content(run: RunDir, stage: str) -> str:
    """A digest standing for a finished stage's output: its settings, row count and failures."""
    entry = _finished(run, stage)
    return digest([entry["fingerprint"], entry.get("inputs"), entry["rows"], entry.get("failed_rows")])


def _finished(run: RunDir, stage: str) -> dict[str, Any]:
    entry = run.manifest()["stages"].get(stage)
    if entry is None or not str(entry.get("status", "")).startswith("done"):
        raise FileNotFoundError(f"{run.path}: the {stage!r} stage has not finished; run it first")
    return entry


@contextmanager
def stage_progress(stage: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    with Progress(
        TextColumn(f"[bold]{stage:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
    ) as progress:
        task = progress.add_task(stage, total=total)
        yield lambda n: progress.advance(task, n)


def _part_is_finished(run: RunDir, stage: str, index: int) -> bool:
    if not run.has_part(stage, index):
        return False
    part = pl.scan_parquet(run.part_path(stage, index))
    if "error" not in part.collect_schema().names():
        return True
    return part.select(pl.col("error").is_not_null().sum()).collect().item() == 0


def _entry(
    run: RunDir, stage: str, fingerprint: dict[str, Any], previous: dict[str, Any], stats: CallStats | None,
    price: Price | None, extra: dict[str, Any],
) -> dict[str, Any]:
    table = run.scan(stage)
    names = table.collect_schema().names()
    rows = table.select(pl.len()).collect().item()
    inputs = run.manifest()["stages"][stage].get("inputs")  # recorded by check_fingerprint
    entry: dict[str, Any] = {"status": "done", "fingerprint": fingerprint, "inputs": inputs, "rows": rows, **extra}
    if "error" in names:
        failures = (
            table.filter(pl.col("error").is_not_null())
            .select(pl.col("error").str.split(":").list.first().alias("reason"))
            .group_by("reason").len().collect()
        )
        entry["failed_rows"] = dict(zip(failures["reason"].to_list(), failures["len"].to_list()))
        if failures.height:
            entry["status"] = "done_with_failures"
    if stats is not None:
        total = CallStats()
        old = previous.get("calls", {})
        for name in ("samples", "cache_hits", "requests_sent", "prompt_tokens", "completion_tokens", "seconds"):
            setattr(total, name, old.get(name, 0))
        total.add(stats)
        entry["calls"] = total.to_dict(price)
        entry["last_run"] = stats.to_dict(price)
    run.record_stage(stage, entry)
    return entry


# --- sample ---------------------------------------------------------------------------------------

def run_sample(
    run: RunDir,
    problems: pl.DataFrame,
    backend: Backend,
    *,
    samples: int,
    sampling: Sampling,
    prompt: str = "solve.md",
    system_prompt: str | None = None,
    batch_size: int = 64,
    price: Price | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """K attempts per problem into `RUN/samples/`; the problems go to `RUN/problems/`."""
    prompt_file = resource_path("prompts", prompt)
    template = prompt_file.read_text(encoding="utf-8")
    fingerprint = {
        "problems": digest(problems["problem_id"].to_list()),
        "backend": backend.kind,
        "model": backend.model,
        "samples": samples,
        "sampling": sampling.to_dict(),
        "prompt_sha256": file_sha256(prompt_file),
        "system_prompt": system_prompt,
        "batch_size": batch_size,
    }
    previous = check_fingerprint(run, "samples", fingerprint, force, companions=("problems",))
    run.write_part("problems", 0, problems)
    stats = CallStats()
    with stage_progress("sample", problems.height, progress) as advance:
        for index, start in enumerate(range(0, problems.height, batch_size)):
            batch = problems.slice(start, batch_size)
            if not _part_is_finished(run, "samples", index):
                rows = batch.to_dicts()
                requests = sample_stage.sample_requests(rows, template, sampling, samples, system_prompt)
                completions = run_requests(backend, requests, run.cache, stats)
                frame = pl.DataFrame(sample_stage.attempt_rows(rows, completions), schema=sample_stage.ATTEMPT_SCHEMA)
                run.write_part("samples", index, frame)
            advance(batch.height)
    truncated = run.scan("samples").select(pl.col("truncated").sum()).collect().item()
    return _entry(run, "samples", fingerprint, previous, stats, price,
                  {"prompt_file": prompt_file.name, "problems": problems.height, "truncated": truncated})


# --- grade ----------------------------------------------------------------------------------------

def run_grade(
    run: RunDir, *, workers: int = 2, timeout: float = 5.0, lenient: bool = False, hard_only: bool = False,
    hard_threshold: float = 0.0, force: bool = False, progress: bool = True,
) -> dict[str, Any]:
    """Verdicts for every attempt into `RUN/graded/`; pass rates per problem into `RUN/pass_rates/`."""
    fingerprint = {
        "samples": stage_fingerprint(run, "samples"),
        "grader": grader_version(),
        "timeout": timeout,
        "lenient": lenient,
        "hard_only": hard_only,
        "hard_threshold": hard_threshold,
    }
    previous = check_fingerprint(run, "graded", fingerprint, force, companions=("pass_rates",),
                                 inputs=stage_content(run, "samples"))
    answers = dict(run.table("problems").select("problem_id", "answer").iter_rows())
    parts = run.parts("samples")
    total = run.scan("samples").select(pl.len()).collect().item()
    with stage_progress("grade", total, progress) as advance:
        for index, part in enumerate(parts):
            attempts = pl.read_parquet(part)
            if not _part_is_finished(run, "graded", index):
                rows = attempts.to_dicts()
                todo = [i for i, row in enumerate(rows) if grade_stage.needs_grading(row) is None]
                verdicts = grade_many(
                    [answers[rows[i]["problem_id"]] for i in todo], [rows[i]["text"] for i in todo],
                    workers=workers, timeout=timeout, lenient=lenient,
                )
                columns = pl.DataFrame(
                    grade_stage.verdict_columns(rows, dict(zip(todo, verdicts))), schema=grade_stage.GRADE_COLUMNS
                )
                run.write_part("graded", index, pl.concat([attempts, columns], how="horizontal"))
            advance(attempts.height)
    rates = grade_stage.pass_rates(run.scan("graded")).collect()
    rates = rates.with_columns(
        (pl.col("pass_rate") <= hard_threshold if hard_only else pl.lit(True)).alias("selected")
    )
    run.write_part("pass_rates", 0, rates)
    graded = run.scan("graded")
    counts = graded.select(
        (pl.col("correct") == True).sum().alias("correct"),  # noqa: E712
        (pl.col("correct") == False).sum().alias("incorrect"),  # noqa: E712
        pl.col("correct").is_null().sum().alias("ungradable"),
    ).collect().row(0, named=True)
    reasons = graded.filter(pl.col("correct").is_null()).group_by("grade_reason").len().collect()
    return _entry(run, "graded", fingerprint, previous, None, None, {
        **counts,
        "ungradable_by_reason": dict(zip(reasons["grade_reason"].to_list(), reasons["len"].to_list())),
        "problems_selected": int(rates["selected"].sum()),
        "mean_pass_rate": float(rates["pass_rate"].mean() or 0.0),
    })


# --- propose --------------------------------------------------------------------------------------

PROPOSAL_SCHEMA = {
    "problem_id": pl.String, "attempt_id": pl.String, "proposal_id": pl.String, "proposal_index": pl.Int32,
    "num_steps": pl.Int32, "error_step": pl.Int32, "intervention": pl.String, "verification": pl.String,
    "intervened_text": pl.String, "accepted": pl.Boolean, "reject_reason": pl.String, "raw": pl.String,
    "finish_reason": pl.String, "error": pl.String, "prompt_tokens": pl.Int64, "completion_tokens": pl.Int64,
}


def run_propose(
    run: RunDir,
    backend: Backend,
    *,
    proposals: int,
    sampling: Sampling,
    style: str = "two-turn",
    structured: bool = True,
    include_truncated: bool = False,
    grade_workers: int = 2,
    grade_timeout: float = 5.0,
    price: Price | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """P proposals for each failed attempt into `RUN/proposals/` (accepted or rejected, with the reason)."""
    prompt_files = (
        [resource_path("prompts", "propose_reference.md"), resource_path("prompts", "propose_critique.md")]
        if style == "two-turn" else [resource_path("prompts", "propose_single.md")]
    )
    fingerprint = {
        "graded": stage_fingerprint(run, "graded"),
        "backend": backend.kind,
        "model": backend.model,
        "proposals": proposals,
        "sampling": sampling.to_dict(),
        "style": style,
        "structured": structured,
        "include_truncated": include_truncated,
        "prompts_sha256": [file_sha256(p) for p in prompt_files],
    }
    previous = check_fingerprint(run, "proposals", fingerprint, force, inputs=stage_content(run, "graded"))
    problems = {row["problem_id"]: row for row in run.table("problems").iter_rows(named=True)}
    selected = set(run.table("pass_rates").filter("selected")["problem_id"].to_list())
    templates = [p.read_text(encoding="utf-8") for p in prompt_files]
    stats = CallStats()
    parts = run.parts("graded")
    with stage_progress("propose", len(parts), progress) as advance:
        for index, part in enumerate(parts):
            if not _part_is_finished(run, "proposals", index):
                failed = pl.read_parquet(part).filter(
                    pl.col("problem_id").is_in(list(selected))
                    & ((pl.col("correct") == False) | (pl.lit(include_truncated) & pl.col("truncated")))  # noqa: E712
                ).to_dicts()
                rows = _propose_batch(run, backend, failed, problems, templates, proposals, sampling, structured,
                                      grade_workers, grade_timeout, stats)
                run.write_part("proposals", index, pl.DataFrame(rows, schema=PROPOSAL_SCHEMA))
            advance(1)
    table = run.scan("proposals")
    rejected = table.filter(~pl.col("accepted")).group_by("reject_reason").len().collect()
    accepted = table.select(pl.col("accepted").sum()).collect().item()
    attempts = table.select(pl.col("attempt_id").n_unique()).collect().item()
    return _entry(run, "proposals", fingerprint, previous, stats, price, {
        "attempts": attempts, "accepted": accepted,
        "rejected_by_reason": dict(zip(rejected["reject_reason"].to_list(), rejected["len"].to_list())),
        "prompt_files": [p.name for p in prompt_files],
    })


def _propose_batch(
    run: RunDir, backend: Backend, failed: list[dict[str, Any]], problems: dict[str, dict[str, Any]],
    templates: list[str], proposals: int, sampling: Sampling, structured: bool, grade_workers: int,
    grade_timeout: float, stats: CallStats,
) -> list[dict[str, Any]]:
    two_turn = len(templates) == 2
    steps_of = {a["attempt_id"]: split_steps(a["text"]) for a in failed}
    turn1: dict[str, tuple[list[dict[str, str]], str]] = {}
    if two_turn:  # turn 1: the proposer solves each problem guided by its reference (one call per problem)
        ids = sorted({a["problem_id"] for a in failed})
        messages = [
            propose_stage.reference_messages(problems[i]["problem"], problems[i]["solution"] or "", templates[0])
            for i in ids
        ]
        outs = run_requests(backend, [make_request(m, sampling) for m in messages], run.cache, stats)
        turn1 = {i: (m, out[0].text) for i, m, out in zip(ids, messages, outs) if out[0].error is None}
    requests, owners = [], []
    rows: list[dict[str, Any]] = []
    for attempt in failed:
        problem = problems[attempt["problem_id"]]
        steps = steps_of[attempt["attempt_id"]]
        base = {"problem_id": attempt["problem_id"], "attempt_id": attempt["attempt_id"], "num_steps": len(steps)}
        if not steps or (two_turn and attempt["problem_id"] not in turn1):
            reason = propose_stage.NO_STEPS if not steps else propose_stage.CALL_FAILED
            rows += [_rejected(base, j, reason) for j in range(proposals)]
            continue
        messages = propose_stage.critique_messages(
            problem["problem"], problem["solution"] or "", steps, templates[-1], turn1.get(attempt["problem_id"])
        )
        schema = propose_stage.proposal_schema(len(steps)) if structured else None
        requests.append(make_request(messages, sampling, n=proposals, json_schema=schema))
        owners.append((attempt, base))
    completions = run_requests(backend, requests, run.cache, stats)
    pending: list[dict[str, Any]] = []
    for (attempt, base), outs in zip(owners, completions):
        for j, out in enumerate(outs):
            row = _rejected(base, j, None) | {
                "raw": out.text, "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
            }
            if out.finish_reason == ERROR:
                too_long = "context" in (out.error or "").lower() or "too long" in (out.error or "").lower()
                row |= {"reject_reason": propose_stage.PROMPT_TOO_LONG if too_long else propose_stage.CALL_FAILED,
                        "error": None if too_long else out.error}
                rows.append(row)
                continue
            parsed = propose_stage.parse_proposal(out.text, base["num_steps"])
            row |= {"error_step": parsed.error_step, "intervention": parsed.intervention,
                    "verification": parsed.verification, "reject_reason": parsed.reject_reason}
            if parsed.reject_reason is None:
                steps = steps_of[attempt["attempt_id"]]
                row["intervened_text"] = verify_stage.intervened_text(steps, parsed.error_step, parsed.intervention)
                pending.append(row)
            rows.append(row)
    _mark_leaks(pending, problems, grade_workers, grade_timeout)
    return rows


def _rejected(base: dict[str, Any], index: int, reason: str | None) -> dict[str, Any]:
    return {**base, "proposal_id": propose_stage.proposal_id(base["attempt_id"], index), "proposal_index": index,
            "error_step": None, "intervention": None, "verification": None, "intervened_text": None,
            "accepted": False, "reject_reason": reason, "raw": None, "finish_reason": None, "error": None,
            "prompt_tokens": 0, "completion_tokens": 0}


def _mark_leaks(rows: list[dict[str, Any]], problems: dict[str, dict[str, Any]], workers: int, timeout: float) -> None:
    """Accept each parsed proposal unless a stand-alone answer in its intervention equals the gold answer."""
    pairs, owners = [], []
    for n, row in enumerate(rows):
        for candidate in propose_stage.leak_candidates(row["intervention"]):
            pairs.append((problems[row["problem_id"]]["answer"], candidate))
            owners.append(n)
    leaks = {owners[k] for k, same in enumerate(are_equivalent(pairs, workers, timeout) if pairs else []) if same}
    for n, row in enumerate(rows):
        if n in leaks:
            row["reject_reason"] = propose_stage.LEAKS_ANSWER
            row["intervened_text"] = None
        else:
            row["accepted"] = True


# --- verify ---------------------------------------------------------------------------------------

CONTINUATION_SCHEMA = {
    "continuation_id": pl.String, "proposal_id": pl.String, "problem_id": pl.String, "condition": pl.String,
    "prefix_chars": pl.Int64, "text": pl.String, "finish_reason": pl.String, "true_continuation": pl.Boolean,
    "correct": pl.Boolean, "predicted": pl.String, "grade_reason": pl.String, "error": pl.String,
    "completion_tokens": pl.Int64,
}
VERIFY_SCHEMA = {
    "proposal_id": pl.String, "problem_id": pl.String, "attempt_id": pl.String, "condition": pl.String,
    "continuations": pl.Int32, "successes": pl.Int32, "ungradable": pl.Int32, "success_rate": pl.Float64,
    "true_continuation": pl.Boolean, "kept": pl.Boolean, "error": pl.String,
}


def run_verify(
    run: RunDir,
    backend: Backend,
    *,
    continuations: int,
    sampling: Sampling,
    min_success: int = 1,
    conditions: tuple[str, ...] = ("intervention",),
    solve_prompt: str = "solve.md",
    system_prompt: str | None = None,
    grade_workers: int = 2,
    grade_timeout: float = 5.0,
    lenient: bool = False,
    price: Price | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """M continuations per accepted proposal and condition into `RUN/continuations/`; success counts
    and rates into `RUN/verify/` (`kept`: the intervention condition with at least `min_success`)."""
    prompt_file = resource_path("prompts", solve_prompt)
    template = prompt_file.read_text(encoding="utf-8")
    chosen = [Condition(c) for c in conditions]
    fingerprint = {
        "proposals": stage_fingerprint(run, "proposals"),
        "backend": backend.kind,
        "model": backend.model,
        "continuations": continuations,
        "sampling": sampling.to_dict(),
        "min_success": min_success,
        "conditions": [c.value for c in chosen],
        "prompt_sha256": file_sha256(prompt_file),
        "system_prompt": system_prompt,
        "lenient": lenient,
    }
    previous = check_fingerprint(run, "verify", fingerprint, force, companions=("continuations",),
                                 inputs=stage_content(run, "proposals"))
    problems = {row["problem_id"]: row for row in run.table("problems").iter_rows(named=True)}
    stats = CallStats()
    parts = run.parts("proposals")
    with stage_progress("verify", len(parts), progress) as advance:
        for index, part in enumerate(parts):
            if not (_part_is_finished(run, "verify", index) and run.has_part("continuations", index)):
                accepted = pl.read_parquet(part).filter("accepted").to_dicts()
                ids = [p["attempt_id"] for p in accepted]  # only this part's attempts: memory stays flat
                texts = dict(run.scan("samples").filter(pl.col("attempt_id").is_in(ids))
                             .select("attempt_id", "text").collect().iter_rows())
                jobs = []
                for proposal in accepted:
                    steps = split_steps(texts[proposal["attempt_id"]])
                    problem = problems[proposal["problem_id"]]
                    for condition in chosen:
                        prefix = verify_stage.continuation_prefix(
                            steps, proposal["error_step"], proposal["intervention"], condition
                        )
                        messages = sample_stage.solve_messages(problem["problem"], template, system_prompt)
                        messages.append({"role": "assistant", "content": prefix})
                        jobs.append((proposal, condition, prefix,
                                     make_request(messages, sampling, n=continuations, continue_final=True)))
                outs = run_requests(backend, [job[3] for job in jobs], run.cache, stats)
                cont_rows, verify_rows = _verify_rows(jobs, outs, problems, min_success, grade_workers, grade_timeout,
                                                      lenient)
                run.write_part("continuations", index, pl.DataFrame(cont_rows, schema=CONTINUATION_SCHEMA))
                run.write_part("verify", index, pl.DataFrame(verify_rows, schema=VERIFY_SCHEMA))
            advance(1)
    table = run.scan("verify")
    by_condition = table.group_by("condition").agg(
        pl.len().alias("proposals"),
        (pl.col("successes") > 0).sum().alias("solved"),
        pl.col("success_rate").mean().alias("mean_success_rate"),
    ).collect()
    kept = table.select(pl.col("kept").sum()).collect().item()
    return _entry(run, "verify", fingerprint, previous, stats, price, {
        "kept": kept,
        "continuation_rows": run.scan("continuations").select(pl.len()).collect().item(),
        "by_condition": {row["condition"]: {k: row[k] for k in ("proposals", "solved", "mean_success_rate")}
                         for row in by_condition.iter_rows(named=True)},
    })


def _verify_rows(
    jobs: list[tuple[dict[str, Any], Condition, str, Any]], outs: list[list[Any]], problems: dict[str, dict[str, Any]],
    min_success: int, workers: int, timeout: float, lenient: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    golds, texts, where = [], [], []
    for j, ((proposal, _, prefix, _), completions) in enumerate(zip(jobs, outs)):
        for m, c in enumerate(completions):
            if c.error is None and c.finish_reason != "length":
                golds.append(problems[proposal["problem_id"]]["answer"])
                texts.append(prefix + c.text)
                where.append((j, m))
    verdicts = dict(zip(where, grade_many(golds, texts, workers=workers, timeout=timeout, lenient=lenient)))
    cont_rows, verify_rows = [], []
    for j, ((proposal, condition, prefix, _), completions) in enumerate(zip(jobs, outs)):
        successes = ungradable = 0
        errors = [c.error for c in completions if c.error is not None]
        for m, c in enumerate(completions):
            verdict = verdicts.get((j, m))
            reason = verdict.reason if verdict else ("sample_error" if c.error else grade_stage.TRUNCATED)
            correct = verdict.correct if verdict else None
            successes += correct is True
            ungradable += correct is None
            cont_rows.append({
                "continuation_id": verify_stage.continuation_id(proposal["proposal_id"], condition, m),
                "proposal_id": proposal["proposal_id"], "problem_id": proposal["problem_id"],
                "condition": condition.value, "prefix_chars": len(prefix), "text": c.text,
                "finish_reason": c.finish_reason, "true_continuation": c.true_continuation, "correct": correct,
                "predicted": verdict.predicted if verdict else None, "grade_reason": reason, "error": c.error,
                "completion_tokens": c.completion_tokens,
            })
        verify_rows.append({
            "proposal_id": proposal["proposal_id"], "problem_id": proposal["problem_id"],
            "attempt_id": proposal["attempt_id"], "condition": condition.value, "continuations": len(completions),
            "successes": successes, "ungradable": ungradable,
            "success_rate": successes / len(completions) if completions else 0.0,
            "true_continuation": all(c.true_continuation for c in completions),
            "kept": condition is Condition.intervention and successes >= min_success and not errors,
            "error": errors[0] if errors else None,
        })
    return cont_rows, verify_rows
