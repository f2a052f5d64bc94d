"""The ``rayline`` command.

rayline validate SPEC            check a spec without starting Spark
rayline run SPEC [--resume RUN] [--train]   run (or resume) a pipeline on Spark-on-Ray
rayline train SPEC [--resume RUN]  train/evaluate/register from the curated table
rayline runs list                recent runs
rayline runs show RUN            one run: stages, timings, rows, outputs, error, report
rayline lineage RUN              the lineage graph of a run
rayline models list|show|promote|alias|delete   the model registry
rayline stream run SPEC | replay SOURCE --topic T --rate N | tail TOPIC   Kafka streaming
rayline predict NAME [ROWS]      predictions from a serving endpoint (rayline.serve)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("py4j", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _store(args: argparse.Namespace) -> Any:
    from .runstore import RunStore

    return RunStore(args.run_store or os.environ.get("RAYLINE_RUN_STORE", "runs"))


def _cmd_validate(args: argparse.Namespace) -> int:
    from .config import load_spec

    spec = load_spec(args.spec)
    print(
        f"{args.spec}: valid pipeline {spec.name!r}: {len(spec.sources)} source(s), "
        f"{len(spec.stages)} stage(s): " + ", ".join(f"{s.name} ({s.type})" for s in spec.stages)
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_spec
    from .runner import run_pipeline

    spec = load_spec(args.spec)
    result = run_pipeline(spec, spec_path=args.spec, resume=args.resume, train=args.train)
    out = result.record["outputs"]
    print(f"run {result.run_id} succeeded")
    print(
        f"  curated:    {out['curated']['table']} ({out['curated']['rows']:,} rows) at {out['curated']['path']}"
    )
    print(
        f"  quarantine: {out['quarantine']['table']} ({out['quarantine']['rows']:,} rows) at {out['quarantine']['path']}"
    )
    _print_models(result.record)
    print(f"  report:     {result.run_dir / 'report.html'}")
    return 0


def _print_models(record: dict[str, Any]) -> None:
    for m in record.get("models", []):
        metric = next(
            (k for k in m if k not in {"name", "version", "framework", "promoted", "alias"}), None
        )
        value = f", {metric} {m[metric]:.4g}" if metric and m[metric] is not None else ""
        alias = f" -> {m['alias']}" if m["promoted"] else " (not promoted)"
        print(f"  model:      {m['name']}@{m['version']} [{m['framework']}{value}]{alias}")


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_spec
    from .ml.stage import train_from_table

    spec = load_spec(args.spec)
    result = train_from_table(spec, spec_path=args.spec, resume=args.resume)
    print(f"run {result.run_id} succeeded")
    _print_models(result.record)
    print(f"  report:     {result.run_dir / 'report.html'}")
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.action == "list":
        runs = store.list_runs()
        if not runs:
            print(f"no runs in {store.root}")
            return 0
        print(f"{'RUN':<44} {'STATUS':<12} {'STARTED':<30} PIPELINE")
        for r in runs[: args.limit]:
            print(f"{r['run_id']:<44} {r['status']:<12} {r['started_at']:<30} {r['pipeline']}")
        return 0
    if not args.run:
        print("rayline runs show: name a run (see 'rayline runs list')", file=sys.stderr)
        return 2
    rec = store.read_record(args.run)
    if args.json:
        print(json.dumps(rec, indent=2))
        return 0
    print(f"run {rec['run_id']}  pipeline {rec['pipeline']}  status {rec['status']}")
    print(
        f"started {rec['started_at']}  ended {rec.get('ended_at')}  attempts {len(rec.get('attempts', []))}"
    )
    print(
        f"\n{'#':<3}{'STAGE':<20}{'TYPE':<11}{'STATUS':<11}{'SECONDS':>9}{'ROWS IN':>14}{'ROWS OUT':>14}"
    )
    for i, s in enumerate(rec["stages"], 1):

        def n(x: Any) -> str:
            return f"{x:,}" if isinstance(x, int) else "-"

        secs = f"{s['duration_s']:.1f}" if isinstance(s.get("duration_s"), (int, float)) else "-"
        print(
            f"{i:<3}{s['name']:<20}{s['type']:<11}{s['status']:<11}{secs:>9}{n(s.get('rows_in')):>14}{n(s.get('rows_out')):>14}"
        )
    for k, o in (rec.get("outputs") or {}).items():
        version = f" version {o['version']}" if o.get("version") is not None else ""
        print(f"\n{k}: {o['table']}{version} ({o['rows']:,} rows) {o['path']}")
        for reason, cnt in sorted((o.get("reasons") or {}).items()):
            print(f"    {reason}: {cnt:,}")
    if rec.get("models"):
        print()
        _print_models(rec)
    st = rec.get("stream")
    if st:
        print(
            f"\nstream: {st.get('batches', 0)} micro-batch(es), {st.get('events', 0):,} event(s), "
            f"{st.get('predictions', 0):,} prediction(s), {st.get('dead_letters', 0):,} dead "
            f"letter(s), {st.get('late_events', 0):,} late; by model: {st.get('models', {})}"
        )
    if rec.get("error"):
        e = rec["error"]
        print(f"\nerror in stage {e.get('stage')}: {e.get('type')}: {e.get('message')}")
        print(f"resume with: rayline run {rec.get('spec_path') or 'SPEC'} --resume {rec['run_id']}")
    html = store.run_dir(rec["run_id"]) / "report.html"
    if html.exists():
        print(f"\nreport: {html.as_uri() if isinstance(html, Path) else html}")
    return 0


def _cmd_lineage(args: argparse.Namespace) -> int:
    from .lineage import format_graph, read_events

    store = _store(args)
    store.read_record(args.run)  # a clear error for an unknown run
    events = read_events(store.run_dir(args.run))
    if args.json:
        for e in events:
            print(json.dumps(e))
    else:
        print(format_graph(events))
    return 0


def _registry(args: argparse.Namespace) -> Any:
    from .ml.registry import ModelRegistry

    return ModelRegistry(args.registry or os.environ.get("RAYLINE_REGISTRY", "registry"))


def _headline_metric(meta: dict[str, Any]) -> str:
    """``key=value`` of metadata["headline_metric"], else of the first metric; "-" if none."""
    metrics = meta.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        return "-"
    key = meta.get("headline_metric")
    if key not in metrics:
        key = next(iter(metrics))
    value = metrics[key]
    return f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"


def _models_list(reg: Any, args: argparse.Namespace) -> int:
    names = reg.list_models()
    if args.json:
        doc = []
        for name in names:
            versions = reg.versions(name)
            doc.append(
                {
                    "name": name,
                    "aliases": reg.aliases(name),
                    "versions": [
                        {
                            "version": mv.version,
                            "created_at": mv.metadata.get("created_at"),
                            "aliases": mv.aliases,
                            "metrics": mv.metadata.get("metrics"),
                            "uri": mv.uri,
                        }
                        for mv in versions
                    ],
                    "problems": reg.problems(name),
                }
            )
        print(json.dumps(doc, indent=2))
        return 0
    if not names:
        print(f"no models in {reg.uri}")
        return 0
    print(f"{'MODEL':<28} {'VER':>4}  {'CREATED':<20} {'ALIASES':<20} METRIC")
    for name in names:
        versions = reg.versions(name)
        if not versions:
            print(f"{name:<28} {'-':>4}  (no valid versions)")
        for i, mv in enumerate(versions):
            created = str(mv.metadata.get("created_at", "-"))[:19].replace("T", " ")
            aliases = ",".join(mv.aliases) or "-"
            shown = name if i == 0 else ""
            print(
                f"{shown:<28} {mv.version:>4}  {created:<20} {aliases:<20} {_headline_metric(mv.metadata)}"
            )
    return 0


def _models_show(reg: Any, args: argparse.Namespace) -> int:
    import yaml

    mv = reg.resolve(args.ref)
    if args.json:
        doc = {"name": mv.name, "version": mv.version, "uri": mv.uri, "aliases": mv.aliases}
        print(json.dumps({**doc, "metadata": mv.metadata}, indent=2))
        return 0
    meta = dict(mv.metadata)
    print(f"{mv.name} version {mv.version}  aliases: {', '.join(mv.aliases) or '-'}")
    print(f"uri:           {mv.uri}")
    print(f"created_at:    {meta.pop('created_at', '-')}")
    print(f"registered_by: {meta.pop('registered_by', '-')}")
    for key in ("name", "version"):
        meta.pop(key, None)
    files = meta.pop("files", None)
    first = {k: meta.pop(k) for k in ("metrics", "params", "signature") if k in meta}
    rest = {**first, **meta}
    if rest:
        print(yaml.safe_dump(rest, sort_keys=False, default_flow_style=False).rstrip())
    if files is not None:
        print(
            f"files ({len(files)}): " + ", ".join(files[:10]) + (", ..." if len(files) > 10 else "")
        )
    return 0


def _move_alias(reg: Any, name: str, alias: str, version: int, reason: str | None) -> int:
    previous = reg.set_alias(name, alias, version, reason=reason)
    if previous == version:
        print(f"{name}: {alias} already at version {version}")
    else:
        print(f"{name}: {alias} {previous if previous is not None else '(none)'} -> {version}")
    return 0


def _models_promote(reg: Any, args: argparse.Namespace) -> int:
    return _move_alias(reg, args.name, args.alias, args.version, args.reason)


def _models_alias(reg: Any, args: argparse.Namespace) -> int:
    if args.delete == (args.version is not None):
        print("rayline models alias: give either VERSION or --delete", file=sys.stderr)
        return 2
    if args.version is not None:
        return _move_alias(reg, args.name, args.alias, args.version, args.reason)
    previous = reg.aliases(args.name).get(args.alias)
    reg.delete_alias(args.name, args.alias, reason=args.reason)
    print(f"{args.name}: alias {args.alias} removed (was version {previous})")
    return 0


def _models_delete(reg: Any, args: argparse.Namespace) -> int:
    holders = sorted(a for a, v in reg.aliases(args.name).items() if v == args.version)
    reg.delete_version(args.name, args.version, force=args.force)
    removed = f" (removed aliases: {', '.join(holders)})" if holders and args.force else ""
    print(f"{args.name}: deleted version {args.version}{removed}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .ml.registry import RegistryError

    if not args.verbose:  # the command prints what the registry would log at INFO
        logging.getLogger("rayline.ml.registry").setLevel(logging.WARNING)
    try:
        return int(args.models_fn(_registry(args), args))
    except (RegistryError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _add_models_parser(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--registry",
        metavar="URI",
        help="registry path or URI, e.g. s3://bucket/models (default: $RAYLINE_REGISTRY or "
        "./registry)",
    )
    m = sub.add_parser("models", help="the model registry: list, show, promote, alias, delete")
    m.set_defaults(fn=_cmd_models)
    ms = m.add_subparsers(dest="models_action", required=True)

    ls = ms.add_parser("list", parents=[common], help="models, versions, aliases, metrics")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(models_fn=_models_list)

    sh = ms.add_parser("show", parents=[common], help="the metadata of one version")
    sh.add_argument("ref", metavar="NAME[@VERSION|@ALIAS]")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(models_fn=_models_show)

    pr = ms.add_parser("promote", parents=[common], help="point an alias (champion) at a version")
    pr.add_argument("name")
    pr.add_argument("version", type=int)
    pr.add_argument("--alias", default="champion", help="the alias to move (default: champion)")
    pr.add_argument("--reason", help="why, for the alias history")
    pr.set_defaults(models_fn=_models_promote)

    al = ms.add_parser("alias", parents=[common], help="set or delete an alias")
    al.add_argument("name")
    al.add_argument("alias")
    al.add_argument("version", type=int, nargs="?")
    al.add_argument("--delete", action="store_true", help="remove the alias")
    al.add_argument("--reason", help="why, for the alias history")
    al.set_defaults(models_fn=_models_alias)

    dl = ms.add_parser("delete", parents=[common], help="delete a version")
    dl.add_argument("name")
    dl.add_argument("version", type=int)
    dl.add_argument("--force", action="store_true", help="also remove aliases pointing at it")
    dl.set_defaults(models_fn=_models_delete)


def _cmd_predict(args: argparse.Namespace) -> int:
    from .serve.client import Client, ServeError

    if args.rows is not None and args.file is not None:
        print("rayline predict: give ROWS or --file, not both", file=sys.stderr)
        return 2
    if args.file is not None:
        from pathlib import Path

        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text("utf-8")
    elif args.rows is not None:
        text = args.rows
    else:
        print("rayline predict: give ROWS (JSON) or --file PATH ('-': stdin)", file=sys.stderr)
        return 2
    try:
        rows = json.loads(text)
    except ValueError as e:
        print(f"rayline predict: the rows are not JSON: {e}", file=sys.stderr)
        return 2
    url = args.url or os.environ.get("RAYLINE_SERVE_URL", "http://127.0.0.1:8000")
    client = Client(url, api_key=os.environ.get(args.api_key_env), timeout=args.timeout)
    try:
        answer = client.predict(args.name, rows)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e.detail, list) and len(e.detail) > 5:
            for d in e.detail[5:]:
                print(
                    f"  row {d.get('row')} {d.get('field') or ''}: {d.get('msg')}", file=sys.stderr
                )
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    for i, p in enumerate(answer["predictions"]):
        extra = ""
        if p.get("probability") is not None:
            extra = f"  p={p['probability']:.4f}"
        elif p.get("probabilities"):
            extra = "  " + " ".join(f"{c}={v:.3f}" for c, v in p["probabilities"].items())
        print(f"{i}\t{p['model']}@{p['version']}\t{p['prediction']}{extra}")
        for w in p.get("warnings", []):
            print(f"\twarning: {w.get('field') or ''} {w['type']}: {w['msg']}")
    return 0


def _add_predict_parser(sub: Any) -> None:
    pr = sub.add_parser("predict", help="predictions from a serving endpoint (rayline.serve)")
    pr.add_argument("name", help="the model name")
    pr.add_argument("rows", nargs="?", help="a JSON row or list of rows")
    pr.add_argument("--file", "-f", metavar="PATH", help="read the rows from a file ('-': stdin)")
    pr.add_argument(
        "--url", help="the endpoint (default: $RAYLINE_SERVE_URL or http://127.0.0.1:8000)"
    )
    pr.add_argument(
        "--api-key-env",
        default="RAYLINE_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (default: RAYLINE_API_KEY)",
    )
    pr.add_argument("--timeout", type=float, default=30.0, help="seconds (default: 30)")
    pr.add_argument("--json", action="store_true", help="print the answer as JSON")
    pr.set_defaults(fn=_cmd_predict)


def _cmd_stream(args: argparse.Namespace) -> int:
    from .streaming import kafka_io

    if args.stream_action == "run":
        from .config import load_spec
        from .streaming.run import run_stream

        spec = load_spec(args.spec)
        result = run_stream(
            spec,
            spec_path=args.spec,
            available_now=args.available_now,
            max_seconds=args.max_seconds,
        )
        st = result.record.get("stream", {})
        print(
            f"run {result.run_id} {result.status}: {st.get('events', 0):,} event(s), "
            f"{st.get('predictions', 0):,} prediction(s), {st.get('dead_letters', 0):,} dead "
            f"letter(s), {st.get('late_events', 0):,} late for the window"
        )
        print(f"  report:     {result.run_dir / 'report.html'}")
        return 0
    if args.stream_action == "replay":
        bootstrap = args.bootstrap
        path = args.source
        na = None
        order_by = args.order_by
        if args.spec:
            from .config import load_spec
            from .sources import resolve_paths

            spec = load_spec(args.spec)
            if args.source not in spec.sources:
                print(
                    f"error: source {args.source!r} is not in {args.spec}; known: "
                    f"{sorted(spec.sources)}",
                    file=sys.stderr,
                )
                return 2
            src = spec.sources[args.source]
            path = resolve_paths(args.source, src)[0]
            na = [src.options["nullValue"]] if "nullValue" in src.options else None
            if spec.streaming is not None:
                bootstrap = bootstrap or spec.streaming.bootstrap_servers
                order_by = order_by or spec.streaming.event_time_column
        bootstrap = bootstrap or "127.0.0.1:19092"
        kafka_io.ensure_topics(bootstrap, [args.topic])
        n = kafka_io.replay_csv(
            path,
            args.topic,
            bootstrap,
            rate=args.rate,
            order_by=order_by,
            limit=args.limit,
            na_values=na,
        )
        print(f"replayed {n:,} event(s) from {path} to {args.topic}")
        return 0
    for rec in kafka_io.tail(
        args.topic, args.bootstrap or "127.0.0.1:19092", timeout=args.timeout, limit=args.limit
    ):
        print(
            json.dumps(rec)
            if args.json
            else f"{rec['partition']}:{rec['offset']} {rec['key']} {rec['value']}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rayline", description="Rayline: ML pipelines on one Ray cluster."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check a pipeline spec without starting Spark")
    v.add_argument("spec")
    v.set_defaults(fn=_cmd_validate)

    r = sub.add_parser("run", help="run a pipeline spec on Spark-on-Ray")
    r.add_argument("spec")
    r.add_argument(
        "--resume", metavar="RUN_ID", help="continue a failed run from its first changed stage"
    )
    r.add_argument(
        "--train",
        action="store_true",
        help="continue into the spec's ml section: train, evaluate, register, gate",
    )
    r.set_defaults(fn=_cmd_run)

    t = sub.add_parser("train", help="train on the curated table in the warehouse (ml section)")
    t.add_argument("spec")
    t.add_argument("--resume", metavar="RUN_ID", help="continue a failed training run")
    t.set_defaults(fn=_cmd_train)

    rs = sub.add_parser("runs", help="list runs or show one")
    rs.add_argument("action", choices=["list", "show"])
    rs.add_argument("run", nargs="?")
    rs.add_argument(
        "--run-store",
        help="run store directory or URI, e.g. s3://bucket/runs (default: $RAYLINE_RUN_STORE "
        "or ./runs)",
    )
    rs.add_argument("--limit", type=int, default=20)
    rs.add_argument("--json", action="store_true", help="print the raw run record")
    rs.set_defaults(fn=_cmd_runs)

    lg = sub.add_parser("lineage", help="print the lineage graph of a run")
    lg.add_argument("run")
    lg.add_argument(
        "--run-store",
        help="run store directory or URI, e.g. s3://bucket/runs (default: $RAYLINE_RUN_STORE "
        "or ./runs)",
    )
    lg.add_argument("--json", action="store_true", help="print the OpenLineage events")
    lg.set_defaults(fn=_cmd_lineage)

    st = sub.add_parser("stream", help="Kafka streaming: run the job, replay data, tail a topic")
    st.set_defaults(fn=_cmd_stream)
    ss = st.add_subparsers(dest="stream_action", required=True)
    sr = ss.add_parser("run", help="run the spec's streaming section (until stopped)")
    sr.add_argument("spec")
    sr.add_argument(
        "--available-now",
        action="store_true",
        help="process what the input topic holds now, then stop",
    )
    sr.add_argument("--max-seconds", type=float, help="stop gracefully after this long")
    rp = ss.add_parser("replay", help="produce a dataset as JSON events at a given rate")
    rp.add_argument("source", help="a CSV file, or a source name of --spec")
    rp.add_argument("--topic", required=True)
    rp.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    rp.add_argument("--spec", help="pipeline spec whose source (and streaming settings) to use")
    rp.add_argument("--order-by", help="column to replay in (default: the event-time column)")
    rp.add_argument("--limit", type=int, help="only the first N events")
    rp.add_argument("--bootstrap", help="Kafka bootstrap servers (default: 127.0.0.1:19092)")
    tl = ss.add_parser("tail", help="print a topic's records")
    tl.add_argument("topic")
    tl.add_argument("--bootstrap", help="Kafka bootstrap servers (default: 127.0.0.1:19092)")
    tl.add_argument("--limit", type=int)
    tl.add_argument("--timeout", type=float, default=5.0, help="stop after this many idle seconds")
    tl.add_argument("--json", action="store_true")

    _add_models_parser(sub)
    _add_predict_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from .config import SpecError
    from .runner import RunFailed
    from .storage import StorageError

    try:
        return int(args.fn(args))
    except (SpecError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"details: rayline runs show {e.run_id}", file=sys.stderr)
        return 130 if e.interrupted else 1
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
