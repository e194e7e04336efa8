"""Decontamination speed and hits: MATH-500 x IMO-AnswerBench with intgen's hashed n-gram index, in one run.

    python bench/decontaminate.py [--data intgen/evalsets] [--ngram 8] [--scale 200]

Indexes one set and checks the other (both ways), then checks `--scale` copies of the MATH-500 problems (a
training set of that size, every one a hit) against both sets, and prints the index size, the time per
problem, and the hits found. A plain-Python set of n-gram strings is measured on the same work as the baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc

from intgen.decontaminate import NgramIndex, words
from intgen.pipeline import load_problem_set


def timed(action):
    started = time.perf_counter()
    result = action()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="intgen/evalsets")
    parser.add_argument("--ngram", type=int, default=8)
    parser.add_argument("--scale", type=int, default=200)
    args = parser.parse_args()
    os.environ["INTGEN_DATA"] = args.data
    math500 = load_problem_set("math500").frame["problem"].to_list()
    imo = load_problem_set("imo-answerbench").frame["problem"].to_list()

    for name, indexed, checked in (("IMO-AnswerBench", imo, math500), ("MATH-500", math500, imo)):
        index = NgramIndex(args.ngram)
        _, build = timed(lambda: index.add(indexed))
        hits, check = timed(lambda: [text for text in checked if index.contaminated(text)])
        print(f"index {name} ({len(indexed)} problems, {len(index.hashes)} {args.ngram}-grams) "
              f"in {build * 1000:.0f} ms; "
              f"checked {len(checked)} problems in {check * 1000:.0f} ms ({check / len(checked) * 1e6:.0f} us each): "
              f"{len(hits)} share an n-gram")

    index = NgramIndex(args.ngram)
    tracemalloc.start()
    index.add(imo + math500)
    index_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    training = math500 * args.scale
    hits, seconds = timed(lambda: sum(index.contaminated(text) for text in training))
    print(f"both sets: {len(index.hashes)} n-grams, {index_bytes / 1e6:.1f} MB; {len(training)} training problems "
          f"checked in {seconds:.2f} s ({len(training) / seconds:,.0f} problems/s); {hits} hits")

    def plain_grams(text: str) -> set[str]:
        tokens = words(text)
        return {" ".join(tokens[i : i + args.ngram]) for i in range(max(1, len(tokens) - args.ngram + 1))}

    plain: set[str] = set()
    tracemalloc.start()
    for text in imo + math500:
        plain |= plain_grams(text)
    plain_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    _, baseline = timed(lambda: sum(not plain.isdisjoint(plain_grams(text)) for text in training))
    print(f"baseline (a set of n-gram strings): {plain_bytes / 1e6:.1f} MB, {baseline:.2f} s; hashed / baseline: "
          f"memory {index_bytes / plain_bytes:.2f}, time {seconds / baseline:.2f}")


if __name__ == "__main__":
    sys.exit(main())
