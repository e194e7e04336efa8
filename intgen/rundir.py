"""A run directory: the config, a manifest, one parquet table per stage (written in parts), the call cache.

Every file is written to a temporary name and renamed into place, so no half-written file is ever
read back; a part that exists is finished.
"""

from __future__ import annotations

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
    def part_path(self, stage: str, index: int) -> Path:
        return self.path / stage / f"part-{index:05d}.parquet"

    def has_part(self, stage: str, index: int) -> bool:
        return self.part_path(stage, index).exists()

    def write_part(self, stage: str, index: int, frame: pl.DataFrame) -> None:
        path = self.part_path(stage, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        frame.write_parquet(tmp)
        os.replace(tmp, path)

    def parts(self, stage: str) -> list[Path]:
        folder = self.path / stage
        return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []

    def scan(self, stage: str) -> pl.LazyFrame:
        parts = self.parts(stage)
        if not parts:
            raise FileNotFoundError(f"{self.path}: stage {stage!r} has no output yet")
        return pl.scan_parquet(parts)

    def table(self, stage: str) -> pl.DataFrame:
        return self.scan(stage).collect()

    def clear_stage(self, stage: str) -> None:
        for part in self.parts(stage):
            part.unlink()

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
