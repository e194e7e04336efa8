from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("INTGEN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's reference data (../shared/data). Required in CI; skipped elsewhere when absent."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"reference data not found at {SHARED_DATA} (set INTGEN_SHARED_DATA)")
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory):
    """A real llama.cpp OpenAI-compatible server (SmolLM2-135M-Instruct) for the whole session."""
    from servers import LlamaServer

    server = LlamaServer(tmp_path_factory.mktemp("llama") / "server.log")
    yield server
    server.stop()


@pytest.fixture()
def proxy(llama_server):
    """A fresh recording proxy in front of the session's llama.cpp server."""
    from servers import Proxy

    p = Proxy(llama_server.url)
    yield p
    p.stop()


@pytest.fixture(scope="session")
def gsm8k(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 4 GSM8K test problems as a JSON-lines file."""
    rows = (shared_data / "gsm8k/test.jsonl").read_text().splitlines()[:4]
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
            pytest.fail("chromium is not installed and apt-get could not install it (the report's browser tests need it)")
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
