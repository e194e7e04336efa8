"""Scale-out: several servers behind one openai backend, and `--executor ray` on a local Ray cluster started
here (2 CPUs, no dashboard; stopped after): the embedded engine in actors gives the local executor's dataset,
the real llama.cpp server behind 2 actors, an actor killed mid-stage, and a rerun that sends nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from pathlib import Path

import polars as pl
import psutil
import pytest
from typer.testing import CliRunner

from intgen.cli import app
from intgen.config import EXAMPLE_PROBLEMS
from intgen.dataset.export import export_file

from conftest import TEST_SEED
from servers import Proxy

runner = CliRunner()
pytestmark = pytest.mark.slow


def small_run(run_dir: Path, *extra: str) -> list[str]:
    return ["build-dataset", "--run-dir", str(run_dir), "--limit", "4", "--batch-size", "1", "--samples", "2",
            "--max-tokens", "48", "--proposals", "2", "--propose-max-tokens", "40", "--continuations", "2",
            "--verify-max-tokens", "32", "--min-success", "0", "--seed", str(TEST_SEED),
            "--no-progress", *extra]


def openai_args(*urls: str) -> list[str]:
    args = ["--backend", "openai", "--model", "smollm2", "--structured-output", "json_object", "--concurrency", "2"]
    for url in urls:
        args += ["--base-url", url]
    return args


def table(run_dir: Path, name: str, key: str) -> pl.DataFrame:
    return pl.read_parquet(export_file(run_dir / "dataset", name)).sort(key)


def last_requests(run_dir: Path) -> dict[str, int]:
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    return {name: stages[name]["last_run"]["requests_sent"] for name in ("sample", "propose", "verify")}


# --- several servers, no Ray ---------------------------------------------------------------------------

def test_requests_spread_over_servers_and_a_dead_one_is_rested(llama_server, tmp_path: Path) -> None:
    with socket.socket() as closed:  # a server that is down for the whole run
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
    first, second = Proxy(llama_server.url), Proxy(llama_server.url)
    try:
        result = runner.invoke(app, ["sample", "--problems", str(EXAMPLE_PROBLEMS), "--limit", "8", "--samples", "2",
                                     "--max-tokens", "16", "--run-dir", str(tmp_path / "run"), "--no-progress",
                                     "--seed", str(TEST_SEED),
                                     *openai_args(first.url, dead, second.url)])
        assert result.exit_code == 0, result.output  # the dead server cost retries, not rows
        assert first.forwarded and second.forwarded  # a bounded load: both took work
        assert len(first.forwarded) + len(second.forwarded) >= 8
        samples = pl.read_parquet(tmp_path / "run" / "samples")
        assert samples.height == 16 and samples["error"].is_null().all()
    finally:
        first.stop()
        second.stop()


# --- Ray -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_embedded_engine_in_actors_gives_the_local_executors_dataset(ray_cluster, tmp_path: Path) -> None:
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    result = runner.invoke(app, small_run(local))
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, small_run(on_ray, "--executor", "ray", "--ray-actors", "2"))
    assert result.exit_code == 0, result.output
    for name, key in (("samples", "attempt_id"), ("interventions", "proposal_id"), ("sft", "proposal_id")):
        a, b = table(local, name, key), table(on_ray, name, key)
        assert a.drop("cached", strict=False).equals(b.drop("cached", strict=False)), name
    assert not list((on_ray / "cache-parts").rglob("*.sqlite"))  # part caches merged into cache.sqlite
    result = runner.invoke(app, small_run(on_ray, "--executor", "ray", "--ray-actors", "2"))
    assert result.exit_code == 0, result.output
    assert last_requests(on_ray) == {"sample": 0, "propose": 0, "verify": 0}  # a rerun sends nothing


def kill_one_actor() -> int | None:
    for process in psutil.process_iter(["pid", "cmdline"]):
        if "PartWorker" in " ".join(process.info["cmdline"] or []):
            os.kill(process.info["pid"], signal.SIGKILL)
            return process.info["pid"]
    return None


def test_llama_server_behind_two_actors_survives_a_killed_actor(ray_cluster, llama_server, tmp_path: Path) -> None:
    killed: list[int | None] = []
    lock = threading.Lock()

    def kill_late(path: str, body: dict) -> None:
        with lock:  # late in the sample stage: after 10 of its 16 calls were answered
            if not killed and proxy.answered >= 10 and body.get("max_tokens") == 48:
                killed.append(kill_one_actor())
        return None

    proxy = Proxy(llama_server.url, fail_if=kill_late)
    run_dir = tmp_path / "run"
    args = small_run(run_dir, "--limit", "8", "--executor", "ray", "--ray-actors", "2", "--lenient-answers",
                     *openai_args(proxy.url))
    try:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert killed and killed[0] is not None  # an actor really died mid-stage
        samples = pl.read_parquet(run_dir / "samples")
        assert samples.height == 16 and samples["attempt_id"].n_unique() == 16  # every row, exactly once
        assert samples["error"].is_null().all()
        sample_calls = sum(body.get("max_tokens") == 48 for _, body in proxy.forwarded)
        assert sample_calls <= 16 + 2 * 2  # at most the calls in flight at the kill were repeated
        sent = len(proxy.forwarded)
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and len(proxy.forwarded) == sent  # the rerun sends nothing
    finally:
        proxy.stop()
