"""Rewards for RL stacks, on intgen's grader (math-verify in time-limited worker processes).

- `math_accuracy_reward(completions, answer, **kwargs)`: TRL's reward-function signature (completions
  plus the dataset's columns as keyword arguments). 1.0 correct, 0.0 wrong, None where the completion
  cannot be graded (no answer, unparseable, timed out), which TRL leaves out of the reward.
- `compute_score(data_source, solution_str, ground_truth, extra_info=None)`: verl's custom reward
  function. 1.0 or 0.0 (verl wants a number; ungradable counts as 0.0).

Both are safe to call from several threads: the grading pool serves one batch at a time.
"""

from __future__ import annotations

from typing import Any

from intgen.grading import DEFAULT_TIMEOUT_S, grade_many


def completion_text(completion: Any) -> str:
    """A completion as text: TRL passes strings, or lists of chat messages for conversational data."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, (list, tuple)):
        return "".join(completion_text(part) for part in completion if not isinstance(part, dict) or part.get("role", "assistant") == "assistant")
    return str(completion)


def math_accuracy_reward(
    completions: list[Any], answer: list[str], workers: int | None = None, timeout: float = DEFAULT_TIMEOUT_S,
    **kwargs: Any,
) -> list[float | None]:
    """TRL reward function: is each completion's last \\boxed{} answer equivalent to the gold `answer`?"""
    verdicts = grade_many(list(answer), [completion_text(c) for c in completions], workers=workers, timeout=timeout)
    return [None if v.correct is None else float(v.correct) for v in verdicts]


math_accuracy_reward.__name__ = "math_accuracy"  # the name TRL logs the reward under


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    """verl's `custom_reward_function` signature."""
    [verdict] = grade_many([ground_truth], [solution_str], workers=1)
    return 1.0 if verdict.correct else 0.0
