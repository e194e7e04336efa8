"""A content-addressed store of model calls: a rerun or a resumed run never pays twice.

Each sample is keyed by the backend kind, the model, the full messages, whether the last message is
continued, the JSON schema, the sampling parameters and the sample's index — never by how the reply
is parsed, and never by credentials (API keys are not part of any request). Rows live in one SQLite
file under the run directory; WAL mode and a busy timeout make it safe for several processes.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path

from intgen.backends.base import TOO_LONG, Completion, Request


def request_identity(kind: str, model: str, request: Request) -> dict:
    return {
        "backend": kind,
        "model": model,
        "messages": [list(m) for m in request.messages],
        "continue_final": request.continue_final,
        "json_schema": request.json_schema,
        "sampling": request.sampling.to_dict(),
    }


def sample_key(kind: str, model: str, request: Request, index: int) -> str:
    identity = request_identity(kind, model, request) | {"sample": index}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


class CallCache:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connection() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS samples ("
                " key TEXT PRIMARY KEY, backend TEXT, model TEXT, text TEXT, finish_reason TEXT,"
                " prompt_tokens INTEGER, completion_tokens INTEGER, true_continuation INTEGER,"
                " created TEXT DEFAULT CURRENT_TIMESTAMP)"
            )

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def get_many(self, keys: list[str]) -> dict[str, Completion]:
        found: dict[str, Completion] = {}
        db = self._connection()
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            rows = db.execute(
                "SELECT key, text, finish_reason, prompt_tokens, completion_tokens, true_continuation FROM samples"
                f" WHERE key IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            for key, text, finish, prompt, completion, true_cont in rows:
                found[key] = Completion(text, finish, prompt, completion, bool(true_cont), cached=True)
        return found

    def put(self, key: str, backend: str, model: str, completion: Completion) -> None:
        if completion.error is not None or completion.finish_reason == TOO_LONG:
            return  # failures are retried next time, never cached; so is a prompt too long for this context
        self._connection().execute(
            "INSERT OR REPLACE INTO samples (key, backend, model, text, finish_reason, prompt_tokens,"
            " completion_tokens, true_continuation) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, backend, model, completion.text, completion.finish_reason, completion.prompt_tokens,
             completion.completion_tokens, int(completion.true_continuation)),
        )

    def __len__(self) -> int:
        return self._connection().execute("SELECT COUNT(*) FROM samples").fetchone()[0]

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
