"""export: the run as a Hugging Face dataset folder (parquet per config and a README.md card).

- `sft`: TRL's conversational prompt-completion format. prompt = [the problem, as the user message the
  policy saw], completion = [the attempt's steps before the error + the intervention]. Never the suffix.
- `rl`: the distinct problems with their gold answers and reference solutions, for GRPO; the prompt is
  the same user message (and system prompt) as in `sft` (the InT release used different ones, a defect).
- `interventions`: every proposal, accepted or not, with its verification results.
- `samples`: every attempt with its grade.
"""

from __future__ import annotations

import polars as pl

CONFIGS = ("sft", "rl", "interventions", "samples")


def prompt_expr(solve_template: str, system_prompt: str | None, problem: str = "problem") -> pl.Expr:
    """The chat prompt as a list of {role, content}: the solve template around the problem text."""
    before, marker, after = solve_template.partition("{{problem}}")
    if not marker:
        raise ValueError("the solve prompt has no {{problem}} marker")
    user = pl.struct(role=pl.lit("user"), content=pl.concat_str([pl.lit(before), pl.col(problem), pl.lit(after)]))
    messages = [user]
    if system_prompt:
        messages.insert(0, pl.struct(role=pl.lit("system"), content=pl.lit(system_prompt)))
    return pl.concat_list(messages)


def completion_expr(text: str = "intervened_text") -> pl.Expr:
    return pl.concat_list([pl.struct(role=pl.lit("assistant"), content=pl.col(text))])
