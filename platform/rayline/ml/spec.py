"""Pydantic models of the ``ml`` section of a pipeline spec: features, split, model, training,
tuning, the Spark challenger, evaluation, registry and promotion gate.

Nothing here imports Ray, Spark or TensorFlow; the section is validated with the rest of the
spec, before anything starts.

Example:
    >>> MLSpec.model_validate({
    ...     "model_name": "delay", "task": "regression", "label": "arr_delay",
    ...     "features": {"numeric": ["dep_delay"], "categorical": [{"name": "carrier"}]},
    ... }).training.num_workers
    1
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "CategoricalFeature",
    "BucketFeature",
    "FeaturesSpec",
    "SplitSpec",
    "ModelSpec",
    "TrainingSpec",
    "TuningSpec",
    "SparkModelSpec",
    "EvaluationSpec",
    "GateSpec",
    "MLSpec",
    "METRICS",
]

_IDENT = r"^[A-Za-z_][A-Za-z0-9_]*$"

# Metric name -> True when higher is better.
METRICS: dict[str, dict[str, bool]] = {
    "regression": {"rmse": False, "mae": False, "r2": True},
    "binary": {
        "accuracy": True,
        "precision": True,
        "recall": True,
        "f1": True,
        "roc_auc": True,
        "log_loss": False,
    },
    "multiclass": {"accuracy": True, "macro_f1": True, "log_loss": False},
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CategoricalFeature(_Model):
    """A string (or integer-coded) column turned into a vocabulary index."""

    name: str = Field(..., pattern=_IDENT, description="Column name.")
    encoding: Literal["onehot", "embedding"] = Field(
        "onehot",
        description="onehot: one input per category; embedding: a learned vector per category "
        "(for high-cardinality columns).",
    )
    max_categories: int = Field(
        50, ge=1, le=100_000, description="Most frequent values kept; the rest share 'unknown'."
    )
    min_frequency: int = Field(
        1, ge=1, description="Values seen fewer times in the train split map to 'unknown'."
    )
    embedding_dim: int = Field(8, ge=1, le=512, description="Vector size (encoding: embedding).")


class BucketFeature(_Model):
    """A numeric column cut into buckets at fixed boundaries, then one-hot encoded."""

    name: str = Field(..., pattern=_IDENT, description="Numeric column.")
    boundaries: list[float] = Field(
        ..., min_length=1, description="Ascending cut points; n boundaries give n+1 buckets."
    )

    @field_validator("boundaries")
    @classmethod
    def _ascending(cls, v: list[float]) -> list[float]:
        if any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError("boundaries must be strictly ascending")
        return v


class FeaturesSpec(_Model):
    """Model inputs. Numeric columns are standardized with the train split's mean and std
    (nulls become the mean); categorical values outside the train vocabulary map to a reserved
    'unknown' bucket."""

    numeric: list[str] = Field(default_factory=list, description="Numeric columns.")
    categorical: list[CategoricalFeature] = Field(
        default_factory=list, description="Categorical columns."
    )
    buckets: list[BucketFeature] = Field(
        default_factory=list, description="Bucketized numeric columns."
    )

    @field_validator("categorical", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        # A bare column name is shorthand for {name: col}.
        if isinstance(v, list):
            return [{"name": x} if isinstance(x, str) else x for x in v]
        return v

    @model_validator(mode="after")
    def _non_empty(self) -> FeaturesSpec:
        cols = self.columns()
        if not cols:
            raise ValueError("at least one feature (numeric, categorical or buckets) is needed")
        dup = sorted({c for c in cols if cols.count(c) > 1})
        if dup:
            raise ValueError(f"features listed twice: {dup}")
        for c in self.numeric:
            if not re.match(_IDENT, c):
                raise ValueError(f"numeric feature {c!r} must be an identifier")
        return self

    def columns(self) -> list[str]:
        """Every input column, in model order."""
        return (
            list(self.numeric) + [c.name for c in self.categorical] + [b.name for b in self.buckets]
        )


class SplitSpec(_Model):
    """Deterministic train/validation/test split."""

    method: Literal["random", "time"] = Field(
        "random",
        description="random: seeded hash of each row's key columns (independent of partitioning); "
        "time: by a time column's cut points.",
    )
    seed: int = Field(42, description="Seed of the random split.")
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="Random split: validation.")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="Random split: test.")
    key_columns: list[str] | None = Field(
        None, description="Random split: columns hashed per row (default: features + label)."
    )
    time_column: str | None = Field(None, description="Time split: the column compared.")
    validation_start: str | None = Field(
        None,
        description="Time split: rows at or after this value (and before test_start) "
        "are validation.",
    )
    test_start: str | None = Field(None, description="Time split: rows at or after are test.")

    @model_validator(mode="after")
    def _time(self) -> SplitSpec:
        if self.method == "time":
            missing = [
                k
                for k in ("time_column", "validation_start", "test_start")
                if getattr(self, k) is None
            ]
            if missing:
                raise ValueError(f"method 'time' needs {missing}")
        if self.validation_fraction + self.test_fraction >= 0.9:
            raise ValueError("validation_fraction + test_fraction must leave >= 10% to train")
        return self


class ModelSpec(_Model):
    """The Keras model: an MLP over the preprocessed inputs."""

    hidden_units: list[int] = Field(
        default_factory=lambda: [64, 64], description="Units per hidden layer."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after each hidden layer.")
    activation: Literal["relu", "gelu", "tanh", "selu"] = Field("relu", description="Activation.")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Adam learning rate.")
    batch_size: int = Field(1024, ge=1, le=1_000_000, description="Global batch size.")
    epochs: int = Field(10, ge=1, le=10_000, description="Most epochs.")
    early_stopping_patience: int | None = Field(
        3, ge=1, description="Stop after this many epochs without validation improvement."
    )


class TrainingSpec(_Model):
    """Ray Train settings."""

    num_workers: int = Field(1, ge=1, le=256, description="Ray Train workers.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs each worker reserves.")
    threads_per_worker: int | None = Field(
        None, ge=1, description="TensorFlow intra-op threads per worker (default: its CPUs)."
    )
    pin_cpus: bool = Field(
        True,
        description="With 2+ workers on a node, bind each to its own share of the node's cores.",
    )
    max_failures: int = Field(
        1, ge=0, description="Worker failures tolerated (resumes from the last checkpoint)."
    )
    storage_path: str | None = Field(
        None, description="Where Ray Train keeps checkpoints (default: the run directory)."
    )


class SearchDim(_Model):
    """One dimension of the search space; exactly one of the keys."""

    choice: list[Any] | None = Field(None, description="Pick one of these values.")
    uniform: tuple[float, float] | None = Field(None, description="Uniform in [low, high].")
    loguniform: tuple[float, float] | None = Field(None, description="Log-uniform in [low, high].")
    randint: tuple[int, int] | None = Field(None, description="Integer in [low, high).")

    @model_validator(mode="after")
    def _one(self) -> SearchDim:
        set_ = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k)]
        if len(set_) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform, randint")
        return self


_TUNABLE = {"learning_rate", "hidden_units", "dropout", "batch_size", "activation"}


class TuningSpec(_Model):
    """Ray Tune over the model settings, with ASHA early stopping."""

    num_samples: int = Field(4, ge=1, le=10_000, description="Trials.")
    max_concurrent: int = Field(
        1, ge=1, description="Trials at once (each holds num_workers x cpus_per_worker CPUs)."
    )
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial may be stopped.")
    reduction_factor: int = Field(2, ge=2, description="ASHA reduction factor.")
    search_space: dict[str, SearchDim] = Field(
        ..., min_length=1, description=f"Model settings to search: any of {sorted(_TUNABLE)}."
    )

    @field_validator("search_space")
    @classmethod
    def _known(cls, v: dict[str, SearchDim]) -> dict[str, SearchDim]:
        bad = sorted(set(v) - _TUNABLE)
        if bad:
            raise ValueError(f"cannot tune {bad}; tunable: {sorted(_TUNABLE)}")
        return v


class SparkModelSpec(_Model):
    """A Spark ML gradient-boosted trees challenger trained on the same split."""

    max_iter: int = Field(30, ge=1, le=1000, description="Boosting iterations.")
    max_depth: int = Field(5, ge=1, le=20, description="Tree depth.")
    step_size: float = Field(0.1, gt=0, le=1, description="Learning rate.")
    max_bins: int = Field(64, ge=2, le=10_000, description="Bins for continuous features.")


class EvaluationSpec(_Model):
    """Test-split evaluation."""

    slices: list[str] = Field(
        default_factory=list, description="Columns whose values get their own metrics."
    )
    max_slice_values: int = Field(20, ge=1, le=1000, description="Largest slices reported.")


class GateSpec(_Model):
    """When a new version becomes the alias's holder."""

    metric: str | None = Field(
        None, description="Metric compared (default: rmse / roc_auc / accuracy by task)."
    )
    min_improvement: float = Field(
        0.0, ge=0, description="Relative margin over the current champion (0.01 = 1% better)."
    )
    require_quality_passed: bool = Field(
        True, description="The training data's quality stage must have passed."
    )
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$", description="Alias.")


class MLSpec(_Model):
    """Train, evaluate and register a model on the pipeline's curated table."""

    model_name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Name.")
    task: Literal["regression", "binary", "multiclass"] = Field(..., description="The task.")
    label: str = Field(..., pattern=_IDENT, description="Label column.")
    features: FeaturesSpec = Field(..., description="Model inputs.")
    input_table: str | None = Field(
        None,
        description="Table to train on when training runs as its own job "
        "(default: the pipeline's curated output).",
    )
    split: SplitSpec = Field(default_factory=SplitSpec, description="Train/validation/test.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Keras MLP.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Ray Train.")
    tuning: TuningSpec | None = Field(None, description="Ray Tune sweep (default: none).")
    spark_model: SparkModelSpec | None = Field(
        None, description="Also train a Spark ML GBT challenger (default: none)."
    )
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Evaluation.")
    registry: str = Field("registry", description="Registry URI (directory or pyarrow.fs URI).")
    gate: GateSpec = Field(default_factory=GateSpec, description="Promotion gate.")

    @model_validator(mode="after")
    def _checks(self) -> MLSpec:
        if self.label in self.features.columns():
            raise ValueError(f"label {self.label!r} is also listed as a feature")
        names = METRICS[self.task]
        if self.gate.metric is not None and self.gate.metric not in names:
            raise ValueError(
                f"gate.metric {self.gate.metric!r} is not a {self.task} metric; "
                f"expected one of {sorted(names)}"
            )
        return self

    def gate_metric(self) -> str:
        default = {"regression": "rmse", "binary": "roc_auc", "multiclass": "accuracy"}
        return self.gate.metric or default[self.task]

    def higher_is_better(self, metric: str | None = None) -> bool:
        return METRICS[self.task][metric or self.gate_metric()]
