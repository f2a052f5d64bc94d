"""Pydantic models of a pipeline spec, and YAML loading with errors that name the key.

A spec is plain YAML. ``${VAR}`` and ``${VAR:-default}`` in string values are expanded from
the environment when the spec is loaded; relative paths are resolved against the directory the
pipeline is run from. Nothing here touches Spark or Ray: an invalid spec fails before either
starts.

Example:
    >>> spec = load_spec("pipelines/flights.yaml")  # doctest: +SKIP
    >>> [s.name for s in spec.stages]  # doctest: +SKIP
    ['schema', 'prepare', 'checks', 'profile']
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .ml.spec import MLSpec
from .streaming.spec import StreamingSpec

__all__ = [
    "SpecError",
    "PipelineSpec",
    "SourceSpec",
    "SessionConfig",
    "load_spec",
    "parse_spec",
]

# Spark SQL type names the schema contract accepts (lower-case, as ``DataType.simpleString``).
SIMPLE_TYPES = {
    "boolean",
    "tinyint",
    "smallint",
    "int",
    "bigint",
    "float",
    "double",
    "string",
    "date",
    "timestamp",
    "timestamp_ntz",
    "binary",
}
TYPE_ALIASES = {
    "integer": "int",
    "long": "bigint",
    "short": "smallint",
    "byte": "tinyint",
    "bool": "boolean",
    "str": "string",
    "real": "float",
}
_DECIMAL = re.compile(r"^decimal\(\s*\d+\s*,\s*\d+\s*\)$")
_IDENT = r"^[A-Za-z_][A-Za-z0-9_]*$"


def normalize_type(name: str) -> str:
    """Return the canonical Spark simple-string name of a type, or raise ValueError."""
    t = name.strip().lower()
    t = TYPE_ALIASES.get(t, t)
    if t in SIMPLE_TYPES or _DECIMAL.match(t):
        return t.replace(" ", "")
    raise ValueError(
        f"unknown type {name!r}; expected one of {sorted(SIMPLE_TYPES | set(TYPE_ALIASES))} "
        "or decimal(p,s)"
    )


class SpecError(ValueError):
    """A pipeline spec that cannot be used; the message names the file and key at fault."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


# ---------------------------------------------------------------------------------------------
# Session
# ---------------------------------------------------------------------------------------------


class SessionConfig(_Model):
    """Where to run: the Ray cluster and the size of the Spark-on-Ray cluster inside it."""

    ray_address: str | None = Field(
        None,
        description="Ray cluster to connect to ('auto', 'ray://host:10001', 'host:6379'). "
        "Unset: RAY_ADDRESS if set, else a new local Ray instance.",
    )
    num_cpus: int | None = Field(
        None,
        ge=1,
        description="Logical CPUs of a *local* Ray instance. Default: machine cores + the CPUs "
        "the Spark executors reserve, so Ray Data tasks can still be scheduled beside Spark.",
    )
    app_name: str = Field("rayline", description="Spark application name.")
    num_executors: int = Field(1, ge=1, le=256, description="Spark executors (Ray actors).")
    executor_cores: int = Field(2, ge=1, le=64, description="Spark task slots per executor.")
    executor_memory: str = Field(
        "2g", pattern=r"^\d+[kmgtKMGT]?$", description="JVM heap of each executor, e.g. 2g."
    )
    executor_cpus: float = Field(
        1.0,
        gt=0,
        description="Logical Ray CPUs each executor actor reserves (may be fractional; it holds "
        "them for the whole session).",
    )
    driver_memory: str = Field("2g", pattern=r"^\d+[kmgtKMGT]?$", description="Driver JVM heap.")
    shuffle_partitions: int | None = Field(
        None,
        ge=1,
        description="spark.sql.shuffle.partitions. Default: 2 x total executor cores (small "
        "clusters drown in Spark's default of 200).",
    )
    enable_hive: bool = Field(
        True, description="Register outputs in a Hive metastore (embedded Derby by default)."
    )
    metastore_url: str | None = Field(
        None,
        description="JDBC URL of the Hive metastore. Default: embedded Derby under the warehouse.",
    )
    spark_conf: dict[str, str] = Field(
        default_factory=dict, description="Extra Spark settings, applied last."
    )
    local_ip: str | None = Field(
        "127.0.0.1",
        description="Address a *local* Ray and Spark bind to (SPARK_LOCAL_IP, Ray node IP). "
        "Ignored when connecting to an existing cluster.",
    )

    @field_validator("spark_conf", mode="before")
    @classmethod
    def _stringify(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {
                str(k): (str(x).lower() if isinstance(x, bool) else str(x)) for k, x in v.items()
            }
        return v


# ---------------------------------------------------------------------------------------------
# Sources and schema contract
# ---------------------------------------------------------------------------------------------


class ColumnSpec(_Model):
    """One column of a schema contract."""

    name: str = Field(..., min_length=1, description="Column name as it appears in the source.")
    type: str = Field(..., description="Spark SQL type, e.g. int, bigint, double, string.")
    nullable: bool = Field(True, description="Whether nulls are allowed by the contract.")

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        return normalize_type(v)


class SourceSpec(_Model):
    """A named input: file(s) of one format, how to read them, and the schema contract."""

    path: str = Field(..., min_length=1, description="File, directory or glob.")
    format: Literal["csv", "parquet", "json"] = Field(..., description="File format.")
    options: dict[str, str] = Field(
        default_factory=dict,
        description="Spark reader options (csv: header, sep, nullValue, dateFormat, ...).",
    )
    columns: list[ColumnSpec] | None = Field(
        None,
        description="Expected schema (the contract). Unset: the inferred schema is the contract "
        "once accepted.",
    )
    on_schema_change: Literal["fail", "evolve", "warn"] = Field(
        "fail",
        description="What to do when the inferred schema differs from the contract or the last "
        "accepted schema: fail the run, evolve (accept and record a new version), or warn.",
    )
    max_malformed_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Rows that do not parse against the accepted schema are quarantined as "
        "malformed; beyond this fraction of a column's values (a column of the wrong type) or "
        "of all rows, the run fails instead.",
    )
    infer_sample_rows: int | None = Field(
        20000,
        ge=100,
        description="CSV/JSON: infer the schema from the first rows of each file (up to 8 "
        "files) instead of parsing everything once more; rows further on that do not fit the "
        "accepted schema are quarantined as malformed. Unset (null): infer from all rows.",
    )

    @field_validator("options", mode="before")
    @classmethod
    def _stringify(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {
                str(k): (str(x).lower() if isinstance(x, bool) else str(x)) for k, x in v.items()
            }
        return v

    @field_validator("columns")
    @classmethod
    def _unique_columns(cls, v: list[ColumnSpec] | None) -> list[ColumnSpec] | None:
        if v is not None:
            seen: set[str] = set()
            for c in v:
                if c.name in seen:
                    raise ValueError(f"column {c.name!r} is declared twice")
                seen.add(c.name)
        return v


# ---------------------------------------------------------------------------------------------
# Transform steps
# ---------------------------------------------------------------------------------------------


class SelectStep(_Model):
    op: Literal["select"]
    columns: list[str] = Field(..., min_length=1, description="Columns to keep, in order.")


class DropStep(_Model):
    op: Literal["drop"]
    columns: list[str] = Field(..., min_length=1, description="Columns to remove.")


class RenameStep(_Model):
    op: Literal["rename"]
    columns: dict[str, str] = Field(..., min_length=1, description="Old name -> new name.")


class CastStep(_Model):
    op: Literal["cast"]
    columns: dict[str, str] = Field(..., min_length=1, description="Column -> Spark SQL type.")

    @field_validator("columns")
    @classmethod
    def _types(cls, v: dict[str, str]) -> dict[str, str]:
        return {k: normalize_type(t) for k, t in v.items()}


class DeriveStep(_Model):
    op: Literal["derive"]
    columns: dict[str, str] = Field(
        ..., min_length=1, description="New column -> Spark SQL expression, in order."
    )


class FilterStep(_Model):
    op: Literal["filter"]
    condition: str = Field(..., min_length=1, description="Spark SQL boolean; rows kept if true.")


class FillNullStep(_Model):
    op: Literal["fill_null"]
    values: dict[str, str | int | float | bool] = Field(
        ..., min_length=1, description="Column -> value replacing nulls."
    )


class DedupeStep(_Model):
    op: Literal["dedupe"]
    keys: list[str] = Field(..., min_length=1, description="Rows with equal keys are duplicates.")
    order_by: str | None = Field(
        None,
        description="Spark SQL ordering ('col DESC') picking the row kept; unset: any one row.",
    )


class JoinStep(_Model):
    op: Literal["join"]
    source: str = Field(..., description="Name of the source joined in.")
    on: list[str] = Field(..., min_length=1, description="Key columns of the pipeline's data.")
    right_on: list[str] | None = Field(
        None, description="Matching key columns of the joined source (default: same as on)."
    )
    how: Literal["inner", "left"] = Field("left", description="Join type.")
    columns: list[str] | None = Field(
        None, description="Columns taken from the joined source (default: all but the keys)."
    )
    prefix: str = Field("", description="Prefix for the joined columns, avoiding name clashes.")
    broadcast: bool = Field(False, description="Broadcast the joined source (small lookup tables).")

    @model_validator(mode="after")
    def _keys(self) -> JoinStep:
        if self.right_on is not None and len(self.right_on) != len(self.on):
            raise ValueError(f"right_on has {len(self.right_on)} keys, on has {len(self.on)}")
        return self


class TimestampStep(_Model):
    op: Literal["timestamp"]
    column: str = Field(..., description="Timestamp column to create.")
    from_parts: dict[str, str] | None = Field(
        None,
        description="year, month, day, hour, minute (and optional second): each a column or SQL "
        "expression; the timestamp is built with make_timestamp.",
    )
    from_string: str | None = Field(None, description="String column to parse.")
    format: str | None = Field(None, description="Datetime pattern for from_string.")
    timezone: str | None = Field(
        None, description="Time zone the parts are in (converted to UTC); unset: session zone."
    )

    @model_validator(mode="after")
    def _one_source(self) -> TimestampStep:
        if (self.from_parts is None) == (self.from_string is None):
            raise ValueError("give exactly one of from_parts and from_string")
        if self.from_parts is not None:
            missing = {"year", "month", "day"} - set(self.from_parts)
            if missing:
                raise ValueError(f"from_parts lacks {sorted(missing)}")
            extra = set(self.from_parts) - {"year", "month", "day", "hour", "minute", "second"}
            if extra:
                raise ValueError(f"from_parts has unknown parts {sorted(extra)}")
        return self


TransformStep = Annotated[
    SelectStep
    | DropStep
    | RenameStep
    | CastStep
    | DeriveStep
    | FilterStep
    | FillNullStep
    | DedupeStep
    | JoinStep
    | TimestampStep,
    Field(discriminator="op"),
]


# ---------------------------------------------------------------------------------------------
# Quality rules
# ---------------------------------------------------------------------------------------------


class _RuleBase(_Model):
    name: str = Field(..., pattern=_IDENT, description="Unique rule name (shown in reports).")
    severity: Literal["warn", "quarantine", "fail"] = Field(
        "quarantine",
        description="warn: report only; quarantine: failing rows leave the clean set; fail: "
        "the run stops.",
    )
    max_failed_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Tolerated fraction of failing rows. Beyond it a fail or quarantine rule "
        "stops the run. Default: 0 for fail, unlimited for quarantine and warn.",
    )

    def tolerance(self) -> float:
        if self.max_failed_fraction is not None:
            return self.max_failed_fraction
        return 0.0 if self.severity == "fail" else 1.0


class NotNullRule(_RuleBase):
    type: Literal["not_null"]
    columns: list[str] = Field(..., min_length=1, description="Columns that must not be null.")


class UniqueRule(_RuleBase):
    type: Literal["unique"]
    columns: list[str] = Field(
        ..., min_length=1, description="Key columns (several: a compound key)."
    )


class RangeRule(_RuleBase):
    type: Literal["range"]
    column: str = Field(..., description="Numeric column checked.")
    min: float | None = Field(None, description="Lower bound.")
    max: float | None = Field(None, description="Upper bound.")
    inclusive: bool = Field(True, description="Whether the bounds themselves are allowed.")

    @model_validator(mode="after")
    def _bounds(self) -> RangeRule:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class RegexRule(_RuleBase):
    type: Literal["regex"]
    column: str = Field(..., description="Column checked (as text).")
    pattern: str = Field(..., description="Java regular expression the whole value must match.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"pattern does not compile: {e}") from e
        return v


class InSetRule(_RuleBase):
    type: Literal["in_set"]
    column: str = Field(..., description="Column checked.")
    values: list[str | int | float | bool] = Field(..., min_length=1, description="Allowed values.")


class ReferentialRule(_RuleBase):
    type: Literal["referential"]
    column: str = Field(..., description="Column whose values must exist in the reference.")
    source: str = Field(..., description="Source holding the reference values.")
    source_column: str | None = Field(None, description="Reference column (default: same name).")


class RowCountRule(_RuleBase):
    severity: Literal["warn", "fail"] = Field(
        "fail", description="A dataset rule has no rows to quarantine: warn or fail."
    )
    type: Literal["row_count"]
    min: int | None = Field(None, ge=0, description="Fewest rows allowed.")
    max: int | None = Field(None, ge=0, description="Most rows allowed.")

    @model_validator(mode="after")
    def _bounds(self) -> RowCountRule:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class FreshnessRule(_RuleBase):
    severity: Literal["warn", "fail"] = Field(
        "fail", description="A dataset rule has no rows to quarantine: warn or fail."
    )
    type: Literal["freshness"]
    column: str = Field(..., description="Timestamp column.")
    max_age: str = Field(
        ..., pattern=r"^\d+\s*[smhdw]$", description="Largest allowed age, e.g. 36h, 7d, 52w."
    )
    reference: str | None = Field(
        None, description="ISO timestamp the age is measured from (default: the run's start)."
    )

    def max_age_seconds(self) -> int:
        n, unit = int(self.max_age[:-1].strip()), self.max_age[-1]
        return n * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]


class ExpressionRule(_RuleBase):
    type: Literal["expression"]
    expression: str = Field(
        ..., min_length=1, description="Spark SQL boolean a good row satisfies (null passes)."
    )


QualityRule = Annotated[
    NotNullRule
    | UniqueRule
    | RangeRule
    | RegexRule
    | InSetRule
    | ReferentialRule
    | RowCountRule
    | FreshnessRule
    | ExpressionRule,
    Field(discriminator="type"),
]

ROW_RULE_TYPES = {"not_null", "unique", "range", "regex", "in_set", "referential", "expression"}


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


class _StageBase(_Model):
    name: str = Field(..., pattern=_IDENT, description="Unique stage name.")


class SchemaStage(_StageBase):
    """Infer each source's schema and compare it with its contract and last accepted version."""

    type: Literal["schema"]
    sources: list[str] | None = Field(None, description="Sources to check (default: all).")


class TransformStage(_StageBase):
    """Declarative, lazy steps over one source (joins bring in others)."""

    type: Literal["transform"]
    input: str | None = Field(
        None,
        description="Source to start from. Unset: the output of the previous stage.",
    )
    steps: list[TransformStep] = Field(..., min_length=1, description="Steps, applied in order.")


class QualityStage(_StageBase):
    """Rules over the current DataFrame; failing rows are quarantined with their reasons."""

    type: Literal["quality"]
    rules: list[QualityRule] = Field(
        ..., min_length=1, description="Rules, each with a unique name."
    )
    sample_size: int = Field(5, ge=0, le=100, description="Failing rows shown per rule.")

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, v: list[Any]) -> list[Any]:
        names = [r.name for r in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"rule names must be unique; repeated: {sorted(dup)}")
        return v


class AnalyticsStage(_StageBase):
    """Distributed statistics, correlations, outliers and charts of the current DataFrame."""

    type: Literal["analytics"]
    numeric_columns: list[str] | None = Field(None, description="Default: all numeric columns.")
    categorical_columns: list[str] | None = Field(None, description="Default: all string columns.")
    quantiles: list[float] = Field(
        [0.05, 0.25, 0.5, 0.75, 0.95], description="Approximate quantiles per numeric column."
    )
    quantile_accuracy: int = Field(
        1000,
        ge=10,
        le=1_000_000,
        description="Quantile accuracy: the rank error is at most 1/accuracy of the rows, as for "
        "Spark's percentile_approx (exact with fewer values than this per partition).",
    )
    outlier_method: Literal["iqr", "zscore"] = Field(
        "iqr", description="Outliers beyond IQR fences or beyond |z| from the mean."
    )
    outlier_threshold: float = Field(
        1.5, gt=0, description="IQR multiplier (iqr) or |z| limit (zscore, e.g. 3)."
    )
    histogram_bins: int = Field(20, ge=2, le=200, description="Buckets per histogram.")
    top_k: int = Field(10, ge=1, le=100, description="Top values per categorical column.")
    sample_size: int = Field(5, ge=0, le=100, description="Outlier rows shown per column.")
    correlation: bool = Field(True, description="Compute the Pearson correlation matrix.")

    @field_validator("quantiles")
    @classmethod
    def _q(cls, v: list[float]) -> list[float]:
        if any(not 0 <= q <= 1 for q in v):
            raise ValueError("quantiles must lie in [0, 1]")
        return sorted(set(v))


Stage = Annotated[
    SchemaStage | TransformStage | QualityStage | AnalyticsStage, Field(discriminator="type")
]


class OutputSpec(_Model):
    """A table written as Parquet under the warehouse and registered in the catalog."""

    table: str = Field(
        ...,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$",
        description="Catalog table name (optionally db.table); also its directory name.",
    )
    partition_by: list[str] = Field(default_factory=list, description="Partition columns.")
    mode: Literal["overwrite", "append"] = Field(
        "overwrite", description="Replace the table, or add this run's rows to it."
    )


class OutputsSpec(_Model):
    """The curated table and the quarantine table."""

    curated: OutputSpec = Field(..., description="The clean result of the last stage.")
    quarantine: OutputSpec | None = Field(
        None, description="Quarantined rows with their reasons (default: <curated>_quarantine)."
    )

    def quarantine_or_default(self) -> OutputSpec:
        return self.quarantine or OutputSpec(
            table=f"{self.curated.table}_quarantine", mode="overwrite"
        )


class PipelineSpec(_Model):
    """A whole pipeline: sources, stages in order, outputs, and where to run and store."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Pipeline name.")
    description: str = Field("", description="Free text shown in reports.")
    sources: dict[str, SourceSpec] = Field(
        ..., min_length=1, description="Named inputs; stages refer to them by name."
    )
    stages: list[Stage] = Field(..., min_length=1, description="Stages, run in order.")
    outputs: OutputsSpec = Field(..., description="The tables the run publishes.")
    warehouse: str = Field("warehouse", description="Directory of output tables.")
    run_store: str = Field("runs", description="Directory of run records and schema versions.")
    checkpoint_stages: bool = Field(
        False,
        description="Also write each transform stage's output to the run directory (Parquet); "
        "downstream stages then read that copy, and --resume reads it instead of recomputing "
        "the transform. Off: the transform stays lazy and runs inside the next stage's pass "
        "(faster); --resume still reuses unchanged stages, recomputing the transform lazily.",
    )
    session: SessionConfig = Field(
        default_factory=SessionConfig,
        description="Where and how big Spark-on-Ray runs.",
    )
    ml: MLSpec | None = Field(
        None,
        description="Train, evaluate and register a model on the curated table "
        "(`rayline run --train`, `rayline train`).",
    )
    streaming: StreamingSpec | None = Field(
        None,
        description="Kafka events through the same transform and rules, scored by the "
        "registered model (`rayline stream run`).",
    )

    @model_validator(mode="after")
    def _cross_refs(self) -> PipelineSpec:
        names = [s.name for s in self.stages]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"stage names must be unique; repeated: {sorted(dup)}")
        for s_name in self.sources:
            if not re.match(_IDENT, s_name):
                raise ValueError(f"source name {s_name!r} must be an identifier")
        for i, st in enumerate(self.stages):
            where = f"stages[{i}] ({st.name})"
            if isinstance(st, SchemaStage):
                for src in st.sources or []:
                    self._need_source(src, f"{where}.sources")
            elif isinstance(st, TransformStage):
                if st.input is not None:
                    self._need_source(st.input, f"{where}.input")
                elif i == 0 or all(isinstance(p, SchemaStage) for p in self.stages[:i]):
                    raise ValueError(
                        f"{where}.input: the first transform must name its input source"
                    )
                for j, step in enumerate(st.steps):
                    if isinstance(step, JoinStep):
                        self._need_source(step.source, f"{where}.steps[{j}].source")
            elif isinstance(st, QualityStage):
                for j, rule in enumerate(st.rules):
                    if isinstance(rule, ReferentialRule):
                        self._need_source(rule.source, f"{where}.rules[{j}].source")
        if self.streaming is not None:
            src = self.streaming.source
            self._need_source(src, "streaming.source")
            if not self.sources[src].columns:
                raise ValueError(
                    f"streaming.source: source {src!r} needs a `columns` contract (the schema "
                    "events are parsed with)"
                )
        if not any(isinstance(s, TransformStage) for s in self.stages) and len(self.sources) != 1:
            raise ValueError(
                "with several sources, a transform stage must say which one the pipeline uses"
            )
        return self

    def _need_source(self, name: str, where: str) -> None:
        if name not in self.sources:
            raise ValueError(f"{where}: unknown source {name!r}; known: {sorted(self.sources)}")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            raise SpecError(f"{where}: environment variable {var} is not set and has no default")

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


# Environment overrides of session settings: RAYLINE_<FIELD> (e.g. RAYLINE_NUM_EXECUTORS=2).
_SESSION_ENV = {name: f"RAYLINE_{name.upper()}" for name in SessionConfig.model_fields}
_TOP_ENV = {"warehouse": "RAYLINE_WAREHOUSE", "run_store": "RAYLINE_RUN_STORE"}


def _apply_env_overrides(raw: dict[str, Any]) -> dict[str, Any]:
    session = dict(raw.get("session") or {})
    for field, var in _SESSION_ENV.items():
        if var in os.environ and field != "spark_conf":
            session[field] = os.environ[var]
    if session:
        raw["session"] = session
    for field, var in _TOP_ENV.items():
        if var in os.environ:
            raw[field] = os.environ[var]
    return raw


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid pipeline spec ({err.error_count()} problem(s)):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<top>"
        msg = e["msg"]
        if e["type"] == "union_tag_invalid":
            ctx = e.get("ctx", {})
            msg = (
                f"unknown {ctx.get('discriminator', 'type').strip(chr(39))} "
                f"{ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
            )
        elif e["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def parse_spec(raw: Any, origin: str = "<spec>") -> PipelineSpec:
    """Validate a spec given as a mapping (already parsed YAML).

    Args:
        raw: The mapping.
        origin: Name used in error messages (the file path).

    Returns:
        The validated spec, with environment variables expanded and ``RAYLINE_*`` overrides
        applied.

    Raises:
        SpecError: naming each key at fault and what was expected.
    """
    if not isinstance(raw, dict):
        raise SpecError(f"{origin}: a pipeline spec must be a mapping, got {type(raw).__name__}")
    raw = _apply_env_overrides(_expand(raw, "spec"))
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(_format_errors(e, origin)) from None


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false are booleans, so `on:`, `yes`, `no`, `off`
    stay strings (a join's ``on:`` key would otherwise become ``True``)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def load_spec(path: str | os.PathLike[str]) -> PipelineSpec:
    """Read and validate a YAML pipeline spec.

    Args:
        path: The YAML file.

    Returns:
        The validated :class:`PipelineSpec`.

    Raises:
        SpecError: the file is missing, is not YAML (with line and column), or is invalid.
    """
    p = Path(path)
    return parse_spec(_read_yaml(p, set()), str(p))


def _read_yaml(p: Path, seen: set[Path]) -> Any:
    """Read a spec file; ``extends: other.yaml`` (relative to this file) starts from another
    spec, whose top-level keys this file's keys replace."""
    if not p.is_file():
        raise SpecError(f"{p}: spec file not found")
    try:
        raw = yaml.load(p.read_text(), Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise SpecError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if isinstance(raw, dict) and "extends" in raw:
        base_ref = raw.pop("extends")
        if not isinstance(base_ref, str):
            raise SpecError(f"{p}: extends: expected a file name, got {base_ref!r}")
        base_path = (p.parent / base_ref).resolve()
        if base_path in seen:
            raise SpecError(f"{p}: extends: {base_ref} extends itself (cycle)")
        base = _read_yaml(base_path, seen | {p.resolve()})
        if not isinstance(base, dict):
            raise SpecError(f"{base_path}: a pipeline spec must be a mapping")
        raw = {**base, **raw}
    return raw
