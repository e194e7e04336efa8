"""Drives stages over a run directory: batches of rows, each written atomically, progress in the manifest.

A stage is done in parts of `batch_size` input rows. A finished part (one without failed rows) is
never computed again; a part with failures is recomputed, and the cache makes its good samples free.
A stage's fingerprint (what it was computed from) is kept in the manifest: asking for the same stage
with different settings is refused unless `force`, which recomputes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import polars as pl
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from intgen.backends.base import Backend, Sampling
from intgen.calls import CallStats, Price, run_requests
from intgen.resources import file_sha256, resource_path
from intgen.rundir import RunDir
from intgen.stages import sample as sample_stage


class StageConfigChanged(RuntimeError):
    """A stage already in the run directory was computed with other settings."""


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def check_fingerprint(run: RunDir, stage: str, fingerprint: dict[str, Any], force: bool) -> dict[str, Any]:
    """The stage's previous manifest entry if it may be resumed; {} (and the stage cleared) if it starts afresh."""
    entry = run.manifest()["stages"].get(stage, {})
    old = entry.get("fingerprint")
    if old is None or old == fingerprint:
        return entry if old is not None else {}
    changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if not force:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed)
        raise StageConfigChanged(
            f"{run.path}: stage {stage!r} was computed with other settings ({details}). "
            "Use another --run-dir, or pass --force to recompute it (cached model calls are reused)."
        )
    run.clear_stage(stage)
    return {}


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
        transient=False,
    ) as progress:
        task = progress.add_task(stage, total=total)
        yield lambda n: progress.advance(task, n)


def _batches(frame: pl.DataFrame, size: int) -> Iterator[tuple[int, pl.DataFrame]]:
    for index, start in enumerate(range(0, frame.height, size)):
        yield index, frame.slice(start, size)


def _part_is_finished(run: RunDir, stage: str, index: int) -> bool:
    if not run.has_part(stage, index):
        return False
    errors = pl.scan_parquet(run.part_path(stage, index)).select(pl.col("error").is_not_null().sum()).collect()
    return errors.item() == 0


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
    """K attempts per problem into `RUN/samples/`; returns the stage's manifest entry."""
    prompt_file = resource_path("prompts", prompt)
    template = prompt_file.read_text(encoding="utf-8")
    fingerprint = {
        "problems": hashlib.sha256("\n".join(problems["problem_id"].to_list()).encode()).hexdigest()[:16],
        "backend": backend.kind,
        "model": backend.model,
        "samples": samples,
        "sampling": sampling.to_dict(),
        "prompt_sha256": file_sha256(prompt_file),
        "system_prompt": system_prompt,
        "batch_size": batch_size,
    }
    previous = check_fingerprint(run, "samples", fingerprint, force)
    stats = CallStats()
    with stage_progress("sample", problems.height, progress) as advance:
        for index, batch in _batches(problems, batch_size):
            if _part_is_finished(run, "samples", index):
                advance(batch.height)
                continue
            rows = batch.to_dicts()
            requests = sample_stage.sample_requests(rows, template, sampling, samples, system_prompt)
            completions = run_requests(backend, requests, run.cache, stats)
            frame = pl.DataFrame(sample_stage.attempt_rows(rows, completions), schema=sample_stage.ATTEMPT_SCHEMA)
            run.write_part("samples", index, frame)
            advance(batch.height)
    return _record(run, "samples", fingerprint, previous, stats, price, prompt_file)


def _record(
    run: RunDir,
    stage: str,
    fingerprint: dict[str, Any],
    previous: dict[str, Any],
    stats: CallStats,
    price: Price | None,
    prompt_file: Any,
) -> dict[str, Any]:
    table = run.scan(stage)
    summary = table.select(
        pl.len().alias("rows"),
        pl.col("truncated").sum().alias("truncated"),
        pl.col("completion_tokens").sum().alias("completion_tokens"),
    ).collect().row(0, named=True)
    failures = (
        table.filter(pl.col("error").is_not_null())
        .select(pl.col("error").str.split(":").list.first().alias("reason"))
        .group_by("reason").len().collect()
    )
    total = CallStats(**{k: v for k, v in previous.get("calls", {}).items() if k in ("samples", "cache_hits", "requests_sent", "prompt_tokens", "completion_tokens")})
    total.seconds = previous.get("calls", {}).get("seconds", 0.0)
    total.add(stats)
    entry = {
        "status": "done" if failures.height == 0 else "done_with_failures",
        "fingerprint": fingerprint,
        "prompt_file": str(prompt_file),
        "rows": summary["rows"],
        "truncated": summary["truncated"],
        "failed_rows": dict(zip(failures["reason"].to_list(), failures["len"].to_list())),
        "calls": total.to_dict(price),
        "last_run": stats.to_dict(price),
    }
    run.record_stage(stage, entry)
    return entry
