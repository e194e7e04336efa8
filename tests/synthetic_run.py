"""A finished run directory of any size, written by the project's own writers (RunDir parts and markers, the
stages' schemas, grade/propose/verify's own summaries, export's analysis.json) with seeded random text, for the
report's scale benchmark and its browser test (math in `$...$`, display math, a currency amount)."""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl

from intgen.backends.base import Sampling
from intgen.dataset.export import funnel, write_analysis
from intgen.driver import input_digest, producers
from intgen.io import PROBLEM_SCHEMA
from intgen.plan import STAGES
from intgen.resources import load_prompt
from intgen.rundir import RunDir
from intgen.stages import grade, propose, verify
from intgen.stages.grade import GRADE_COLUMNS, PASS_RATE_SCHEMA
from intgen.stages.propose import PROPOSAL_SCHEMA
from intgen.stages.sample import ATTEMPT_SCHEMA
from intgen.stages.verify import CONTINUATION_SCHEMA, VERIFY_SCHEMA
from intgen.steps import join_steps, step_ends

# Text that would run as code if a page put it in as markup (problem 0 carries it).
HOSTILE = " </script><script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\"> @@SUMMARY@@"
WORDS = ("the", "𝑥-axis", "sum", "of", "both", "sides", "we", "get", "so", "then", "divide", "by", "each", "term",
         "gives", "since", "is", "positive", "therefore", "value", "equation", "roots", "factor", "square", "count",
         "ways")


def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"{text} ${rng.randint(2, 99)}x^{rng.randint(2, 5)} + {rng.randint(1, 9)}$ and {rng.randint(10, 999)}."


def attempt_steps(rng: random.Random, steps: int, step_chars: int) -> list[str]:
    out = []
    for i in range(steps):
        body = " ".join(sentence(rng, 8) for _ in range(max(1, step_chars // 60)))
        out.append(f"Step {i + 1}: {body}\n\n")
    out[-1] = out[-1].rstrip() + " So the answer is $\\boxed{" + str(rng.randint(1, 99)) + "}$."
    return out


def write_synthetic_run(path: Path, problems: int, attempts: int = 4, continuations: int = 4, steps: int = 12,
                        step_chars: int = 160, continuation_chars: int = 1200, seed: int = 0) -> RunDir:
    """`problems` × `attempts` failed attempts with one proposal each (an intervention and an original-step
    prefix, `continuations` continuations each); a quarter of the proposals rejected."""
    rng = random.Random(seed)
    run = RunDir(path)
    problem_rows, graded_rows, proposal_rows, verify_rows, continuation_rows = [], [], [], [], []
    matched: dict[str, str] = {}  # problem -> its matched unit's proposal (the first accepted one)
    for p in range(problems):
        pid = f"{p:016x}"
        hostile = HOSTILE if p == 0 else ""
        problem_rows.append({"problem_id": pid, "problem": f"Problem {p}: find $x$ with $x^2 - {p % 7 + 2}x + 1 = 0$, "
                             f"given $5 and $6 in hand.{hostile}\n\n$$\\sum_{{k=1}}^{{n}} k = \\frac{{n(n+1)}}{{2}}$$",
                             "answer": str(p % 97), "solution": join_steps(attempt_steps(rng, 4, 120)),
                             "source": ("algebra", "geometry", "counting")[p % 3], "source_id": str(p)})
        for a in range(attempts):
            aid = f"{pid}/a{a}"
            parts = attempt_steps(rng, steps, step_chars)
            text = join_steps(parts)
            graded_rows.append({"problem_id": pid, "attempt_id": aid, "sample_index": a, "text": text,
                                "finish_reason": "stop", "truncated": False, "error": None, "prompt_tokens": 200,
                                "completion_tokens": len(text) // 4, "cached": False, "correct": False,
                                "predicted": str(p % 97 + 1), "grade_reason": "wrong"})
            proposal_id = f"{aid}/p0"
            error_step = rng.randint(1, steps)
            rejected = rng.random() < 0.25
            intervention = f"Instead, {sentence(rng, 12)}"
            proposal_rows.append({
                "problem_id": pid, "attempt_id": aid, "proposal_id": proposal_id, "proposal_index": 0,
                "num_steps": steps, "step_ends": step_ends(parts), "error_step": error_step,
                "intervention": intervention, "verification": f"Substep {error_step}: {sentence(rng, 20)}",
                "intervened_text": join_steps(parts[: error_step - 1]) + intervention,
                "accepted": not rejected, "reject_reason": "leaks_answer" if rejected else None,
                "raw": '{"error_step": %d}' % error_step, "finish_reason": "stop", "error": None,
                "prompt_tokens": 900, "completion_tokens": 120})
            if rejected:
                continue
            unit = matched.setdefault(pid, proposal_id) == proposal_id
            for condition in ("intervention", "original-step"):
                prefix = (f"{proposal_id}/{condition}" if condition == "intervention"
                          else f"{aid}/s{error_step}/original")
                successes = 0
                for c in range(continuations):
                    correct = rng.random() < (0.4 if condition == "intervention" else 0.2)
                    successes += correct
                    body = " ".join(sentence(rng, 8) for _ in range(max(1, continuation_chars // 60)))
                    continuation_rows.append({
                        "continuation_id": f"{prefix}/c{c}", "prefix_id": prefix,
                        "proposal_id": proposal_id, "problem_id": pid, "condition": condition, "matched": unit,
                        "prefix_chars": 100, "text": body, "finish_reason": "stop",
                        "true_continuation": True, "correct": correct, "predicted": str(p % 97 if correct else 0),
                        "grade_reason": "match" if correct else "wrong", "error": None,
                        "completion_tokens": len(body) // 4})
                verify_rows.append({
                    "prefix_id": prefix, "condition": condition, "matched": unit, "problem_id": pid, "attempt_id": aid,
                    "proposal_id": proposal_id, "error_step": error_step,
                    "prefix_chars": 100, "continuations": continuations, "successes": successes, "ungradable": 0,
                    "success_rate": successes / continuations, "true_continuation": True,
                    "kept": condition == "intervention" and successes >= 1, "error": None})
    tables = {
        "problems": pl.DataFrame(problem_rows, schema=PROBLEM_SCHEMA),
        "graded": pl.DataFrame(graded_rows, schema=ATTEMPT_SCHEMA | GRADE_COLUMNS),
        "pass_rates": pl.DataFrame([{"problem_id": r["problem_id"], "attempts": attempts, "correct": 0,
                                     "incorrect": attempts, "ungradable": 0, "truncated": 0, "pass_rate": 0.0,
                                     "selected": True} for r in problem_rows], schema=PASS_RATE_SCHEMA),
        "proposals": pl.DataFrame(proposal_rows, schema=PROPOSAL_SCHEMA),
        "verify": pl.DataFrame(verify_rows, schema=VERIFY_SCHEMA),
        "continuations": pl.DataFrame(continuation_rows, schema=CONTINUATION_SCHEMA),
    }
    tables["samples"] = tables["graded"].select(list(ATTEMPT_SCHEMA))
    for name, frame in tables.items():
        run.write_part(name, 0, frame)
    # markers as the driver writes them: each stage's part records the digest of the inputs it was computed from
    run.finish_part("problems", 0, ["problems"], {"failed": {}})
    stages = STAGES
    for stage in stages:
        run.finish_part(stage.table, 0, list(stage.writes), {"input": input_digest(run, stage, 0, producers(stages))})
    lazy = {name: frame.lazy() for name, frame in tables.items()}
    calls = {"requests_sent": 0, "cache_hits": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": None,
             "seconds": 0.0}
    run.record_stage("sample", {"status": "done", "rows": len(graded_rows), "problems": problems, "calls": calls,
                                "fingerprint": {"backend": "openai", "model": "synthetic"}})
    run.record_stage("grade", {"status": "done", "rows": len(graded_rows)} | grade.summarize(lazy, None))
    run.record_stage("propose", {"status": "done", "rows": len(proposal_rows), "calls": calls,
                                 "fingerprint": {"backend": "openai", "model": "synthetic"}}
                     | {k: v for k, v in propose_summary(lazy).items()})
    run.record_stage("verify", {"status": "done", "rows": len(verify_rows), "calls": calls,
                                "fingerprint": {"backend": "openai", "model": "synthetic"}}
                     | verify.summarize(lazy, verify_settings(continuations)))
    write_analysis(run, funnel(run))
    return run


def verify_settings(continuations: int) -> verify.VerifySettings:
    return verify.VerifySettings(continuations, Sampling(), load_prompt("solve.md"),
                                 conditions=(verify.Condition.intervention, verify.Condition.original_step))


def propose_summary(tables: dict[str, pl.LazyFrame]) -> dict:
    """propose.summarize without the prompt files (a synthetic run has none)."""
    class NoPrompts:
        @staticmethod
        def prompts() -> list:
            return []

    return propose.summarize(tables, NoPrompts())
