"""Pydantic models of the ``streaming`` section of a pipeline spec.

The streaming job reads JSON events from Kafka, parses them against one of the spec's sources
(its ``columns`` contract is the event schema), applies the spec's own transform steps and row
quality rules (one definition, two engines), scores clean rows with a registered model and
writes predictions and dead letters to Kafka, plus windowed aggregates to the warehouse.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["StreamingSpec", "WindowSpec"]

_IDENT = r"^[A-Za-z_][A-Za-z0-9_]*$"
_DURATION = re.compile(r"^\s*\d+\s+(second|minute|hour|day)s?\s*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WindowSpec(_Model):
    """Event-time window aggregates with a watermark, appended to a warehouse table."""

    table: str = Field(..., pattern=_IDENT, description="Warehouse table of the aggregates.")
    time_column: str = Field(..., description="Event-time column of the parsed events.")
    duration: str = Field("10 minutes", description="Window length, e.g. '10 minutes'.")
    watermark: str = Field(
        "30 minutes", description="How late an event may arrive; later ones are counted, dropped."
    )
    group_by: list[str] = Field(default_factory=list, description="Grouping columns.")
    metrics: list[str] = Field(
        ..., min_length=1, description="Numeric columns: count, mean, max per window and group."
    )
    trigger_seconds: float = Field(
        30.0,
        gt=0,
        description="Interval of the window query (the stream's trigger_seconds if that is "
        "longer). Windows are written once the watermark passes them, so a short interval only "
        "adds work: each trigger of the window query is a stateful Spark job that shares the "
        "executors with the scoring query.",
    )

    @field_validator("duration", "watermark")
    @classmethod
    def _dur(cls, v: str) -> str:
        if not _DURATION.match(v):
            raise ValueError(f"{v!r} is not a duration like '10 minutes' or '1 hour'")
        return v.strip()


class StreamingSpec(_Model):
    """Kafka in, Kafka out; the same transform and rules as the batch pipeline."""

    bootstrap_servers: str = Field(
        "127.0.0.1:19092", description="Kafka bootstrap servers (host:port,...)."
    )
    input_topic: str = Field(..., min_length=1, description="Topic of JSON events.")
    source: str = Field(
        ..., description="The spec source whose `columns` contract is the event schema."
    )
    output_topic: str = Field(..., min_length=1, description="Topic of the predictions.")
    dead_letter_topic: str = Field(
        ..., min_length=1, description="Topic of unparsable and rule-breaking events."
    )
    key_columns: list[str] = Field(
        default_factory=list,
        description="Columns that make an event's key (default: the Kafka message key).",
    )
    event_time_column: str | None = Field(
        None, description="Column copied into each prediction as its event time."
    )
    model: str | None = Field(
        None,
        description="Model reference NAME@ALIAS or NAME@VERSION (default: the ml section's "
        "model at its gate alias). An alias is re-resolved before every micro-batch.",
    )
    registry: str | None = Field(None, description="Registry URI (default: the ml section's).")
    checkpoint_location: str = Field(
        "checkpoints", description="Directory of the queries' checkpoints (one per spec name)."
    )
    trigger_seconds: float = Field(5.0, gt=0, description="Micro-batch interval.")
    max_offsets_per_trigger: int = Field(
        20_000, ge=1, description="Most events read per micro-batch."
    )
    min_partitions: int | None = Field(
        None,
        ge=1,
        description="Spark tasks that read and parse a micro-batch at least (Kafka's "
        "`minPartitions`: a topic partition's offsets are split among them). Default: the "
        "executors' cores, so that one input partition still uses every core.",
    )
    starting_offsets: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a new query (no checkpoint yet) starts."
    )
    stages: list[str] | None = Field(
        None,
        description="Transform and quality stages applied, by name (default: all of them).",
    )
    window: WindowSpec | None = Field(None, description="Windowed aggregates (optional).")
