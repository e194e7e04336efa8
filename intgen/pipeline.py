"""The whole InT pipeline over a run directory: sample, grade, propose, verify, export.

This is the one place where a run's settings (`RunConfig`) become each stage's settings; the CLI's
stage commands and `build-dataset` both go through it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import polars as pl

from intgen import ray_executor
from intgen.backends import Backend, BackendConfig, make_backend
from intgen.benchmarks import resolve_benchmark
from intgen.calls import Price
from intgen.config import RunConfig
from intgen.dataset.export import export
from intgen.decontaminate import NgramIndex, drop_contaminated
from intgen.driver import Engine, Planned, run_stage, run_stages, write_input, write_problems
from intgen.errors import UserError
from intgen.evals import localize
from intgen.evals.metrics import eval_report
from intgen.grading import are_equivalent
from intgen.io import LoadResult, read_problems
from intgen.parts import Grader
from intgen.plan import PIPELINE, STAGES
from intgen.ray_executor import RaySettings
from intgen.rundir import RunDir, held


def load_price(path: str | Path | None, model: str) -> Price | None:
    """A price table (TOML or JSON): {model: {input: USD per 1M tokens, output: USD per 1M tokens}}."""
    if path is None:
        return None
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            import json

            table = json.loads(text)
        else:
            import tomllib

            table = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"{path}: not a readable price table ({exc})") from None
    entry = table.get(model) if isinstance(table, dict) else None
    if entry is None:
        priced = ", ".join(table) if isinstance(table, dict) else ""
        raise UserError(f"{path}: no price for model {model!r}; models priced: {priced or '(none)'}")
    try:
        return Price(float(entry["input"]), float(entry["output"]))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: the price of {model!r} needs numbers `input` and `output` "
                         "(USD per million tokens)") from None


def ray_settings(config: RunConfig) -> RaySettings | None:
    if config.executor != "ray":
        return None
    return RaySettings(config.ray_address, config.ray_actors, config.ray_actor_cpus, config.ray_actor_gpus)


@contextmanager
def open_engine(config: RunConfig, backend_config: BackendConfig) -> Iterator[Engine]:
    """What answers a stage's model calls: a backend made here (local executor), closed after; under the Ray
    executor, only its settings: each actor makes its own."""
    ray = ray_settings(config)
    if ray is not None:
        backend_config.identity()  # a missing --model is said here, not in an actor
        yield Engine(config=backend_config, ray=ray)
        return
    backend = make_backend(backend_config)
    try:
        yield Engine(backend)
    finally:
        backend.close()


def run_named_stage(run: RunDir, config: RunConfig, name: str, engine: Engine | None = None, force: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    """Run one stage of the pipeline (`plan.PIPELINE`) with the run's settings; a stage without a model still runs
    its grading on Ray under the Ray executor."""
    return run_steps(run, config, {name: engine}, force, progress)[name]


def run_pipeline(run: RunDir, config: RunConfig, engines: Mapping[str, Engine], force: bool = False,
                 progress: bool = True) -> dict[str, dict[str, Any]]:
    """Every stage of `plan.PIPELINE`, each model stage's calls answered by `engines[its model]`."""
    return run_steps(run, config, {each.name: engines[each.model] if each.model else None for each in PIPELINE},
                     force, progress)


def run_steps(run: RunDir, config: RunConfig, engines: Mapping[str, Engine | None], force: bool,
              progress: bool) -> dict[str, dict[str, Any]]:
    """The named stages (in pipeline order) on the run's executor: the local one's dataflow over parts
    (`driver.run_stages`), or Ray's, stage after stage (`ray_executor.run_stages`); the same signature."""
    ray = ray_settings(config)
    execute = ray_executor.run_stages if ray is not None else run_stages
    plan = []
    for each in (s for s in PIPELINE if s.name in engines):
        engine = engines[each.name] or (Engine(ray=ray) if ray is not None else None)
        has_model = engine is not None and (engine.backend is not None or engine.config is not None)
        price = load_price(config.prices, engine.identity()["model"]) if has_model else None
        plan.append(Planned(each.stage, each.settings(config), engine, price))
    return execute(run, plan, STAGES, grader=Grader(config.grade_workers, config.grade_timeout), force=force,
                   progress=progress, chunks_in_flight=config.chunks_in_flight)


def sample_problems(run: RunDir, config: RunConfig, engine: Engine, problems: pl.DataFrame, force: bool = False,
                    progress: bool = True, decontamination: dict[str, Any] | None = None) -> dict[str, Any]:
    """The problem set into `RUN/problems/` (with what decontamination dropped), then the sample stage."""
    write_problems(run, problems, config.batch_size, force, {"decontamination": decontamination})
    return run_named_stage(run, config, "sample", engine, force, progress)


def load_config_problems(config: RunConfig) -> LoadResult:
    """The run's problem set (a benchmark name, a file, a folder or a Hub id)."""
    return load_problem_set(config.problem_source(), config)


def load_problem_set(name: str, config: RunConfig | None = None) -> LoadResult:
    source, options = resolve_benchmark(name)
    known_bad = options.pop("on_bad_row", None)  # a benchmark with a known malformed row: skipped, reported
    if config is None:  # an eval set to check against: its own columns, bad rows skipped
        return read_problems(source, on_bad_row="skip", **options)
    on_bad_row = known_bad or ("skip" if config.skip_bad_rows else "error")
    return read_problems(
        source, problem_column=config.problem_column, answer_column=config.answer_column,
        solution_column=config.solution_column, split=config.split or options.pop("split", None),
        config=config.subset or options.pop("config", None), on_bad_row=on_bad_row, limit=config.limit,
        attempts=config.attempts is not None, attempt_column=config.attempt_column,
    )


def decontaminate(problems: pl.DataFrame, config: RunConfig) -> tuple[pl.DataFrame, dict[str, Any] | None]:
    """Drop the problems that share an n-gram with a problem of `config.decontaminate`'s eval sets (before
    sampling: nothing is spent on them). Returns the kept problems and what was checked and dropped."""
    if not config.decontaminate:
        return problems, None
    index = NgramIndex(config.decontaminate_ngram)
    checked = []
    for name in config.decontaminate:
        texts = load_problem_set(name).frame["problem"].to_list()
        index.add(texts)
        checked.append({"set": name, "problems": len(texts)})
    kept, dropped = drop_contaminated(problems, index)
    return kept, {"ngram": config.decontaminate_ngram, "sets": checked, "dropped": len(dropped),
                  "dropped_ids": dropped}


def build_dataset(config: RunConfig, run_dir: Path, force: bool = False, progress: bool = True,
                  backends: Mapping[str, Backend] | None = None) -> dict[str, Any]:
    """Run every stage (resuming what is done) and export the dataset; returns the funnel summary. The run
    directory is held by this process: a second one is refused at once. `backends`: your own backends for the
    "policy" model (and the "proposer", default: the policy), in place of those the settings name; you close them
    (their `kind` and `model` are in each stage's fingerprint and cache keys as any backend's)."""
    started = time.monotonic()
    with held(run_dir) as run:
        summary = _build(run, config, force, progress, backends)
    summary["seconds"] = round(time.monotonic() - started, 1)
    return summary


def _build(run: RunDir, config: RunConfig, force: bool, progress: bool,
           backends: Mapping[str, Backend] | None) -> dict[str, Any]:
    if run.read_json("config.json") is None:
        run.write_json("config.json", config.to_dict())
    loaded = load_config_problems(config)
    problems, decontamination = decontaminate(loaded.frame, config)
    write_problems(run, problems, config.batch_size, force, {"decontamination": decontamination})
    with ExitStack() as stack:
        if backends is not None:
            engines = {"policy": Engine(backends["policy"]),
                       "proposer": Engine(backends.get("proposer", backends["policy"]))}
        else:
            engines = {"policy": stack.enter_context(open_engine(config, config.policy_backend()))}
            proposer = config.proposer_config()
            engines["proposer"] = stack.enter_context(open_engine(config, proposer)) if proposer else engines["policy"]
        run_pipeline(run, config, engines, force, progress)
    run.write_json("config.json", config.to_dict())
    return export(run, config, skipped_rows=len(loaded.skipped))


# --- measuring: intgen eval and intgen eval-localize ----------------------------------------------

def eval_protocol(config: RunConfig, model: str) -> dict[str, Any]:
    """What an eval's numbers mean: the sampling and the prompt (printed first, saved in eval.json)."""
    prompt = config.prompt("solve")
    return {"problems": config.problem_source(), "backend": config.backend, "model": model,
            "samples": config.samples, "max_tokens": config.max_tokens, "temperature": config.temperature,
            "top_p": config.top_p, "top_k": config.top_k, "seed": config.seed, "prompt": Path(prompt.name).name,
            "prompt_sha256": prompt.sha256, "system_prompt": config.system_prompt,
            "lenient_answers": config.lenient_answers}


def run_eval(config: RunConfig, run_dir: Path, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Sample K attempts per problem and grade them (the pipeline's own stages, cache and resume), then
    write RUN/eval.json: avg@K, pass@k, maj@K and the ungradable and truncated shares, per source too."""
    with held(run_dir) as run:
        loaded = load_config_problems(config)
        with open_engine(config, config.policy_backend()) as engine:
            sample_problems(run, config, engine, loaded.frame, force, progress)
            model = engine.identity()["model"]
        run_named_stage(run, config, "grade", None, force, progress)
        run.write_json("config.json", config.to_dict())

        def equivalent(answer: str, representatives: list[str]) -> list[bool | None]:
            pairs = [(r, answer) for r in representatives]
            return are_equivalent(pairs, workers=config.grade_workers, timeout=config.grade_timeout)

        sources = run.table("problems").select("problem_id", "source")
        report = {"protocol": eval_protocol(config, model), "skipped_problem_rows": [str(r) for r in loaded.skipped]}
        report |= eval_report(run.table("graded"), sources, config.samples, equivalent)
        run.write_json("eval.json", report)
        return report


def localize_protocol(settings: localize.LocalizeSettings, model: str) -> dict[str, Any]:
    return {"model": model, "critic": settings.critic, "prompt": Path(settings.prompt.name).name,
            "prompt_sha256": settings.prompt.sha256, "vote": settings.vote, **settings.sampling.to_dict()}


def run_localize(items: pl.DataFrame, settings: localize.LocalizeSettings, backend_config: Any, run_dir: Path,
                 batch_size: int, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """ProcessBench's protocol on the items: RUN/localize.parquet (one row per item: id, label, predicted,
    reply, ...) and RUN/localize.json (the metric per subset and the mean F1). Resumable like every stage."""
    with held(run_dir) as run:
        write_input(run, "items", items, "id", batch_size, force)
        backend = make_backend(backend_config)
        try:
            run_stage(run, localize.STAGE, settings, [localize.STAGE], engine=Engine(backend), force=force,
                      progress=progress)
            model = backend.model
        finally:
            backend.close()
        table = run.table("localize")
        run.write_frame("localize.parquet", table)
        report = {"protocol": localize_protocol(settings, model)} | localize.metrics(table)
        run.write_json("localize.json", report)
        return report


def score_proposals(run_dir: Path, labels: pl.DataFrame, out_dir: Path) -> dict[str, Any]:
    """ProcessBench's metric for a run's own proposals, on the attempts a label file covers."""
    run = RunDir(run_dir)
    try:
        proposals = run.table("proposals")
    finally:
        run.close()
    table = localize.proposal_rows(proposals, labels)
    with held(out_dir) as out:
        out.write_frame("localize.parquet", table)
        report = {"protocol": {"run": str(run_dir), "attempts": table.height}} | localize.metrics(table)
        out.write_json("localize.json", report)
        return report
