from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# property tests draw the same examples on every run and machine (a failure found once is kept as a regression case)
settings.register_profile("deterministic", derandomize=True)
settings.load_profile("deterministic")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
EVALSETS = REPO / "intgen" / "evalsets"  # the eval sets intgen ships
# The sampling seed of the slow tests: run them under several (INTGEN_TEST_SEED=1, 2, 3) to shake out luck.
TEST_SEED = int(os.environ.get("INTGEN_TEST_SEED", "3"))
# Fixtures that start a server, a browser or a model: a test that uses one is in the slow tier.
REAL_PARTS = {"llama_server", "proxy", "scripted", "scripted_proxy", "chromium", "browser", "smollm2_tokenizer"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if REAL_PARTS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def fast_tier_starts_nothing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pytest -m "not slow"` starts no server and loads no model: a fast test that tries fails, naming the fix."""
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test outside the slow tier started a server or a model: mark it @pytest.mark.slow")

    import llama_cpp

    from intgen import train
    from intgen.backends import local, transformers_engine, vllm_engine

    import scripted
    import servers

    for owner, name in ((servers, "serve"), (scripted, "serve"), (servers.LlamaServer, "__init__"),
                        (local.LocalBackend, "__init__"), (llama_cpp.Llama, "__init__"),
                        (transformers_engine.TransformersBackend, "__init__"), (vllm_engine.VLLMBackend, "__init__"),
                        (train, "_load")):
        monkeypatch.setattr(owner, name, refuse)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The reference data the tests read (tests/data: each folder with its SOURCE.txt and licence)."""
    assert DATA.is_dir(), f"tests/data is missing from this checkout ({DATA})"
    return DATA


@pytest.fixture(scope="session")
def evalsets() -> Path:
    """The eval sets intgen ships (intgen/evalsets: MATH-500, GSM8K, AIME 2024, AMC 2023, IMO-AnswerBench,
    ProcessBench's GSM8K split)."""
    assert EVALSETS.is_dir(), f"intgen/evalsets is missing from this checkout ({EVALSETS})"
    return EVALSETS


@pytest.fixture(scope="session")
def test_seed() -> int:
    return TEST_SEED


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory):
    """A real llama.cpp OpenAI-compatible server (SmolLM2-135M-Instruct) for the whole session."""
    from servers import LlamaServer

    server = LlamaServer(tmp_path_factory.mktemp("llama") / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def scripted(evalsets: Path):
    """The scripted OpenAI-compatible server (tests/scripted.py) for the bundled examples and GSM8K: every sampled
    attempt wrong at a known step, every proposal accepted, continuations right after the intervention only."""
    from intgen.config import EXAMPLE_PROBLEMS

    from scripted import ScriptedServer, answers_of

    server = ScriptedServer(answers_of(EXAMPLE_PROBLEMS, evalsets / "gsm8k/test.jsonl"), seed=TEST_SEED)
    yield server
    server.stop()


@pytest.fixture()
def scripted_proxy(scripted):
    """A fresh recording proxy in front of the session's scripted server."""
    from servers import Proxy

    p = Proxy(scripted.url)
    yield p
    p.stop()


@pytest.fixture()
def proxy(llama_server):
    """A fresh recording proxy in front of the session's llama.cpp server."""
    from servers import Proxy

    p = Proxy(llama_server.url)
    yield p
    p.stop()


@pytest.fixture(scope="session")
def gsm8k(evalsets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 4 GSM8K test problems as a JSON-lines file."""
    rows = (evalsets / "gsm8k/test.jsonl").read_text().splitlines()[:4]
    path = tmp_path_factory.mktemp("problems") / "gsm8k4.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium for the report's browser tests, installed with apt-get when it is missing."""
    import shutil
    import subprocess

    path = shutil.which("chromium")
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        if subprocess.run(install, capture_output=True).returncode != 0:  # a fresh machine: no package lists yet
            subprocess.run(["apt-get", "update"], capture_output=True)
            subprocess.run(install, capture_output=True)
        path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed and apt-get could not install it "
                        "(the report's browser tests need it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


@pytest.fixture()
def browser(chromium: str):
    """Headless Chromium driven through Playwright's Python API; stopped after the test (Playwright's sync API
    holds an event loop while it runs)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread (the training tests): on a busy 2-core machine two threads per op contend, and training
    runs 2-4x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
