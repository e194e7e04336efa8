"""A run directory: the config, a manifest, one parquet table per stage output (written in parts), the call cache.

Every file is written to a temporary name and renamed into place, so no half-written file is ever
read back. A part is finished when its *marker* (`markers/TABLE/part-00000.json`, written after the
part's files; table folders hold nothing but parquet, so any reader can load them whole) says so: it records the stage's fingerprint, a digest of the input parts it was computed from,
the size and content digest of every file it wrote, and its failed rows. A part whose marker is missing,
stale or disagrees with the files on disk is computed again (its model calls come from the cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from intgen import __version__
from intgen.cache import CallCache


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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
        self.path.mkdir(parents=True, exist_ok=True)
        self._cache: CallCache | None = None

    @property
    def cache(self) -> CallCache:
        if self._cache is None:
            self._cache = CallCache(self.path / "cache.sqlite")
        return self._cache

    # --- manifest ---
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        if self.manifest_path.exists():
            return json.loads(self.manifest_path.read_text())
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

    def read_json(self, name: str) -> Any:
        path = self.path / name
        return json.loads(path.read_text()) if path.exists() else None

    # --- stage tables ---
    def part_path(self, table: str, index: int) -> Path:
        return self.path / table / f"part-{index:05d}.parquet"

    def marker_path(self, table: str, index: int) -> Path:
        return self.path / "markers" / table / f"part-{index:05d}.json"

    def has_part(self, table: str, index: int) -> bool:
        return self.part_path(table, index).exists()

    def write_part(self, table: str, index: int, frame: pl.DataFrame) -> None:
        path = self.part_path(table, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        frame.write_parquet(tmp)
        os.replace(tmp, path)

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

    def scan(self, table: str) -> pl.LazyFrame:
        parts = self.parts(table)
        if not parts:
            raise FileNotFoundError(f"{self.path}: table {table!r} has no output yet")
        return pl.scan_parquet(parts)

    def table(self, table: str) -> pl.DataFrame:
        return self.scan(table).collect()

    def clear_table(self, table: str, start: int = 0) -> None:
        """Remove parts `start`, `start + 1`, ... of a table, with their markers."""
        for folder in (self.path / table, self.path / "markers" / table):
            for path in sorted(folder.glob("part-*")) if folder.is_dir() else []:
                if int(path.name[5:10]) >= start:
                    path.unlink()

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
