"""A run directory: the config, a manifest, one parquet table per stage output (written in parts), the call cache.

Every file is written to a temporary name and renamed into place, so no half-written file is ever
read back. A part is finished when its *marker* (`markers/TABLE/part-00000.json`, written after the
part's files; table folders hold nothing but parquet, so any reader can load them whole) says so: it
records the stage's fingerprint, a digest of the input parts it was computed from,
the size and content digest of every file it wrote, and its failed rows. A part whose marker is missing,
stale or disagrees with the files on disk is computed again (its model calls come from the cache).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from intgen import __version__
from intgen.cache import CallCache
from intgen.errors import MissingFile, UserError


class RunDirError(UserError, OSError):
    """The run directory cannot be used as asked (full disk, not writable, busy, unreadable file); the
    message names the path."""


def _unwritable(path: Path, exc: BaseException) -> RunDirError:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc) \
            or "disk is full" in str(exc):
        reason = "no space left on the device; free some and run the same command again (finished work is kept)"
    elif isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "not writable"
    else:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return RunDirError(f"{path}: cannot write ({reason})")


def _write_atomically(path: Path, write: Any) -> None:
    """`write(tmp)` a temporary file beside `path`, then rename it into place; nothing is left behind on failure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _unwritable(path, exc) from None
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _unwritable(path, exc) from None


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    _write_atomically(path, write)


def read_json_file(path: Path) -> Any:
    """A JSON file of the run; an unreadable one is an error naming it (never a traceback)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path}: unreadable ({exc}); delete it to start that part of the run again") from None


def digest(value: Any) -> str:
    """A short digest of a JSON-able value (settings, lists of ids, lists of digests)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:16]


class RunDir:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path}: not a directory (a run directory is a folder)")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unwritable(self.path, exc) from None
        self._cache: CallCache | None = None
        self._lock: Any = None
        self._opening = threading.Lock()

    @contextmanager
    def locked(self) -> Iterator[RunDir]:
        """Hold the run directory for this process: a second process is refused at once, naming the holder.
        The lock dies with its process (flock), so a killed run's lock is taken over by the next one. While
        held, temporary files of interrupted writes are cleaned up."""
        import fcntl

        path = self.path / ".lock"
        try:
            handle = open(path, "a+", encoding="utf-8")
        except OSError as exc:
            raise _unwritable(path, exc) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirError(f"{self.path}: in use by {holder}; wait for it to finish or stop it") from None
        handle.seek(0)
        handle.truncate()
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}")
        handle.flush()
        self._lock = handle
        try:
            self.remove_temporary_files()
            yield self
        finally:
            self._lock = None
            handle.close()

    def remove_temporary_files(self) -> None:
        """Leftovers of writes that were interrupted (a kill, a full disk): never read, never pushed."""
        for tmp in self.path.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    @property
    def cache(self) -> CallCache:
        with self._opening:  # parts computed in several threads open it at once
            if self._cache is None:
                self._cache = CallCache(self.path / "cache.sqlite")
            return self._cache

    # --- manifest ---
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        if self.manifest_path.exists():
            manifest = read_json_file(self.manifest_path)
            if isinstance(manifest, dict) and isinstance(manifest.get("stages"), dict):
                return manifest
            raise RunDirError(f"{self.manifest_path}: not an intgen manifest; delete it to start the run's "
                              "bookkeeping again (cached model calls are kept)")
        return {"intgen_version": __version__, "python": platform.python_version(), "stages": {}}

    def stage_entry(self, stage: str) -> dict[str, Any]:
        return self.manifest()["stages"].get(stage, {})

    def record_stage(self, stage: str, entry: dict[str, Any]) -> None:
        manifest = self.manifest()
        manifest["intgen_version"] = __version__
        manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest["stages"][stage] = entry
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    def write_json(self, name: str, data: Any) -> None:
        atomic_write_text(self.path / name, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def write_frame(self, name: str, frame: pl.DataFrame) -> None:
        """A whole table as one parquet file at the top of the run (an eval's results)."""
        _write_atomically(self.path / name, frame.write_parquet)

    def read_json(self, name: str) -> Any:
        path = self.path / name
        return read_json_file(path) if path.exists() else None

    # --- stage tables ---
    def part_path(self, table: str, index: int) -> Path:
        return self.path / table / f"part-{index:05d}.parquet"

    def marker_path(self, table: str, index: int) -> Path:
        return self.path / "markers" / table / f"part-{index:05d}.json"

    def has_part(self, table: str, index: int) -> bool:
        return self.part_path(table, index).exists()

    def write_part(self, table: str, index: int, frame: pl.DataFrame) -> None:
        _write_atomically(self.part_path(table, index), frame.write_parquet)

    def finish_part(self, table: str, index: int, files: list[str], record: dict[str, Any]) -> None:
        """Mark part `index` finished: `files` are the tables it wrote (their size and digest are recorded)."""
        stats = {}
        for name in files:
            path = self.part_path(name, index)
            stats[name] = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
        atomic_write_text(self.marker_path(table, index), json.dumps(record | {"files": stats}, sort_keys=True))

    def part_marker(self, table: str, index: int) -> dict[str, Any] | None:
        """The part's marker if its files are all there as it recorded them, else None."""
        path = self.marker_path(table, index)
        if not path.exists():
            return None
        try:
            marker = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        for name, stat in marker.get("files", {}).items():
            part = self.part_path(name, index)
            if not part.exists() or part.stat().st_size != stat["bytes"]:
                return None
        return marker

    def part_count(self, table: str) -> int:
        return len(self.parts(table))

    def parts(self, table: str) -> list[Path]:
        folder = self.path / table
        return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []

    def scan(self, table: str, schema: dict[str, Any] | None = None) -> pl.LazyFrame:
        """A table's parts; with its `schema`, a column a part lacks (written by an earlier intgen, before the
        column existed, and kept because its stage's settings did not change) reads as nulls."""
        parts = self.parts(table)
        if not parts:
            raise MissingFile(f"{self.path}: table {table!r} has no output yet")
        if schema is None:
            return pl.scan_parquet(parts)
        return pl.scan_parquet(parts, schema=schema, missing_columns="insert")

    def table(self, table: str, schema: dict[str, Any] | None = None) -> pl.DataFrame:
        return self.scan(table, schema).collect()

    def clear_table(self, table: str, start: int = 0) -> None:
        """Remove parts `start`, `start + 1`, ... of a table, with their markers."""
        for folder in (self.path / table, self.path / "markers" / table):
            for path in sorted(folder.glob("part-*")) if folder.is_dir() else []:
                if int(path.name[5:10]) >= start:
                    path.unlink()

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()


@contextmanager
def held(path: Path | str) -> Iterator[RunDir]:
    """A run directory held by this process (a second one is refused at once), closed after."""
    run = RunDir(path)
    try:
        with run.locked():
            yield run
    finally:
        run.close()
