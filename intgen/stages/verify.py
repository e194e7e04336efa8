"""verify: does the intervention fix the attempt? Continue from `steps before the error + intervention`.

The continuation is the same assistant turn (true prefill), never a new user turn. Which proposals are
verified: the first accepted one of each attempt (as the release, which keeps one proposal per attempt before
verifying), or every accepted one (`all_proposals`). The same machinery runs the paper's comparison conditions,
each continued from a different prefix of the same attempt:

- `intervention`: the steps before the error, then the intervention (the InT condition), per verified proposal;
- `original-step`: the steps up to and including the original wrong step;
- `resample-step`: the steps before the error (the model re-writes the step itself);
- `problem-only`: nothing (a fresh attempt).

The baselines are run for one **matched unit** per problem, chosen before any continuation is seen: the first
verified proposal of the first failed attempt that has one, and the baselines of that same attempt and error
step. With `baselines="every"` the step baselines (`original-step`, `resample-step`) also run for every other
verified proposal's attempt and step (once per attempt and step), so that each verified intervention carries its
own matched baseline and its lift (`intgen.lift`); Table 1 still counts only the matched units. Every condition
of the unit gets M continuations, so Table 1 (`intgen.dataset.analysis`) compares the conditions at equal budgets
on the same problems. Each condition is its own independent draw: its requests carry their own draw label and a
seed derived from the run's, so no continuation repeats a sampled attempt (which the cache, or vLLM's
seed-per-request sampling, would otherwise serve) or another condition's continuation.

An empty prefix is sent as a fresh generation (a new assistant turn), never as an empty assistant message to
continue: chat templates close such a message, and the model would then write outside any assistant turn. A
continuation is graded on its own text, as the release grades it: a `\boxed{}` in the prefix (the original
wrong step's, say) never counts.

One separator convention: the intervention prefix is `intervened_text` exactly — the steps before the error
as they stood (each with its trailing whitespace) and the intervention, stripped, with nothing after it — and
the dataset's SFT completion is the same text, so what was verified is what is trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import polars as pl

from intgen.backends.base import STOP, TOO_LONG, Completion, Request, Sampling, make_request
from intgen.dataset.analysis import PREFIX_TOO_LONG, table1
from intgen.grading import BOXED, LENIENT, Verdict, provisional
from intgen.lift import KeepRule, fisher_greater, lift, top_up_due, two_stage_kept
from intgen.resources import Prompt
from intgen.stages import Compute, Grading, ModelCalls, Part, Stage
from intgen.stages.grade import SAMPLE_ERROR, TRUNCATED
from intgen.stages.sample import solve_messages
from intgen.steps import join_steps, steps_at


class Condition(str, Enum):
    intervention = "intervention"
    original_step = "original-step"
    resample_step = "resample-step"
    problem_only = "problem-only"


STEP_BASELINES = (Condition.original_step, Condition.resample_step)


class Baselines(str, Enum):
    matched = "matched"  # the baselines of each problem's matched unit only (Table 1)
    every = "every"  # and the step baselines of every verified proposal's attempt and step (each one's lift)


def prefix_id(condition: Condition, proposal: dict[str, Any]) -> str:
    """The id of what a condition continues from: the proposal for `intervention`; the attempt and its error
    step for the two step baselines; the problem for `problem-only`."""
    if condition is Condition.intervention:
        return proposal["proposal_id"]
    if condition is Condition.problem_only:
        return f"{proposal['problem_id']}/{condition.value}"
    return f"{proposal['attempt_id']}/s{proposal['error_step']}/{condition.value}"


def continuation_id(prefix: str, index: int) -> str:
    return f"{prefix}/c{index}"


def intervened_text(steps: list[str], error_step: int, intervention: str) -> str:
    """The attempt's own steps before the error, then the intervention: what SFT trains on (never the suffix)."""
    return join_steps(steps[: error_step - 1]) + intervention.strip()


def continuation_prefix(steps: list[str], error_step: int, intervention: str, condition: Condition) -> str:
    """The assistant-message prefix each condition continues from (1-based `error_step`)."""
    if condition is Condition.intervention:
        return intervened_text(steps, error_step, intervention)
    if condition is Condition.original_step:
        return join_steps(steps[:error_step])
    if condition is Condition.resample_step:
        return join_steps(steps[: error_step - 1])
    return ""


def draw_seed(seed: int | None, draw: str) -> int | None:
    """The seed of one independent draw, derived from the run's seed (None stays None). Engines that take a
    seed per request (vLLM) sample the same texts for the same seed: a condition sharing the sample stage's seed
    would repeat the very attempts that failed."""
    if seed is None:
        return None
    return int.from_bytes(hashlib.sha256(f"{seed}/{draw}".encode()).digest()[:4], "big") >> 1


# --- the stage ----------------------------------------------------------------------------------

CONTINUATION_SCHEMA = {
    "continuation_id": pl.String, "prefix_id": pl.String, "proposal_id": pl.String, "problem_id": pl.String,
    "condition": pl.String, "matched": pl.Boolean, "prefix_chars": pl.Int64, "text": pl.String,
    "finish_reason": pl.String, "true_continuation": pl.Boolean, "correct": pl.Boolean, "predicted": pl.String,
    "grade_reason": pl.String, "error": pl.String, "completion_tokens": pl.Int64,
    "top_up": pl.Boolean,  # one of --top-up's N more (ids c{M} on; never in Table 1)
}
VERIFY_SCHEMA = {
    "prefix_id": pl.String, "condition": pl.String, "matched": pl.Boolean, "problem_id": pl.String,
    "attempt_id": pl.String, "proposal_id": pl.String, "error_step": pl.Int32, "prefix_chars": pl.Int64,
    "continuations": pl.Int32, "successes": pl.Int32, "ungradable": pl.Int32, "success_rate": pl.Float64,
    "true_continuation": pl.Boolean, "kept": pl.Boolean, "error": pl.String,
    # an intervention row's matched baselines (the same attempt and step; null where not run) and its lift
    "baseline_successes": pl.Int32, "baseline_continuations": pl.Int32,
    "resample_successes": pl.Int32, "resample_continuations": pl.Int32,
    "lift": pl.Float64, "lift_p": pl.Float64,
    # --top-up: the N more continuations of a borderline intervention and of its original-step baseline (lift and
    # lift_p are then of all M + N per arm; successes and continuations stay the first M, as Table 1 counts)
    "top_up_successes": pl.Int32, "top_up_continuations": pl.Int32,
    "baseline_top_up_successes": pl.Int32, "baseline_top_up_continuations": pl.Int32,
}
LIFT_COLUMNS = tuple(list(VERIFY_SCHEMA)[list(VERIFY_SCHEMA).index("baseline_successes"):])


@dataclass(frozen=True)
class VerifySettings:
    continuations: int
    sampling: Sampling
    solve_prompt: Prompt
    system_prompt: str | None = None
    min_success: int = 1
    conditions: tuple[Condition, ...] = (Condition.intervention,)
    lenient: bool = False
    all_proposals: bool = False  # verify every accepted proposal, not only the first of each attempt
    baselines: Baselines = Baselines.matched
    keep_rule: KeepRule = KeepRule.paper
    alpha: float = 0.05  # the lift rule's threshold on the one-sided Fisher p
    top_up: int = 0  # N more continuations per arm for a borderline verdict (two-stage: alpha split in two)
    top_up_below: float = 0.5  # borderline: a first-stage p above alpha/2 and at most this

    @property
    def topping_up(self) -> bool:
        return self.top_up > 0 and self.keep_rule is KeepRule.lift

    @property
    def first_alpha(self) -> float:
        """The first look's level: alpha, or alpha/2 where a second look may follow (--top-up)."""
        return self.alpha / 2 if self.topping_up else self.alpha


@dataclass(frozen=True)
class Job:
    """One verify request: a prefix, the condition it stands for, the proposal it was made for (for a baseline,
    its problem's matched proposal) and whether it is part of the problem's matched unit (Table 1)."""

    prefix_id: str
    condition: Condition
    proposal: dict[str, Any]
    prefix: str
    request: Request
    matched: bool
    top_up: bool = False


def fingerprint(s: VerifySettings) -> dict[str, Any]:
    return {
        "continuations": s.continuations, "sampling": s.sampling.to_dict(), "min_success": s.min_success,
        "conditions": [c.value for c in s.conditions], "prompt_sha256": s.solve_prompt.sha256,
        "system_prompt": s.system_prompt, "lenient": s.lenient, "all_proposals": s.all_proposals,
        "baselines": s.baselines.value, "keep_rule": s.keep_rule.value, "alpha": s.alpha,
        **({"top_up": s.top_up, "top_up_below": s.top_up_below} if s.top_up else {}),
    }


def continuation_request(problem: str, prefix: str, condition: Condition, s: VerifySettings,
                         top_up: bool = False) -> Request:
    """Continue `prefix` as the assistant's own turn (an empty prefix is a fresh generation), as the condition's
    own draw; `top_up`: --top-up's N more, a draw of their own (another seed and cache key)."""
    draw = f"verify/{condition.value}" + ("/top-up" if top_up else "")
    sampling = replace(s.sampling, seed=draw_seed(s.sampling.seed, draw))
    n = s.top_up if top_up else s.continuations
    messages = solve_messages(problem, s.solve_prompt.text, s.system_prompt)
    if not prefix:
        return make_request(messages, sampling, n=n, draw=draw)
    messages.append({"role": "assistant", "content": prefix})
    return make_request(messages, sampling, n=n, continue_final=True, draw=draw)


def _attempt_order(proposal: dict[str, Any]) -> tuple[int, int]:
    """Attempts a0, a1, ... in order; within one, proposals p0, p1, ..."""
    return int(proposal["attempt_id"].rsplit("/a", 1)[1]), proposal["proposal_index"]


def to_verify(proposals: list[dict[str, Any]], all_proposals: bool) -> list[dict[str, Any]]:
    """The proposals to verify, in attempt order: the first accepted one of each attempt, or every accepted one."""
    accepted = sorted((p for p in proposals if p["accepted"]), key=_attempt_order)
    if all_proposals:
        return accepted
    seen: set[str] = set()
    first = []
    for proposal in accepted:
        if proposal["attempt_id"] not in seen:
            seen.add(proposal["attempt_id"])
            first.append(proposal)
    return first


def matched_proposals(verified: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each problem's matched unit: its first verified proposal (of its first failed attempt that has one)."""
    first: dict[str, dict[str, Any]] = {}
    for proposal in verified:
        first.setdefault(proposal["problem_id"], proposal)
    return first


def verify_jobs(proposals: list[dict[str, Any]], problems: dict[str, dict[str, Any]], texts: dict[str, str],
                s: VerifySettings) -> list[Job]:
    """The intervention of every proposal to verify, and the baselines of each problem's matched unit."""
    verified = to_verify(proposals, s.all_proposals)
    matched = matched_proposals(verified)
    every = (Condition.intervention, *(c for c in STEP_BASELINES if c in s.conditions))
    jobs, seen = [], set()
    for proposal in verified:
        unit = matched[proposal["problem_id"]] is proposal
        conditions = s.conditions if unit else every if s.baselines is Baselines.every else (Condition.intervention,)
        steps = steps_at(texts[proposal["attempt_id"]], proposal["step_ends"])  # exactly the steps propose numbered
        problem = problems[proposal["problem_id"]]["problem"]
        for condition in conditions:
            if (pid := prefix_id(condition, proposal)) in seen:  # a step baseline another proposal already has
                continue
            seen.add(pid)
            prefix = continuation_prefix(steps, proposal["error_step"], proposal["intervention"], condition)
            request = continuation_request(problem, prefix, condition, s)
            jobs.append(Job(pid, condition, proposal, prefix, request, unit))
    return jobs


def continuation_row(job: Job, index: int, c: Completion, verdict: Verdict | None) -> dict[str, Any]:
    reason = verdict.reason if verdict else (
        SAMPLE_ERROR if c.error else PREFIX_TOO_LONG if c.finish_reason == TOO_LONG else TRUNCATED)
    return {
        "continuation_id": continuation_id(job.prefix_id, index), "prefix_id": job.prefix_id,
        "proposal_id": job.proposal["proposal_id"], "problem_id": job.proposal["problem_id"],
        "condition": job.condition.value, "matched": job.matched, "prefix_chars": len(job.prefix),
        "text": c.text, "finish_reason": c.finish_reason, "true_continuation": c.true_continuation,
        "correct": verdict.correct if verdict else None, "predicted": verdict.predicted if verdict else None,
        "grade_reason": reason, "error": c.error or (provisional(verdict) if verdict else None),
        "completion_tokens": c.completion_tokens, "top_up": job.top_up,
    }


def verify_row(job: Job, rows: list[dict[str, Any]], completions: list[Completion], min_success: int) -> dict[str, Any]:
    """A prefix's success count and rate; `kept`: the intervention condition with at least `min_success`
    correct continuations, all of which arrived."""
    successes = sum(row["correct"] is True for row in rows)
    errors = [row["error"] for row in rows if row["error"] is not None]  # failed calls and grading timeouts
    problem_only = job.condition is Condition.problem_only
    return {
        "prefix_id": job.prefix_id, "condition": job.condition.value, "matched": job.matched,
        "problem_id": job.proposal["problem_id"], "attempt_id": None if problem_only else job.proposal["attempt_id"],
        "proposal_id": job.proposal["proposal_id"], "error_step": None if problem_only else job.proposal["error_step"],
        "prefix_chars": len(job.prefix), "continuations": len(completions), "successes": successes,
        "ungradable": sum(row["correct"] is None for row in rows),
        "success_rate": successes / len(completions) if completions else 0.0,
        "true_continuation": all(c.true_continuation for c in completions),
        "kept": job.condition is Condition.intervention and successes >= min_success and not errors,
        "error": errors[0] if errors else None,
        **dict.fromkeys(LIFT_COLUMNS),  # filled in for intervention rows by `with_lift`
    }


def with_lift(rows: list[dict[str, Any]], s: VerifySettings) -> list[dict[str, Any]]:
    """Each intervention row with its matched step baselines (the same attempt and error step) where they ran
    whole, its lift over the original step and the one-sided Fisher p; under the lift rule, kept only when
    p <= alpha (a missing or failed baseline keeps nothing: the part is retried)."""
    by_prefix = {row["prefix_id"]: row for row in rows}
    out = []
    for row in rows:
        if row["condition"] == Condition.intervention.value:
            base = {c: by_prefix.get(prefix_id(c, row)) for c in STEP_BASELINES}
            base = {c: b for c, b in base.items() if b is not None and b["error"] is None}
            row = dict(row)
            if (r := base.get(Condition.resample_step)) is not None:
                row |= {"resample_successes": r["successes"], "resample_continuations": r["continuations"]}
            if (b := base.get(Condition.original_step)) is not None:
                row |= {"baseline_successes": b["successes"], "baseline_continuations": b["continuations"],
                        **lift_of(row["successes"], row["continuations"], b["successes"], b["continuations"])}
            if s.keep_rule is KeepRule.lift:  # with --top-up, the first of two looks
                row["kept"] = row["kept"] and row["lift_p"] is not None and row["lift_p"] <= s.first_alpha
        out.append(row)
    return out


def lift_of(successes: int, trials: int, base_successes: int, base_trials: int) -> dict[str, float | None]:
    return {"lift": lift(successes, trials, base_successes, base_trials),
            "lift_p": fisher_greater(successes, trials, base_successes, base_trials)}


def top_up_jobs(rows: list[dict[str, Any]], jobs: list[Job], problems: dict[str, dict[str, Any]],
                s: VerifySettings) -> list[Job]:
    """--top-up: N more continuations for each intervention whose first p is borderline and for its original-step
    baseline (once, where two interventions share it)."""
    by_prefix, due = {job.prefix_id: job for job in jobs}, {}
    for row in rows:
        if (row["condition"] == Condition.intervention.value and row["error"] is None and row["lift_p"] is not None
                and row["successes"] >= s.min_success and top_up_due(row["lift_p"], s.alpha, s.top_up_below)):
            for pid in (row["prefix_id"], prefix_id(Condition.original_step, row)):
                if pid not in due:
                    job = by_prefix[pid]
                    request = continuation_request(problems[job.proposal["problem_id"]]["problem"], job.prefix,
                                                   job.condition, s, top_up=True)
                    due[pid] = replace(job, request=request, matched=False, top_up=True)
    return list(due.values())


def with_top_up(rows: list[dict[str, Any]], extra: dict[str, dict[str, Any]], s: VerifySettings,
                ) -> list[dict[str, Any]]:
    """Each topped-up intervention with its and its baseline's N more, the lift and p of all M + N per arm, and
    the second look's verdict (a failed top-up call keeps nothing: the part is retried)."""
    out = []
    for row in rows:
        more, base = extra.get(row["prefix_id"]), extra.get(prefix_id(Condition.original_step, row))
        if row["condition"] == Condition.intervention.value and more is not None and base is not None:
            wins, trials = row["successes"] + more["successes"], row["continuations"] + more["continuations"]
            base_wins = row["baseline_successes"] + base["successes"]
            base_trials = row["baseline_continuations"] + base["continuations"]
            pooled = lift_of(wins, trials, base_wins, base_trials)
            error = more["error"] or base["error"]
            row = row | pooled | {
                "top_up_successes": more["successes"], "top_up_continuations": more["continuations"],
                "baseline_top_up_successes": base["successes"], "baseline_top_up_continuations": base["continuations"],
                "error": row["error"] or error,
                "kept": error is None and row["successes"] >= s.min_success
                and two_stage_kept(row["lift_p"], pooled["lift_p"], s.alpha)}
        out.append(row)
    return out


def continue_and_grade(jobs: list[Job], problems: dict[str, dict[str, Any]], s: VerifySettings, first: int = 0,
                       ) -> Compute:
    """Each job's continuations, graded: [(job, its completions, its continuation rows)]; rows numbered from
    `first` (a top-up's follow the first M)."""
    outs = (yield ModelCalls([job.request for job in jobs])) if jobs else []
    items, where = [], []
    for j, (job, completions) in enumerate(zip(jobs, outs)):
        for m, c in enumerate(completions):
            if c.error is None and c.finish_reason == STOP:  # the continuation alone: the prefix earns nothing
                items.append((problems[job.proposal["problem_id"]]["answer"], c.text, LENIENT if s.lenient else BOXED))
                where.append((j, m))
    verdicts = dict(zip(where, (yield Grading(items)) if items else []))
    return [(job, completions, [continuation_row(job, first + m, c, verdicts.get((j, m)))
                                for m, c in enumerate(completions)])
            for j, (job, completions) in enumerate(zip(jobs, outs))]


def compute(part: Part, s: VerifySettings) -> Compute:
    problems = part.problems()
    texts = {row["attempt_id"]: row["text"] for row in part.tables["samples"]}
    jobs = verify_jobs(part.tables["proposals"], problems, texts, s)
    done = yield from continue_and_grade(jobs, problems, s)
    continuations = [row for _, _, rows in done for row in rows]
    verified = with_lift([verify_row(job, rows, completions, s.min_success) for job, completions, rows in done], s)
    if s.topping_up:
        due = top_up_jobs(verified, jobs, problems, s)
        more = yield from continue_and_grade(due, problems, s, first=s.continuations)
        continuations += [row for _, _, rows in more for row in rows]
        extra = {job.prefix_id: verify_row(job, rows, completions, 0) for job, completions, rows in more}
        verified = with_top_up(verified, extra, s)
    return {"verify": verified, "continuations": continuations}


def summarize(tables: dict[str, pl.LazyFrame], s: VerifySettings) -> dict[str, Any]:
    table, continuations = tables["verify"], tables["continuations"]
    intervention = table.filter(pl.col("condition") == Condition.intervention.value)
    counts = intervention.select(
        pl.col("error").is_null().sum().alias("verified"),
        pl.col("kept").sum().alias("kept"),
        pl.col("problem_id").filter(pl.col("kept")).n_unique().alias("problems_with_kept"),
    ).collect().row(0, named=True)
    accepted = tables["proposals"].select(pl.col("accepted").sum()).collect().item()
    # the first M of each intervention (as the release's share counts them); --top-up's N more apart
    arrived = continuations.filter(
        (pl.col("condition") == Condition.intervention.value) & pl.col("error").is_null()
        & ~pl.col("top_up").fill_null(False)
    ).select(pl.len(), (pl.col("correct") == True).sum()).collect().row(0)  # noqa: E712
    topped = continuations.filter(pl.col("top_up").fill_null(False)).select(pl.len()).collect().item()
    return {
        **counts,
        "accepted": accepted,
        "not_verified": accepted - intervention.select(pl.len()).collect().item(),
        "continuation_rows": continuations.select(pl.len()).collect().item(),
        "intervention_continuations": arrived[0], "intervention_correct": arrived[1], "top_up_continuations": topped,
        "table1": table1(continuations, [c.value for c in Condition if c in s.conditions], s.continuations),
        "keep_rule": {"rule": s.keep_rule.value, "min_success": s.min_success, "alpha": s.alpha,
                      "baselines": s.baselines.value, "top_up": s.top_up, "top_up_below": s.top_up_below},
        "lift": lift_summary(intervention, s),
    }


P_BINS = (0.01, 0.05, 0.1, 0.5, 1.0)


def lift_summary(intervention: pl.LazyFrame, s: VerifySettings) -> dict[str, Any] | None:
    """The lift's distribution over the verified interventions whose original-step baseline ran (None if none):
    how many, how many pass each rule, the lift's quartiles and the p-values by bin."""
    measured = intervention.filter(pl.col("error").is_null() & pl.col("lift_p").is_not_null()).select(
        "lift", "lift_p", "successes", pl.col("top_up_continuations").is_not_null().alias("topped_up")).collect()
    if not measured.height:
        return None
    p = measured["lift_p"].to_list()
    return {
        "interventions": measured.height,
        "pass_paper_rule": int((measured["successes"] >= s.min_success).sum()),
        # the rule's own threshold: alpha/2 with --top-up (whose topped-up rows carry the p of all M + N per arm)
        "threshold": s.first_alpha,
        "p_at_most_threshold": sum(v <= s.first_alpha for v in p),
        "topped_up": measured["topped_up"].sum(),
        "lift_quartiles": [float(measured["lift"].quantile(q, "nearest")) for q in (0.25, 0.5, 0.75)],
        "p_bins": {f"<= {edge}": sum(low < v <= edge for v in p) if low else sum(v <= edge for v in p)
                   for low, edge in zip((0.0, *P_BINS), P_BINS)},
    }


def work(part: Part, s: VerifySettings) -> int:
    """Samples asked for: M per intervention verified and per baseline of each matched unit."""
    texts = {row["attempt_id"]: row["text"] for row in part.tables["samples"]}
    return len(verify_jobs(part.tables["proposals"], part.problems(), texts, s)) * s.continuations


STAGE = Stage(
    name="verify", reads=("proposals", "problems", "samples"), work=work,
    writes={"verify": VERIFY_SCHEMA, "continuations": CONTINUATION_SCHEMA},
    fingerprint=fingerprint, compute=compute, summarize=summarize, sends=("continuation",),
)
