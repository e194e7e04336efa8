"""intgen: build intervention (InT) datasets for LLM math reasoning.

The library's public API (docs/library.md, docs/training.md), imported on first use so that `import intgen` and
the CLI stay quick: problem loading, step splitting, grading and the RL rewards.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_WHERE = {
    "load_problems": "intgen.io", "read_problems": "intgen.io",
    "split_steps": "intgen.steps", "join_steps": "intgen.steps",
    "extract_answer": "intgen.grading", "is_equivalent": "intgen.grading", "grade": "intgen.grading",
    "grade_many": "intgen.grading",
    "math_accuracy_reward": "intgen.rewards", "make_math_reward": "intgen.rewards", "compute_score": "intgen.rewards",
}
__all__ = ["__version__", *_WHERE]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'intgen' has no attribute {name!r}")
