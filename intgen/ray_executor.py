"""`--executor ray`: a stage's parts as a Ray Data pipeline, on one machine or a cluster.

The same stage skeleton as the local executor (`intgen.driver`), at the edge: `run_stages` has the same signature
as the driver's and runs the stages one after another; for each, it decides which parts are due (markers,
fingerprints, inputs: the driver's functions), and Ray Data maps those part indices through a pool of actors.
Each actor owns one backend (the openai backend's HTTP client to the server pool, the embedded engine, an
in-process vLLM engine on its GPU) and computes whole parts, each chunk by chunk as the local executor does
(`intgen.parts`): it reads the part's inputs from the run directory, answers the stage's model calls through the
cache, sends its grading to Ray tasks, and writes the part's tables and marker atomically. The driver only counts.
Stages do not overlap here (each is a Ray Data pipeline of its own); within one, each actor computes its share of
the parts that hold `--chunks-in-flight` chunks at once (one Ray Data batch: the actor's next batch starts when
the last part of its batch is written).

Call cache. One SQLite file written from many nodes is not safe (WAL needs shared memory; network file
systems lock poorly), so under Ray every part writes its own cache file, `RUN/cache-parts/<stage>/part-N.sqlite`,
and reads the run's `cache.sqlite` read-only (checkpointed by the driver before the stage, opened immutable,
never written while the stage runs). When the stage ends, and at the start of any run that finds some left by a
killed one, the driver merges the part caches into `cache.sqlite` and deletes them. A part retried after its
actor died reopens its own part cache, so the calls its first attempt was answered are not sent again.

What crosses Ray's object store is plain values built by intgen (part indices, JSON strings of counts,
grading items of strings); model output is never unpickled from anything intgen did not write itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from intgen.calls import CallStats
from intgen.driver import Planned, StageProgress, begin, due_parts, finish, stage_fingerprint
from intgen.extras import need
from intgen.parts import Grader, chunks_per_part


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide: the cluster's address (None: start or join a local one), actors per model stage,
    and the resources each actor holds (a GPU each for in-process vLLM)."""

    address: str | None = None
    actors: int = 2
    actor_cpus: float = 0.5
    actor_gpus: float = 0.0


def connect(settings: RaySettings) -> Any:
    """Join the cluster (or reuse this process's Ray, as tests and notebooks start it)."""
    ray = need("ray", "--executor ray")
    if not ray.is_initialized():
        ray.init(address=settings.address, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    return ray


def part_cache_dir(run_path: Path, stage: str) -> Path:
    return run_path / "cache-parts" / stage


def merge_part_caches(run: Any) -> int:
    """Fold every part cache left under RUN/cache-parts into the run's cache; returns the samples merged."""
    folder = run.path / "cache-parts"
    merged = 0
    for path in sorted(folder.glob("*/part-*.sqlite")) if folder.is_dir() else []:
        merged += run.cache.merge(path)
        for leftover in path.parent.glob(path.name + "*"):
            leftover.unlink(missing_ok=True)
    return merged


class PartWorker:
    """A Ray Data actor: computes whole parts of one stage with its own backend."""

    def __init__(self, run_path: str, stage: Any, settings: Any, backend_config: Any, grader: Any) -> None:
        from intgen.backends import make_backend
        from intgen.rundir import RunDir

        self.run = RunDir(run_path)
        self.stage, self.settings, self.grader = stage, settings, grader
        from intgen.window import EventLoop, Window

        self.backend = make_backend(backend_config) if backend_config is not None else None
        self.token_counts = getattr(self.backend, "token_counts", None)
        # one event loop and one window per actor: every part's chunks, and their chained second turns, are
        # coroutines on it, sending beside each other on one connection pool
        self.events = EventLoop("intgen-actor")
        self.window = Window(self.backend, loop=self.events.loop) if self.backend is not None else None

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        """The batch's parts side by side, their chunks' calls through the actor's one window: one part alone
        would leave the server idle at its end. Every part finishes before a failure is raised."""
        import asyncio

        from intgen.window import gather_all

        jobs = [self.compute(int(index), json.loads(str(record)))
                for index, record in zip(batch["index"], batch["record"])]
        return {"done": asyncio.run_coroutine_threadsafe(gather_all(jobs), self.events.loop).result()}

    async def compute(self, index: int, record: dict[str, Any]) -> str:
        from intgen.cache import CallCache
        from intgen.parts import Answerer, compute_part

        cache_path = part_cache_dir(self.run.path, self.stage.name) / f"part-{index:05d}.sqlite"
        cache = CallCache(cache_path, fallback=self.run.path / "cache.sqlite")
        stats = CallStats()
        lane = self.window.lane((index,)) if self.window is not None else None
        execute = Answerer(self.run, lane, self.grader, stats, cache=cache, grade=grade_on_ray)
        try:
            work = await compute_part(self.run, self.stage, self.settings, index, execute, record)
        finally:
            cache.close()
        return json.dumps({"index": index, "work": work, "stats": stats.to_dict(), "pid": os.getpid(),
                           "token_counts": self.token_counts})


def grade_on_ray(items: list[tuple[Any, str | None, str]], workers: int | None, timeout: float) -> list[Any]:
    """Grading as a Ray task (its worker processes live in that task's Ray worker)."""
    import ray

    from intgen.grading import Verdict

    return [Verdict(*v) for v in ray.get(_grade_task().remote(items, workers, timeout))]


_TASK: Any = None


def _grade_task() -> Any:
    global _TASK
    if _TASK is None:
        import ray

        @ray.remote(num_cpus=0.5, max_retries=3)
        def grade_task(items: list[Any], workers: int | None, timeout: float) -> list[list[Any]]:
            from intgen.grading import grade_items

            return [[v.correct, v.predicted, v.reason] for v in grade_items(items, workers=workers, timeout=timeout)]

        _TASK = grade_task
    return _TASK


def run_parts(run: Any, stage: Any, settings: Any, todo: list[tuple[int, dict[str, Any]]], backend_config: Any,
              grader: Any, ray_settings: RaySettings, stats: CallStats, progress: Any,
              parts_in_flight: int) -> str | None:
    """Compute the due parts on Ray; each actor writes its parts itself; the driver adds up what they report.
    Each call hands an actor its share of `parts_in_flight` parts to compute at once. Returns how the actors'
    backend counts tokens (None when no part was due)."""
    if not todo:
        return None
    connect(ray_settings)
    import ray.data

    run.cache.checkpoint()  # the actors read cache.sqlite immutable: everything must be in the main file
    items = [{"index": index, "record": json.dumps(record)} for index, record in todo]
    uses_model = backend_config is not None
    actors = max(1, min(ray_settings.actors if uses_model else 1, len(items)))
    per_call = max(1, min(-(-parts_in_flight // actors), -(-len(items) // actors)))
    parts = ray.data.from_items(items, override_num_blocks=-(-len(items) // per_call))
    remote_args: dict[str, Any] = {"num_cpus": ray_settings.actor_cpus if uses_model else 0.25}
    if uses_model and ray_settings.actor_gpus:
        remote_args["num_gpus"] = ray_settings.actor_gpus
    results = parts.map_batches(
        PartWorker, batch_size=per_call, concurrency=actors, batch_format="numpy",
        fn_constructor_kwargs={"run_path": str(run.path), "stage": stage, "settings": settings,
                               "backend_config": backend_config, "grader": grader},
        **remote_args,
    )
    token_counts = None
    for row in results.iter_rows():
        report = json.loads(str(row["done"]))
        stats.add(CallStats.from_dict(report["stats"]))
        token_counts = token_counts or report["token_counts"]
        if progress is not None:
            progress.expect(report["index"], report["work"])
            progress.advance(report["work"])
    return token_counts


def run_stages(run: Any, plan: list[Planned], stages: list[Any], *, grader: Grader = Grader(), force: bool = False,
               progress: bool = True, chunks_in_flight: int = 32) -> dict[str, dict[str, Any]]:
    """The Ray executor's `driver.run_stages`: each planned stage's due parts on its actors (`plan[k].engine`
    carries the backend's settings and the `RaySettings`), one stage after another, the parts of `chunks_in_flight`
    chunks at once over all actors."""
    entries = {}
    parts_in_flight = max(1, chunks_in_flight // chunks_per_part(run))
    for planned in plan:
        stage, engine = planned.stage, planned.engine
        fingerprint = stage_fingerprint(stage, planned.settings, engine)
        previous = begin(run, stage.name, list(stage.writes), fingerprint, force)
        count = run.part_count(stage.reads[0])
        stats = CallStats()
        due = due_parts(run, stage, fingerprint, stages)
        backend_config = engine.config if engine is not None and stage.uses_model else None
        settings = engine.ray if engine is not None and engine.ray is not None else RaySettings()
        with StageProgress(stage.name, count, progress) as shown:
            merge_part_caches(run)  # a killed run's part caches first: their calls are paid for
            try:
                token_counts = run_parts(run, stage, planned.settings, due, backend_config, grader, settings, stats,
                                         shown, parts_in_flight)
            finally:
                merge_part_caches(run)
        for table in stage.writes:
            run.clear_table(table, start=count)  # parts of problems no longer in the run
        entries[stage.name] = finish(run, stage, planned.settings, fingerprint, previous, stats, planned.price,
                                     token_counts if backend_config is not None else None)
    return entries
