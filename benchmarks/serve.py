#!/usr/bin/env python3
"""Serving benchmark: Rayline's endpoint vs the same Keras model behind a plain FastAPI app.

One invocation builds one model (an MLP over 10 numeric features, Rayline's preprocessor and
model builder, registered in a scratch registry), then load-tests on 127.0.0.1, one system at a
time, each server in its own process:

  rayline        ``rayline.serve`` on a private local Ray, as ``serve_configs/flights.yaml`` runs
                 it (mode fused) with the fast-path environment of ``rayline.serve.env``
                 (HAProxy in front of the ingress replicas' own HTTP servers): row checks
                 against the signature, ``@serve.batch``, JSON answers naming the version.
  tf-function    FastAPI + uvicorn calling a compiled ``tf.function`` of the model per request
                 (features standardized by hand with NumPy): what a competent engineer writes.
  keras-predict  the same app calling ``model.predict`` per request (the design Rayline
                 replaces).

At each concurrency (default 1, 16, 64) closed-loop clients on keep-alive connections send
one-row requests for ``--duration`` seconds after a warm-up; the table gives requests/s, p50,
p99 and errors. The clients (``--client``, a comma list; each system is measured with each):
``aiohttp`` coroutines in this process (the default), and ``wrk`` (C, one thread, one body;
needs ``wrk`` on PATH, e.g. ``apt-get install wrk``), which leaves the servers more of the
cores they share with it: the aiohttp client uses about 40% of a core at 4,000 requests/s. The
model's in-process forward throughput (tf.function at batch 1 and 64) is measured first as the
ceiling.

Usage:
    python benchmarks/serve.py                               # all systems, c = 1, 16, 64, 10 s
    python benchmarks/serve.py --systems rayline,tf-function --duration 5
    python benchmarks/serve.py --systems rayline --rayline-mode split --rayline-proxy serve
    python benchmarks/serve.py --systems rayline,tf-function --rayline-replicas 2 \\
        --client aiohttp,wrk                                 # both load generators

Results go to ``benchmarks/out/serve/results.json``; server logs to ``benchmarks/out/serve/``.
The load generator shares the machine's cores with the servers (as a co-located client
would): on a 2-core machine the figures are for comparison between rows, not capacity planning.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fastapi import Request  # at module level: FastAPI resolves the handler's annotations here

ROOT = Path(__file__).resolve().parents[1]
FEATURES = [f"x{i}" for i in range(10)]
SYSTEMS = ["rayline", "tf-function", "keras-predict"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the model ---------------------------------------------------------------------------------


def build_model(out: Path) -> Path:
    """Train the benchmark MLP (2 epochs) and register it as bench@champion; returns the
    registry directory."""
    import numpy as np
    import pandas as pd

    from rayline.ml.features import Preprocessor
    from rayline.ml.keras_model import build_model as build
    from rayline.ml.keras_model import compile_model, use_tf_keras
    from rayline.ml.registry import ModelRegistry
    from rayline.ml.train import _save

    rng = np.random.default_rng(0)
    n = 20_000
    df = pd.DataFrame({c: rng.normal(i, 1 + i / 10, n) for i, c in enumerate(FEATURES)})
    df["y"] = sum((i % 3 - 1) * df[c] for i, c in enumerate(FEATURES)) + rng.normal(0, 0.1, n)
    numeric = {
        c: {
            "mean": float(df[c].mean()),
            "std": float(df[c].std(ddof=0)),
            "min": float(df[c].min()),
            "max": float(df[c].max()),
            "nulls": 0,
        }
        for c in FEATURES
    }
    pre = Preprocessor(
        task="regression",
        label="y",
        numeric=numeric,
        categorical={},
        buckets={},
        label_stats={"mean": float(df["y"].mean()), "std": float(df["y"].std(ddof=0))},
        train_rows=n,
    )
    keras = use_tf_keras(1)
    keras.utils.set_random_seed(0)
    params = {"hidden_units": [64, 64], "activation": "relu", "dropout": 0.0}
    model = build(pre, params)
    compile_model(model, "regression", 0.005)
    hist = model.fit(pre.transform(df), pre.labels(df), epochs=2, batch_size=256, verbose=0)
    history = [{"loss": float(v), "epoch": i + 1} for i, v in enumerate(hist.history["loss"])]
    art = out / "model"
    if art.exists():
        shutil.rmtree(art)
    art.mkdir(parents=True)
    _save(model, pre, history, 1, params, art)
    registry = out / "registry"
    if registry.exists():
        shutil.rmtree(registry)
    reg = ModelRegistry(registry)
    meta = {"framework": "keras", "signature": pre.signature(), "metrics": history[-1]}
    mv = reg.register("bench", art, meta)
    reg.set_alias("bench", "champion", mv.version)
    return registry


def forward_throughput(model_dir: Path, seconds: float = 3.0) -> dict[str, float]:
    """Rows/s of the model's compiled function in-process, at batch 1 and 64."""
    import numpy as np

    from rayline.ml.keras_model import MODEL_FILE, use_tf_keras

    keras = use_tf_keras(1)
    import tensorflow as tf

    model = keras.models.load_model(str(model_dir / MODEL_FILE), compile=False)
    fn = tf.function(lambda x: model(x, training=False))
    out = {}
    for batch in (1, 64):
        x = {"dense": np.random.default_rng(0).normal(size=(batch, 10)).astype(np.float32)}
        for _ in range(20):
            fn(x).numpy()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn(x).numpy()
            n += 1
        out[f"batch{batch}_rows_per_s"] = n * batch / (time.perf_counter() - t0)
        out[f"batch{batch}_call_ms"] = 1000 * (time.perf_counter() - t0) / n
    return out


# -- the servers (each runs in its own process: `serve.py --serve SYSTEM ...`) ---------------


def serve_rayline(
    registry: Path,
    port: int,
    mode: str,
    max_batch: int,
    proxy: str,
    replicas: int,
    gc_threshold: str = "",
) -> None:
    from rayline.serve.env import throughput_env

    env: dict[str, str] = {}
    if proxy == "haproxy":  # before Ray starts: its processes read these at start-up
        env = throughput_env()
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"  # a quick shutdown
        for key, value in env.items():
            os.environ.setdefault(key, value)
    import ray
    from ray import serve

    from rayline.serve.app import build_app
    from rayline.serve.config import ServeArgs

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    args = ServeArgs.model_validate(
        {
            "registry": str(registry),
            "models": [{"name": "bench"}],
            "batching": {"max_batch_size": max_batch, "batch_wait_timeout_s": 0.0},
            "poll_interval_s": 5,
            "mode": mode,
        }
        # "" keeps ServeArgs' default, "python" Python's own thresholds
        | ({} if not gc_threshold else {"gc_threshold": _gc_threshold(gc_threshold)})
    )
    quiet = {"logging_config": {"enable_access_log": False, "log_level": "WARNING"}}
    scaled = quiet | {"num_replicas": replicas}
    if mode == "fused":
        app = build_app(args, ingress_options=scaled)
    else:
        app = build_app(args, model_options=scaled, ingress_options=quiet)
    serve.run(app, name="bench", route_prefix="/")
    print("READY", flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin
    finally:
        serve.shutdown()
        ray.shutdown()
        if env:
            shutil.rmtree(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"], ignore_errors=True)


def _gc_threshold(text: str) -> list[int] | None:
    return None if text == "python" else [int(x) for x in text.split(",")]


def serve_plain(model_dir: Path, port: int, call: str) -> None:
    import numpy as np
    import uvicorn
    from fastapi import FastAPI

    from rayline.ml.features import Preprocessor
    from rayline.ml.keras_model import MODEL_FILE, use_tf_keras

    keras = use_tf_keras(1)
    import tensorflow as tf

    pre = Preprocessor.load(model_dir)
    model = keras.models.load_model(str(model_dir / MODEL_FILE), compile=False)
    fn = tf.function(lambda x: model(x, training=False))
    means = np.array([pre.numeric[c]["mean"] for c in FEATURES], dtype=np.float32)
    stds = np.array([pre.numeric[c]["std"] or 1.0 for c in FEATURES], dtype=np.float32)
    y_mean, y_std = pre.label_stats["mean"], pre.label_stats["std"]
    app = FastAPI()

    @app.post("/v1/models/bench/predict")
    async def predict(request: Request) -> dict[str, Any]:
        row = await request.json()
        x = (np.array([[row[c] for c in FEATURES]], dtype=np.float32) - means) / stds
        if call == "tf-function":
            y = fn({"dense": x}).numpy()
        else:
            y = model.predict({"dense": x}, verbose=0)
        return {"prediction": float(y[0, 0]) * y_std + y_mean}

    fn({"dense": np.zeros((1, 10), np.float32)})
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        server.should_exit = True
        await task

    asyncio.run(main())


# -- the load ------------------------------------------------------------------------------------


async def _load(url: str, concurrency: int, duration: float, warmup: float) -> dict[str, Any]:
    import aiohttp

    rows = _bodies()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + duration
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:

        async def worker(w: int) -> None:
            k = w
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    async with s.post(url, data=rows[k % len(rows)], headers=headers) as r:
                        await r.read()
                        status = r.status
                except (TimeoutError, aiohttp.ClientError) as e:
                    status = type(e).__name__  # type: ignore[assignment]
                t1 = time.perf_counter()
                if t0 >= t_measure:
                    if status == 200:
                        latencies.append(t1 - t0)
                    else:
                        errors[str(status)] = errors.get(str(status), 0) + 1
                k += concurrency

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    latencies.sort()

    def pct(p: float) -> float:
        return (
            1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))]
            if latencies
            else float("nan")
        )

    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "rps": len(latencies) / duration,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_ms": 1000 * statistics.fmean(latencies) if latencies else float("nan"),
        "errors": errors,
    }


# wrk's script: one body (the aiohttp client's first), the summary as one JSON line. A static
# body, because with a Lua ``request()`` per request (to rotate bodies) about 1% of the plain
# uvicorn app's answers took 100-200 ms longer (p99 124 ms against 33 ms with the same body).
_WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = %s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %%d, "duration_us": %%d, "non2xx": %%d, "connect": %%d, '
    .. '"read": %%d, "write": %%d, "timeout": %%d, "p50_us": %%d, "p99_us": %%d, '
    .. '"mean_us": %%f}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def _load_wrk(
    url: str, concurrency: int, duration: float, warmup: float, out: Path
) -> dict[str, Any]:
    """One level with wrk (C, one thread, keep-alive): a client that costs the servers far less
    CPU than aiohttp does. The warm-up is a run of its own, not measured."""
    wrk = shutil.which("wrk") or "wrk"
    script = out / "wrk_post.lua"
    script.write_text(_WRK_LUA % json.dumps(_bodies()[0].decode()))

    def run(seconds: float) -> dict[str, Any]:
        argv = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency"]
        argv += ["--timeout", "60s", "-s", str(script), url]
        res = subprocess.run(argv, capture_output=True, text=True, check=False)
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if res.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed (rc {res.returncode}): {res.stderr or res.stdout}")
        return dict(json.loads(line[len("RESULT ") :]))

    if warmup > 0:
        run(warmup)
    r = run(duration)
    errors = {k: r[k] for k in ("non2xx", "connect", "read", "write", "timeout") if r[k]}
    ok = r["requests"] - r["non2xx"]
    return {
        "concurrency": concurrency,
        "requests": ok,
        "rps": ok / (r["duration_us"] / 1e6),
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "mean_ms": r["mean_us"] / 1000,
        "errors": errors,
    }


def _bodies() -> list[bytes]:
    return [
        json.dumps({c: float(i + (k % 7) / 7) for i, c in enumerate(FEATURES)}).encode()
        for k in range(64)
    ]


def start_server(argv: list[str], log: Path, timeout: float = 240) -> subprocess.Popen:
    out = log.open("w")
    proc = subprocess.Popen(
        [sys.executable, __file__, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=out,
        text=True,
        start_new_session=True,
        env=dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "token")),
    )
    t0 = time.time()
    assert proc.stdout is not None
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if line.strip() == "READY":
            return proc
        if not line and proc.poll() is not None:
            raise RuntimeError(f"server {argv[1]} exited ({proc.returncode}); see {log}")
    stop_server(proc)
    raise RuntimeError(f"server {argv[1]} not ready in {timeout}s; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma list of " + ", ".join(SYSTEMS)
    )
    p.add_argument("--concurrency", default="1,16,64", help="comma list (default: 1,16,64)")
    p.add_argument(
        "--duration", type=float, default=10.0, help="measured seconds per level (<= 120)"
    )
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per level")
    p.add_argument("--max-batch", type=int, default=64, help="Rayline's max_batch_size")
    p.add_argument(
        "--rayline-mode",
        default="fused",
        choices=["fused", "split"],
        help="Rayline's mode: models in the ingress replicas (fused) or apart (split)",
    )
    p.add_argument(
        "--rayline-proxy",
        default="haproxy",
        choices=["haproxy", "serve"],
        help="HAProxy to the ingress replicas' own ports (rayline.serve.env, the default) or "
        "Serve's default proxy actor",
    )
    p.add_argument(
        "--rayline-replicas",
        type=int,
        default=1,
        help="replicas of the deployment that scores (default 1, as the plain app's one process)",
    )
    p.add_argument(
        "--rayline-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of Rayline's Ray instance (e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=0)",
    )
    p.add_argument(
        "--rayline-gc-threshold",
        default="",
        metavar="G0,G1,G2|python",
        help="Rayline's gc_threshold (default: ServeArgs' default; python: Python's 700,10,10)",
    )
    p.add_argument(
        "--client",
        default="aiohttp",
        help="load generator(s), comma list: aiohttp (closed-loop clients in this process, the "
        "default) and/or wrk (C, one thread, needs wrk on PATH: it takes far less of the cores "
        "the servers share). Each system is measured with each client in turn",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "serve"))
    p.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run one server
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.serve:
        if args.serve == "rayline":
            for kv in args.rayline_env:
                key, _, value = kv.partition("=")
                os.environ[key] = value
            serve_rayline(
                out / "registry",
                args.port,
                args.rayline_mode,
                args.max_batch,
                args.rayline_proxy,
                args.rayline_replicas,
                args.rayline_gc_threshold,
            )
        else:
            serve_plain(out / "model", args.port, args.serve)
        return 0

    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        p.error(f"unknown system(s): {', '.join(unknown)}")
    clients = [c for c in args.client.split(",") if c]
    if not clients or set(clients) - {"aiohttp", "wrk"}:
        p.error(f"--client: a comma list of aiohttp, wrk (got {args.client!r})")
    if "wrk" in clients and shutil.which("wrk") is None:
        p.error("--client wrk needs wrk on PATH (Debian/Ubuntu: apt-get install wrk)")
    levels = [int(c) for c in args.concurrency.split(",")]
    duration = min(args.duration, 120.0)
    out.mkdir(parents=True, exist_ok=True)
    print(f"building the model in {out} ...", flush=True)
    build_model(out)
    ceiling = forward_throughput(out / "model")
    print(
        "model forward (tf.function, in-process): batch 1 {:,.0f} rows/s ({:.2f} ms/call), "
        "batch 64 {:,.0f} rows/s ({:.2f} ms/call)".format(
            ceiling["batch1_rows_per_s"],
            ceiling["batch1_call_ms"],
            ceiling["batch64_rows_per_s"],
            ceiling["batch64_call_ms"],
        ),
        flush=True,
    )
    results: dict[str, Any] = {"forward": ceiling, "clients": clients, "systems": {}}
    for system in systems:
        port = free_port()
        argv_s = ["--serve", system, "--port", str(port), "--out", str(out)]
        argv_s += ["--max-batch", str(args.max_batch), "--rayline-mode", args.rayline_mode]
        argv_s += ["--rayline-proxy", args.rayline_proxy]
        argv_s += ["--rayline-replicas", str(args.rayline_replicas)]
        argv_s += ["--rayline-gc-threshold", args.rayline_gc_threshold]
        for kv in args.rayline_env:
            argv_s += ["--rayline-env", kv]
        t0 = time.time()
        proc = start_server(argv_s, out / f"{system}.log")
        print(f"{system}: ready in {time.time() - t0:.1f}s", flush=True)
        url = f"http://127.0.0.1:{port}/v1/models/bench/predict"
        rows = []
        try:
            for client in clients:
                for c in levels:
                    if client == "wrk":
                        r = _load_wrk(url, c, duration, args.warmup, out)
                    else:
                        r = asyncio.run(_load(url, c, duration, args.warmup))
                    r["client"] = client
                    rows.append(r)
                    print(
                        f"  {client:<8} c={c:<3} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.2f} ms  "
                        f"p99 {r['p99_ms']:8.2f} ms  errors {r['errors'] or 0}",
                        flush=True,
                    )
        finally:
            stop_server(proc)
        results["systems"][system] = rows
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print(f"{'system':<15}{'client':<9}{'c':>4}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}  errors")
    for system, rows in results["systems"].items():
        for r in rows:
            print(
                f"{system:<15}{r['client']:<9}{r['concurrency']:>4}{r['rps']:>10.1f}"
                f"{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}  "
                f"{sum(r['errors'].values()) if r['errors'] else 0}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
