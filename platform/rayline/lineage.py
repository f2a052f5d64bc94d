"""Lineage events of a run, in the OpenLineage JSON format (one RunEvent per line).

Each stage emits START, then COMPLETE or FAIL, naming its input and output datasets with their
fingerprints, schemas and row counts, the stage's parameters and the code version.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from typing import Any

from .runstore import now_iso
from .storage import Loc, append_text

log = logging.getLogger("rayline")

__all__ = ["LineageLog", "dataset", "read_events", "format_graph"]

PRODUCER = "https://github.com/rayline/rayline"
RUN_EVENT_SCHEMA = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
_FACET_SCHEMA = (
    "https://openlineage.io/spec/facets/1-1-1/SchemaDatasetFacet.json#/$defs/SchemaDatasetFacet"
)


def _facet(schema_url: str, **fields: Any) -> dict[str, Any]:
    return {"_producer": PRODUCER, "_schemaURL": schema_url, **fields}


def dataset(
    namespace: str,
    name: str,
    *,
    schema: Any | None = None,
    fingerprint: str | None = None,
    rows: int | None = None,
    table: str | None = None,
) -> dict[str, Any]:
    """An OpenLineage dataset with the facets Rayline knows about it."""
    facets: dict[str, Any] = {}
    if schema is not None:
        facets["schema"] = _facet(
            _FACET_SCHEMA,
            fields=[{"name": f.name, "type": f.dataType.simpleString()} for f in schema.fields],
        )
    if fingerprint:
        facets["rayline_fingerprint"] = _facet(
            f"{PRODUCER}/facets/FingerprintFacet.json", fingerprint=fingerprint
        )
    if table:
        facets["symlinks"] = _facet(
            "https://openlineage.io/spec/facets/1-0-1/SymlinksDatasetFacet.json#/$defs/SymlinksDatasetFacet",
            identifiers=[{"namespace": "spark_catalog", "name": table, "type": "TABLE"}],
        )
    ds: dict[str, Any] = {"namespace": namespace, "name": name, "facets": facets}
    if rows is not None:
        ds["outputFacets"] = {
            "outputStatistics": _facet(
                "https://openlineage.io/spec/facets/1-0-2/OutputStatisticsOutputDatasetFacet.json#/$defs/OutputStatisticsOutputDatasetFacet",
                rowCount=rows,
            )
        }
    return ds


class LineageLog:
    """Appends the lineage events of one run to ``<run_dir>/lineage/events.jsonl``."""

    def __init__(self, run_dir: Loc, pipeline: str, run_id: str, code_version: str) -> None:
        self.path = run_dir / "lineage" / "events.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.pipeline = pipeline
        self.run_id = run_id
        self.code_version = code_version
        self._lock = threading.Lock()

    def _run_uuid(self, stage: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"rayline:{self.run_id}:{stage}"))

    def emit(
        self,
        event_type: str,
        stage: str,
        *,
        stage_type: str,
        params: dict[str, Any] | None = None,
        inputs: list[dict[str, Any]] | None = None,
        outputs: list[dict[str, Any]] | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        run_facets: dict[str, Any] = {
            "parent": _facet(
                "https://openlineage.io/spec/facets/1-0-1/ParentRunFacet.json#/$defs/ParentRunFacet",
                run={"runId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"rayline:{self.run_id}"))},
                job={"namespace": "rayline", "name": self.pipeline},
            ),
            "rayline_run": _facet(
                f"{PRODUCER}/facets/RunFacet.json",
                runId=self.run_id,
                codeVersion=self.code_version,
            ),
        }
        if error:
            run_facets["errorMessage"] = _facet(
                "https://openlineage.io/spec/facets/1-0-1/ErrorMessageRunFacet.json#/$defs/ErrorMessageRunFacet",
                message=error,
                programmingLanguage="python",
            )
        event = {
            "eventType": event_type,
            "eventTime": now_iso(),
            "producer": PRODUCER,
            "schemaURL": RUN_EVENT_SCHEMA,
            "run": {"runId": self._run_uuid(stage), "facets": run_facets},
            "job": {
                "namespace": "rayline",
                "name": f"{self.pipeline}.{stage}",
                "facets": {
                    "rayline_stage": _facet(
                        f"{PRODUCER}/facets/StageFacet.json", type=stage_type, params=params or {}
                    )
                },
            },
            "inputs": inputs or [],
            "outputs": outputs or [],
        }
        try:
            with self._lock:
                append_text(self.path, json.dumps(event, default=str) + "\n")
        except OSError as e:
            if event_type != "FAIL":
                raise
            # Recording a failure must not replace it (the store may be what failed).
            log.error("could not record the lineage event %s of %s: %s", event_type, stage, e)
        return event


def read_events(run_dir: Loc) -> list[dict[str, Any]]:
    path = run_dir / "lineage" / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rows(ds: dict[str, Any]) -> str:
    stats = ds.get("outputFacets", {}).get("outputStatistics")
    return f" ({stats['rowCount']:,} rows)" if stats else ""


def format_graph(events: list[dict[str, Any]]) -> str:
    """A text picture of a run's lineage: each stage with what it read and wrote."""
    final = [e for e in events if e["eventType"] in ("COMPLETE", "FAIL", "ABORT")]
    if not final:
        return "(no lineage events)"
    lines = []
    for e in final:
        stage = e["job"]["name"]
        kind = e["job"]["facets"].get("rayline_stage", {}).get("type", "?")
        lines.append(f"{stage} [{kind}] {e['eventType']}")
        for ds in e.get("inputs", []):
            fp = ds.get("facets", {}).get("rayline_fingerprint", {}).get("fingerprint")
            lines.append(f"  <- {ds['namespace']}:{ds['name']}" + (f" #{fp}" if fp else ""))
        for ds in e.get("outputs", []):
            lines.append(f"  -> {ds['namespace']}:{ds['name']}{_rows(ds)}")
        msg = e["run"]["facets"].get("errorMessage", {}).get("message")
        if msg:
            lines.append(f"  !! {msg.splitlines()[0]}")
    return "\n".join(lines)
