"""A content-addressed store of model calls: a rerun or a resumed run never pays twice.

Each sample is keyed by the backend kind, the model, the backend settings that can change this reply
(`request_settings`: a JSON-schema mechanism, a continuation mechanism and chat template, a thinking budget,
engine arguments), the full messages, whether the last message is continued, the JSON schema, the sampling
parameters, the request's draw (which independent draw it is) and the sample's index — never by how the
reply is parsed, and never by credentials (API keys are not part of any request). Rows live in one SQLite
file under the run directory; WAL mode and a busy timeout make it safe for several processes.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from intgen.backends.base import TOO_LONG, Completion, Request, request_settings
from intgen.errors import UserError


def request_identity(kind: str, model: str, request: Request, settings: dict[str, Any] | None = None) -> dict:
    identity = {
        "backend": kind,
        "model": model,
        "messages": [list(m) for m in request.messages],
        "continue_final": request.continue_final,
        "json_schema": request.json_schema,
        "sampling": request.sampling.to_dict(),
    }
    # Only when present, so that the keys of calls without them stay what they were (a changed key makes every
    # existing cache miss).
    relevant = request_settings(settings or {}, request)
    if relevant:
        identity["settings"] = relevant
    if request.draw:
        identity["draw"] = request.draw
    return identity


def sample_key(kind: str, model: str, request: Request, index: int, settings: dict[str, Any] | None = None) -> str:
    return sample_keys(kind, model, request, settings)[index]


def sample_keys(kind: str, model: str, request: Request, settings: dict[str, Any] | None = None) -> list[str]:
    """The keys of the request's `n` samples (the identity is built once for all of them); `settings`: the
    backend's `reply_settings`."""
    identity = request_identity(kind, model, request, settings)
    return [hashlib.sha256(json.dumps(identity | {"sample": i}, sort_keys=True).encode()).hexdigest()
            for i in range(request.n)]


def _lookup(db: sqlite3.Connection, keys: list[str]) -> dict[str, Completion]:
    found: dict[str, Completion] = {}
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


class CacheError(UserError, OSError):
    """The cache file cannot be read or written (full disk, corrupt file); the message names it."""


class CallCache:
    """`fallback`: another cache file read (never written) for samples this one lacks, opened immutable: the Ray
    executor's part caches read the run's cache.sqlite this way, on storage where locks cannot be trusted."""

    def __init__(self, path: Path | str, fallback: Path | str | None = None) -> None:
        self.path = Path(path)
        self.fallback = Path(fallback) if fallback is not None and Path(fallback).is_file() else None
        self._local = threading.local()
        with self._guard():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._connection().execute(
                "CREATE TABLE IF NOT EXISTS samples ("
                " key TEXT PRIMARY KEY, backend TEXT, model TEXT, text TEXT, finish_reason TEXT,"
                " prompt_tokens INTEGER, completion_tokens INTEGER, true_continuation INTEGER,"
                " created TEXT DEFAULT CURRENT_TIMESTAMP)"
            )

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as exc:
            # only a damaged file is worth deleting (its calls are paid again); anything else is said as it is
            text = str(exc)
            if "full" in text:
                hint = "; free some space and run the same command again"
            elif any(word in text for word in ("malformed", "not a database", "encrypted")):
                hint = "; the file is damaged: delete it to start the cache again (model calls will be paid again)"
            else:
                hint = ""
            raise CacheError(f"{self.path}: {exc}{hint}") from None
        except OSError as exc:
            raise CacheError(f"{self.path}: {exc.strerror or exc}") from None

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def get_many(self, keys: list[str]) -> dict[str, Completion]:
        with self._guard():
            found = _lookup(self._connection(), keys)
            if self.fallback is not None and len(found) < len(keys):
                found = _lookup(self._fallback(), [k for k in keys if k not in found]) | found
            return found

    def _fallback(self) -> sqlite3.Connection:
        db = getattr(self._local, "fallback", None)
        if db is None:
            assert self.fallback is not None
            db = self._local.fallback = sqlite3.connect(f"{self.fallback.resolve().as_uri()}?mode=ro&immutable=1",
                                                        uri=True)
        return db

    def checkpoint(self) -> None:
        """Move everything written so far into the main file (readers that open it immutable see only that)."""
        with self._guard():
            self._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def merge(self, other: Path) -> int:
        """Copy another cache file's samples in (those this one lacks); returns how many it held."""
        with self._guard():
            db = self._connection()
            db.execute("ATTACH DATABASE ? AS other", (str(other),))
            try:
                count = db.execute("SELECT COUNT(*) FROM other.samples").fetchone()[0]
                db.execute("INSERT OR IGNORE INTO samples SELECT * FROM other.samples")
            finally:
                db.execute("DETACH DATABASE other")
            return count

    def put(self, key: str, backend: str, model: str, completion: Completion) -> None:
        self.put_many([(key, completion)], backend, model)

    def put_many(self, samples: list[tuple[str, Completion]], backend: str, model: str) -> None:
        """Store the samples of one answer in one transaction. Failures are retried next time, never cached;
        so is a prompt too long for this context."""
        rows = [(key, backend, model, c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens,
                 int(c.true_continuation)) for key, c in samples if c.error is None and c.finish_reason != TOO_LONG]
        if not rows:
            return
        with self._guard():
            db = self._connection()
            db.execute("BEGIN")
            try:
                db.executemany(
                    "INSERT OR REPLACE INTO samples (key, backend, model, text, finish_reason, prompt_tokens,"
                    " completion_tokens, true_continuation) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def __len__(self) -> int:
        return self._connection().execute("SELECT COUNT(*) FROM samples").fetchone()[0]

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
        fallback = getattr(self._local, "fallback", None)
        if fallback is not None:
            fallback.close()
            self._local.fallback = None
