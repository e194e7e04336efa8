"""Rewards for RL stacks, on intgen's grader (math-verify in time-limited worker processes).

- `math_accuracy_reward(completions, answer, **kwargs)`: TRL's reward-function signature (completions
  plus the dataset's columns as keyword arguments). 1.0 correct, 0.0 wrong, None where the completion
  cannot be graded (no answer, unparseable, timed out), which TRL leaves out of the reward.
  `make_math_reward(lenient=, ungradable=)` fixes its options (the recipe scores ungradable as 0.0:
  in RL, an attempt without an answer has failed).
- `compute_score(data_source, solution_str, ground_truth, extra_info=None)`: verl's custom reward
  function. 1.0 or 0.0 (verl wants a number; ungradable counts as 0.0).

Both are safe to call from several threads: the grading pool serves one batch at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from intgen.grading import DEFAULT_TIMEOUT_S, grade_many


def completion_text(completion: Any) -> str:
    """A completion as text: TRL passes strings, or lists of chat messages for conversational data."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, (list, tuple)):
        return "".join(completion_text(part) for part in completion
                       if not isinstance(part, dict) or part.get("role", "assistant") == "assistant")
    return str(completion)


def math_accuracy_reward(
    completions: list[Any], answer: list[str], workers: int | None = None, timeout: float = DEFAULT_TIMEOUT_S,
    lenient: bool = False, ungradable: float | None = None, **kwargs: Any,
) -> list[float | None]:
    """TRL reward function: is each completion's last \\boxed{} answer equivalent to the gold `answer`?

    1.0 or 0.0; `ungradable` (default None) for a completion that cannot be graded. With `lenient`, a
    completion without a box is read for the answer it states."""
    texts = [completion_text(c) for c in completions]
    verdicts = grade_many(list(answer), texts, workers=workers, timeout=timeout, lenient=lenient)
    return [ungradable if v.correct is None else float(v.correct) for v in verdicts]


math_accuracy_reward.__name__ = "math_accuracy"  # the name TRL logs the reward under


def make_math_reward(lenient: bool = False, ungradable: float | None = None) -> Callable[..., list[float | None]]:
    """`math_accuracy_reward` with its options fixed, as a named function TRL can log."""

    def reward(completions: list[Any], answer: list[str], **kwargs: Any) -> list[float | None]:
        return math_accuracy_reward(completions, answer, lenient=lenient, ungradable=ungradable, **kwargs)

    reward.__name__ = "math_accuracy" + ("_lenient" if lenient else "")
    return reward


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None,
                  **kwargs: Any) -> float:
    """verl's `custom_reward_function` signature (verl calls it with keywords, and may add its own)."""
    [verdict] = grade_many([ground_truth], [solution_str], workers=1)
    return 1.0 if verdict.correct else 0.0
