"""Throughput of `grade_many` against a plain single-process math-verify loop, in one run.

    python bench/grading.py [--workers 2] [--data intgen/evalsets/math500/test.jsonl]

Grades the 1,000 MATH-500 pairs (each reference solution against its own answer, and against the
next problem's answer) both ways and prints items/s for each and the ratio. Our figure includes the
worker start-up and the hard per-item timeouts; the baseline has no time limit at all.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from intgen.grading import grade_many
from intgen.workers import _close_shared

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "math500" / "test.jsonl"


def load_pairs(path: Path) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    golds = [r["answer"] for r in rows] + [rows[(i + 1) % len(rows)]["answer"] for i in range(len(rows))]
    return golds, [r["solution"] for r in rows] * 2


def plain_math_verify(golds: list[str], responses: list[str]) -> int:
    from math_verify import parse, verify

    return sum(bool(verify(parse("\\boxed{" + g + "}"), parse(r))) for g, r in zip(golds, responses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    golds, responses = load_pairs(args.data)

    start = time.perf_counter()
    baseline_correct = plain_math_verify(golds, responses)
    baseline_s = time.perf_counter() - start

    start = time.perf_counter()
    verdicts = grade_many(golds, responses, workers=args.workers, timeout=args.timeout)
    ours_s = time.perf_counter() - start
    _close_shared()

    n = len(golds)
    print(f"items: {n} (MATH-500 positives and negatives)")
    print(f"math-verify parse/verify, 1 process : {n / baseline_s:7.1f} items/s "
          f"({baseline_s:.2f} s, {baseline_correct} correct)")
    ours_correct = sum(v.correct is True for v in verdicts)
    print(f"intgen grade_many, {args.workers} workers      : {n / ours_s:7.1f} items/s "
          f"({ours_s:.2f} s, {ours_correct} correct, start-up included)")
    print(f"ratio: {baseline_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
