"""Evaluation sets by name: `intgen eval --problems math500`, `--decontaminate math500`,
`intgen eval-localize --problems processbench-gsm8k`.

The sets ship with intgen (`intgen/evalsets/`, each folder with its SOURCE.txt and licence), so a fresh install
works offline. A name is looked up as a file under a data folder laid out the same way: the folder given,
`$INTGEN_DATA`, `./data`, then the shipped sets. A path is always a path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from intgen.errors import UserError

# name -> (file under the data folder, Hub dataset id or None, loading options)
BENCHMARKS: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "math500": ("math500/test.jsonl", "HuggingFaceH4/MATH-500", {"split": "test"}),
    "gsm8k": ("gsm8k/test.jsonl", "openai/gsm8k", {"config": "main", "split": "test"}),
    "aime24": ("aime_amc/aime24_test.jsonl", "HuggingFaceH4/aime_2024", {"split": "train"}),
    "amc23": ("aime_amc/amc23_test.jsonl", "math-ai/amc23", {"split": "test"}),
    # one row (algebra-036) is malformed upstream: it is skipped and reported
    "imo-answerbench": ("imo_answerbench/answerbench_v2.csv", None, {"on_bad_row": "skip"}),
}
# name -> file of ProcessBench's format (`intgen eval-localize --problems NAME`)
LOCALIZE_SETS: dict[str, str] = {"processbench-gsm8k": "processbench/gsm8k.json"}
SHIPPED = Path(__file__).resolve().parent / "evalsets"


def data_dirs(data_dir: str | Path | None = None) -> list[Path]:
    candidates = [data_dir, os.environ.get("INTGEN_DATA"), "data", SHIPPED]
    return [Path(c) for c in candidates if c]


def resolve_benchmark(source: str, data_dir: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """(what to load, loading options) for a benchmark name; anything else is returned as it is."""
    if source not in BENCHMARKS or Path(source).exists():
        return source, {}
    relative, hub, options = BENCHMARKS[source]
    for folder in data_dirs(data_dir):
        if (folder / relative).is_file():
            local = {k: v for k, v in options.items() if k == "on_bad_row"}
            return str(folder / relative), local
    if hub is None:
        looked = ", ".join(str(folder) for folder in data_dirs(data_dir))
        raise UserError(f"{source}: no {relative} under {looked}; pass the file's path, or set $INTGEN_DATA")
    return hub, {k: v for k, v in options.items() if k != "on_bad_row"}


def resolve_localize_set(source: Path) -> Path:
    """A ProcessBench-format file by its name (`processbench-gsm8k`), or the path as it is."""
    if source.exists() or str(source) not in LOCALIZE_SETS:
        return source
    for folder in data_dirs():
        if (folder / LOCALIZE_SETS[str(source)]).is_file():
            return folder / LOCALIZE_SETS[str(source)]
    return source
