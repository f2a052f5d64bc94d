"""The ML stage: split, fit the preprocessor, train (or tune), train the Spark challenger,
evaluate, register and gate. Used by ``rayline run --train`` (after the batch pipeline, with the
in-memory handoff) and by ``workloads/train.py`` (from the warehouse table).

Nothing is registered until every candidate is trained and evaluated, so a failed training run
leaves no half-registered model; registration itself is atomic (see the registry).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import metrics as rl_metrics
from ..storage import Loc, write_figure
from .evaluate import evaluate
from .features import Preprocessor, check_columns, fit_preprocessor
from .gate import decide
from .handoff import split_dataset
from .registry import ModelRegistry, RegistryError
from .spec import MLSpec
from .train import TrainOutcome, fit_keras

__all__ = ["MLRunInfo", "run_ml", "table_fingerprint", "framework_versions"]

log = logging.getLogger("rayline")


@dataclass
class MLRunInfo:
    """Where the training data came from and where to write."""

    run_id: str
    run_dir: Loc
    pipeline: str
    code_version: str
    table: str | None = None
    table_path: str | None = None
    table_version: int | None = None  # the Delta version of the table that was read
    data_fingerprint: str | None = None
    quality: dict[str, Any] | None = None  # {"verdict", "run_id", "failed_rules", ...}
    extra: dict[str, Any] = field(default_factory=dict)


def table_fingerprint(path: str | Path) -> str:
    """A fingerprint of a table directory's data files (names and sizes)."""
    p = Path(path)
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        if f.is_file() and not f.name.startswith((".", "_")):
            h.update(f"{f.relative_to(p)}:{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def framework_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("ray", "tensorflow", "tf-keras", "pyspark", "raydp", "rayline"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _charts(
    report: dict[str, Any], history: list[dict[str, float]], task: str, out_dir: Path, prefix: str
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[str] = []
    if history:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ep = [h["epoch"] for h in history]
        ax.plot(ep, [h["loss"] for h in history], marker="o", label="train loss")
        if "val_loss" in history[0]:
            ax.plot(ep, [h["val_loss"] for h in history], marker="o", label="validation loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title("Learning curve")
        ax.legend()
        fig.tight_layout()
        f = out_dir / f"{prefix}learning_curve.png"
        write_figure(fig, f, dpi=90)
        plt.close(fig)
        files.append(f.name)
    if task == "regression" and report.get("sample"):
        pts = report["sample"]
        fig, ax = plt.subplots(figsize=(4.2, 4))
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=4, alpha=0.4)
        lo = min(min(p) for p in pts)
        hi = max(max(p) for p in pts)
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1)
        ax.set_xlabel("actual")
        ax.set_ylabel("predicted")
        ax.set_title(f"Predicted vs actual ({len(pts)} test rows)")
        fig.tight_layout()
        f = out_dir / f"{prefix}predicted_vs_actual.png"
        write_figure(fig, f, dpi=90)
        plt.close(fig)
        files.append(f.name)
    cm = report["metrics"].get("confusion_matrix")
    if cm:
        classes = report["metrics"]["classes"]
        fig, ax = plt.subplots(figsize=(4.2, 3.8))
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=45)
        ax.set_yticks(range(len(classes)), classes)
        for i, row in enumerate(cm):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title("Confusion matrix (test)")
        fig.tight_layout()
        f = out_dir / f"{prefix}confusion_matrix.png"
        write_figure(fig, f, dpi=90)
        plt.close(fig)
        files.append(f.name)
    return files


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def _champion_metrics(
    reg: ModelRegistry, ml: MLSpec, test: Any, pre: Preprocessor
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The alias holder's metrics on *this* test split (its stored ones as a fallback)."""
    try:
        champ = reg.get(ml.model_name, ml.gate.alias)
    except RegistryError:
        return None, {"holder": None}
    info: dict[str, Any] = {"holder": champ.version}
    cols = set(test.schema().names)
    need = set(champ.metadata.get("signature", {}).get("feature_columns", [])) | {ml.label}
    if need <= cols:
        try:
            res = evaluate(reg.local_path(champ), test, [])
            info["measured_on"] = "this test split"
            return _headline(res["metrics"]), info
        except Exception as e:  # noqa: BLE001 - fall back to the stored metrics, say why
            log.warning("could not re-evaluate %s@%s: %s", ml.model_name, champ.version, e)
            info["re_evaluation_error"] = str(e)
    info["measured_on"] = "its own test split (stored metrics)"
    return _headline(champ.metadata.get("metrics", {})), info


def run_ml(
    ds: Any,
    ml: MLSpec,
    info: MLRunInfo,
    spark_df: Any = None,
) -> dict[str, Any]:
    """Train, evaluate, register and gate; returns the stage report (also in the run dir).

    Args:
        ds: The curated data as a Ray Dataset.
        ml: The ``ml`` section.
        info: Run identity, data provenance and the quality verdict.
        spark_df: The curated Spark DataFrame, for the Spark challenger (optional).

    Returns:
        The report: split counts, preprocessing, training history, tuning trials, every
        candidate's evaluation, registered versions and the gate's decision.
    """
    t_start = time.perf_counter()
    check_columns(ds.schema(), ml)
    splits, counts = split_dataset(ds, ml)
    pre = fit_preprocessor(splits["train"], ml)
    log.info(
        "preprocessor fitted on %d train rows (%d model inputs)",
        pre.train_rows,
        pre.dense_width + len(pre.embedded),
    )
    # Ray Train and Tune keep runs and checkpoints here: a directory, or a URI (s3://...) that
    # every node reaches. Files only this process reads (the Spark model's export, charts
    # before upload) go to a local scratch directory when the run directory is remote.
    storage = str(ml.training.storage_path or info.run_dir / "train")
    scratch = (
        Path(info.run_dir)
        if isinstance(info.run_dir, Path)
        else Path(tempfile.mkdtemp(prefix=f"rayline-{info.run_id}-"))
    )
    report: dict[str, Any] = {
        "model_name": ml.model_name,
        "task": ml.task,
        "label": ml.label,
        "split": counts,
        "preprocessor": pre.signature(),
        "candidates": [],
    }

    candidates: list[tuple[str, Path, TrainOutcome | None]] = []
    if ml.tuning is not None:
        from .tune import tune_keras

        tuned = tune_keras(splits, pre, ml, storage, f"{ml.model_name}-{info.run_id}-tune")
        report["tuning"] = {"best_params": tuned.best_params, "trials": tuned.trials}
        candidates.append(("keras", tuned.best.checkpoint_dir, tuned.best))
    else:
        out = fit_keras(splits, pre, ml, storage, f"{ml.model_name}-{info.run_id}")
        candidates.append(("keras", out.checkpoint_dir, out))
    if ml.spark_model is not None:
        if spark_df is None:
            log.warning("ml.spark_model is set but no Spark DataFrame is available; skipped")
        else:
            from .spark_model import train_spark_gbt

            gbt_dir = scratch / "train" / "spark_gbt"
            if gbt_dir.exists():
                shutil.rmtree(gbt_dir)
            candidates.append(("spark_gbt", train_spark_gbt(spark_df, pre, ml, gbt_dir), None))

    metric = ml.gate_metric()
    hib = ml.higher_is_better()
    charts_dir = info.run_dir / "charts"
    charts_dir.mkdir(parents=True, exist_ok=True)  # nothing to make on an object store
    evaluated = []
    for framework, model_dir, outcome in candidates:
        t0 = time.perf_counter()
        res = evaluate(
            model_dir, splits["test"], ml.evaluation.slices, ml.evaluation.max_slice_values
        )
        history = outcome.history if outcome else []
        charts = _charts(res, history, ml.task, Path(model_dir), f"ml_{framework}_")
        for c in charts:  # into the model's files, and the run's charts
            (charts_dir / c).write_bytes((Path(model_dir) / c).read_bytes())
        (Path(model_dir) / "evaluation.json").write_text(json.dumps(res, default=str))
        log.info(
            "evaluated %s: %s = %.4f (baseline %.4f) in %.1fs",
            framework,
            metric,
            res["metrics"][metric],
            res["baseline"].get(metric, float("nan")),
            time.perf_counter() - t0,
        )
        evaluated.append((framework, model_dir, outcome, res, charts))

    reg = ModelRegistry(ml.registry)
    champion, champ_info = _champion_metrics(reg, ml, splits["test"], pre)
    quality_verdict = (info.quality or {}).get("verdict")
    quality_passed = None if quality_verdict is None else quality_verdict == "passed"
    best_i = max(
        range(len(evaluated)),
        key=lambda i: evaluated[i][3]["metrics"][metric] * (1 if hib else -1),
    )
    fw_versions = framework_versions()
    registered = []
    for i, (framework, model_dir, outcome, res, charts) in enumerate(evaluated):
        params = (
            outcome.params if outcome else (ml.spark_model.model_dump() if ml.spark_model else {})
        )
        meta = {
            "framework": framework,
            "framework_versions": fw_versions,
            "task": ml.task,
            "signature": pre.signature() | {"feature_columns": pre.feature_columns},
            "metrics": _headline(res["metrics"]),
            "headline_metric": metric,
            "baseline": res["baseline"],
            "slices": res["slices"],
            "params": params,
            "training": {
                "history": outcome.history if outcome else [],
                "seconds": outcome.seconds if outcome else None,
                "num_workers": ml.training.num_workers,
                "tuning": report.get("tuning") if framework == "keras" else None,
            },
            "data": {
                "table": info.table,
                "path": info.table_path,
                "version": info.table_version,
                "fingerprint": info.data_fingerprint,
                "rows": counts,
            },
            "quality": info.quality,
            "pipeline": info.pipeline,
            "run_id": info.run_id,
            "code_version": info.code_version,
        }
        mv = reg.register(ml.model_name, model_dir, meta)
        rl_metrics.model_metric(ml.model_name, mv.version, _headline(res["metrics"]))
        entry: dict[str, Any] = {
            "framework": framework,
            "version": mv.version,
            "metrics": _headline(res["metrics"]),
            "baseline": res["baseline"],
            "slices": res["slices"],
            "charts": [str(charts_dir / c) for c in charts],
            "history": outcome.history if outcome else [],
        }
        if i == best_i:
            ok, reasons = decide(
                res["metrics"],
                res["baseline"],
                champion,
                metric,
                hib,
                ml.gate.min_improvement,
                quality_passed,
                ml.gate.require_quality_passed,
            )
            if ok:
                prev = reg.set_alias(
                    ml.model_name, ml.gate.alias, mv.version, reason="; ".join(reasons)
                )
                log.info(
                    "promoted %s@%d to %r (was %s): %s",
                    ml.model_name,
                    mv.version,
                    ml.gate.alias,
                    prev,
                    "; ".join(reasons),
                )
            else:
                log.warning(
                    "%s@%d registered without %r: %s",
                    ml.model_name,
                    mv.version,
                    ml.gate.alias,
                    "; ".join(reasons),
                )
            entry["gate"] = {
                "promoted": ok,
                "alias": ml.gate.alias,
                "reasons": reasons,
                "champion": champ_info,
                "champion_metrics": champion,
            }
        else:
            entry["gate"] = {
                "promoted": False,
                "alias": ml.gate.alias,
                "reasons": [f"not the best candidate of this run on {metric}"],
            }
            log.info(
                "%s@%d (%s) registered; not the best candidate of this run",
                ml.model_name,
                mv.version,
                framework,
            )
        registered.append(entry)
    report["candidates"] = registered
    report["gate_metric"] = metric
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    return report
