"""The run store: one directory per run (record, reports, lineage, charts, checkpoints) and the
versioned accepted schemas of each pipeline's sources.

Layout::

    <run_store>/
      <run_id>/run.json            the run record (status, stages, timings, rows, outputs, error)
      <run_id>/reports/<stage>.json
      <run_id>/lineage/events.jsonl
      <run_id>/charts/*.png
      <run_id>/stages/<stage>/...  persisted stage outputs (for --resume)
      <run_id>/report.html
      _schemas/<pipeline>/<source>/v<N>.json

The root is a local directory or an object-store URI (``s3://bucket/runs``; see
:mod:`rayline.storage`). Local files are written to a temporary name and renamed; an object is
written by one PUT: either way a reader never sees half a record. A new schema version is
claimed exclusively on local disk (a hard link); on an object store two runs accepting a
schema at the same instant may both write the same version number (last writer wins).
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .storage import Loc, ObjectPath, location

__all__ = ["RunStore", "atomic_write_text", "now_iso"]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def atomic_write_text(path: Loc, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a part."""
    if isinstance(path, ObjectPath):
        path.write_text(text)  # one PUT
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)


class RunStore:
    """Run directories and schema versions under one root (a directory or a URI)."""

    def __init__(self, root: str | os.PathLike[str] | ObjectPath) -> None:
        self.root: Loc = location(root)

    # -- runs ------------------------------------------------------------------------------

    def new_run_id(self, pipeline: str) -> str:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        return f"{pipeline}-{stamp}-{secrets.token_hex(2)}"

    def run_dir(self, run_id: str) -> Loc:
        if "/" in run_id or run_id.startswith("."):
            raise ValueError(f"invalid run id {run_id!r}")
        return self.root / run_id

    def write_record(self, run_id: str, record: dict[str, Any]) -> None:
        atomic_write_text(self.run_dir(run_id) / "run.json", _dumps(record))

    def read_record(self, run_id: str) -> dict[str, Any]:
        path = self.run_dir(run_id) / "run.json"
        if not path.is_file():
            known = ", ".join(r["run_id"] for r in self.list_runs()[:5]) or "none"
            raise FileNotFoundError(f"no run {run_id!r} in {self.root} (most recent: {known})")
        return json.loads(path.read_text())

    def write_report(self, run_id: str, stage: str, report: dict[str, Any]) -> Loc:
        path = self.run_dir(run_id) / "reports" / f"{stage}.json"
        atomic_write_text(path, _dumps(report))
        return path

    def read_report(self, run_id: str, stage: str) -> dict[str, Any] | None:
        path = self.run_dir(run_id) / "reports" / f"{stage}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def list_runs(self) -> list[dict[str, Any]]:
        """Run records, newest first."""
        if not self.root.is_dir():
            return []
        runs = []
        records = (
            self.root.glob("*/run.json")
            if isinstance(self.root, Path)
            else (d / "run.json" for d in self.root.iterdir())  # not a listing of every object
        )
        for p in records:
            try:
                runs.append(json.loads(p.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        runs.sort(key=lambda r: r.get("started_at", ""), reverse=True)
        return runs

    # -- schema versions --------------------------------------------------------------------

    def _schema_dir(self, pipeline: str, source: str) -> Loc:
        return self.root / "_schemas" / pipeline / source

    def latest_schema(self, pipeline: str, source: str) -> tuple[int, dict[str, Any]] | None:
        """The last accepted schema of a source as (version, document), or None."""
        d = self._schema_dir(pipeline, source)
        versions = sorted(
            (int(p.stem[1:]) for p in d.glob("v*.json") if p.stem[1:].isdigit()), reverse=True
        )
        if not versions:
            return None
        v = versions[0]
        return v, json.loads((d / f"v{v}.json").read_text())

    def accept_schema(
        self, pipeline: str, source: str, columns: list[dict[str, Any]], run_id: str, note: str
    ) -> int:
        """Record a new accepted schema version; returns its number."""
        latest = self.latest_schema(pipeline, source)
        version = (latest[0] if latest else 0) + 1
        doc = {
            "version": version,
            "source": source,
            "accepted_at": now_iso(),
            "run_id": run_id,
            "note": note,
            "columns": columns,
        }
        d = self._schema_dir(pipeline, source)
        path = d / f"v{version}.json"
        if isinstance(path, ObjectPath):  # no exclusive create on an object store
            if path.exists():
                return self.accept_schema(pipeline, source, columns, run_id, note)
            path.write_text(_dumps(doc))
            return version
        assert isinstance(d, Path)
        d.mkdir(parents=True, exist_ok=True)
        # Write a complete temp file, then hard-link it to the version's name: link() fails if
        # the name exists, so two runs accepting at once get distinct versions, and a reader
        # never sees a half-written file.
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".v", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(_dumps(doc))
            try:
                os.link(tmp, path)
            except FileExistsError:
                return self.accept_schema(pipeline, source, columns, run_id, note)
        finally:
            os.unlink(tmp)
        return version
