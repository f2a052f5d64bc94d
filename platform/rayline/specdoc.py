"""The spec reference (docs/spec-reference.md), generated from the pydantic models so that it
cannot drift from what the loader accepts. ``python -m rayline.specdoc > docs/spec-reference.md``."""

from __future__ import annotations

import types
import typing
from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from . import config as c
from .ml import spec as ml_spec
from .streaming import spec as stream_spec

__all__ = ["render"]

SECTIONS: list[tuple[str, list[type[BaseModel]]]] = [
    ("Pipeline", [c.PipelineSpec, c.OutputsSpec, c.OutputSpec]),
    (
        "Session (`session:`; each field but spark_conf also as `RAYLINE_<FIELD>` in the environment)",
        [c.SessionConfig],
    ),
    ("Sources (`sources: {name: ...}`)", [c.SourceSpec, c.ColumnSpec]),
    (
        "Stages (`stages: [...]`, by `type`)",
        [c.SchemaStage, c.TransformStage, c.QualityStage, c.AnalyticsStage],
    ),
    (
        "Transform steps (`steps: [...]`, by `op`)",
        [
            c.SelectStep,
            c.DropStep,
            c.RenameStep,
            c.CastStep,
            c.DeriveStep,
            c.FilterStep,
            c.FillNullStep,
            c.DedupeStep,
            c.JoinStep,
            c.TimestampStep,
        ],
    ),
    (
        "Quality rules (`rules: [...]`, by `type`)",
        [
            c.NotNullRule,
            c.UniqueRule,
            c.RangeRule,
            c.RegexRule,
            c.InSetRule,
            c.ReferentialRule,
            c.RowCountRule,
            c.FreshnessRule,
            c.ExpressionRule,
        ],
    ),
    (
        "Machine learning (`ml:`)",
        [
            ml_spec.MLSpec,
            ml_spec.FeaturesSpec,
            ml_spec.CategoricalFeature,
            ml_spec.BucketFeature,
            ml_spec.SplitSpec,
            ml_spec.ModelSpec,
            ml_spec.TrainingSpec,
            ml_spec.TuningSpec,
            ml_spec.SearchDim,
            ml_spec.SparkModelSpec,
            ml_spec.EvaluationSpec,
            ml_spec.GateSpec,
        ],
    ),
    ("Streaming (`streaming:`)", [stream_spec.StreamingSpec, stream_spec.WindowSpec]),
]


def _type(t: Any) -> str:
    origin = get_origin(t)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(t))
    if origin is typing.Annotated:
        return _type(get_args(t)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(t) if a is not type(None)]
        inner = " or ".join(_type(a) for a in args)
        return inner + (" (optional)" if len(args) < len(get_args(t)) else "")
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type(a) for a in get_args(t))}]"
    if isinstance(t, type) and issubclass(t, BaseModel):
        return t.__name__
    return getattr(t, "__name__", str(t))


def _default(f: Any) -> str:
    if f.is_required():
        return "**required**"
    if f.default_factory is not None:
        value = f.default_factory()
        return "see below" if isinstance(value, BaseModel) else f"`{value!r}`"
    if f.default is PydanticUndefined:
        return ""
    return f"`{f.default!r}`"


def _bounds(f: Any) -> str:
    out = []
    for m in f.metadata:
        for attr, sym in (
            ("ge", ">="),
            ("gt", ">"),
            ("le", "<="),
            ("lt", "<"),
            ("min_length", "min length"),
            ("pattern", "pattern"),
        ):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} `{v}`")
    return "; ".join(out)


def _model(m: type[BaseModel]) -> str:
    doc = (m.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    lines = [
        f"### {m.__name__}",
        "",
        doc,
        "",
        "| key | type | default | constraints | description |",
        "|---|---|---|---|---|",
    ]
    for name, f in m.model_fields.items():
        desc = (f.description or "").replace("|", "\\|")
        lines.append(
            f"| `{name}` | {_type(f.annotation)} | {_default(f)} | {_bounds(f)} | {desc} |"
        )
    return "\n".join(lines) + "\n"


def render() -> str:
    parts = [
        "# Pipeline spec reference",
        "",
        "Generated from the pydantic models in `platform/rayline/config.py` and "
        "`platform/rayline/ml/spec.py` and `platform/rayline/streaming/spec.py` by "
        "`python -m rayline.specdoc`; a test fails when this file is out of date. "
        "`${VAR}` and `${VAR:-default}` in values are expanded from the environment. "
        "Unknown keys are errors.",
        "",
    ]
    for title, models in SECTIONS:
        parts.append(f"## {title}\n")
        parts.extend(_model(m) for m in models)
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
