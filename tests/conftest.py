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
