"""The ``rayline`` command.

rayline validate SPEC            check a spec without starting Spark
rayline run SPEC [--resume RUN]  run (or resume) a pipeline on Spark-on-Ray
rayline runs list                recent runs
rayline runs show RUN            one run: stages, timings, rows, outputs, error, report
rayline lineage RUN              the lineage graph of a run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
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
    result = run_pipeline(spec, spec_path=args.spec, resume=args.resume)
    out = result.record["outputs"]
    print(f"run {result.run_id} succeeded")
    print(
        f"  curated:    {out['curated']['table']} ({out['curated']['rows']:,} rows) at {out['curated']['path']}"
    )
    print(
        f"  quarantine: {out['quarantine']['table']} ({out['quarantine']['rows']:,} rows) at {out['quarantine']['path']}"
    )
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
        print(f"\n{k}: {o['table']} ({o['rows']:,} rows) {o['path']}")
        for reason, cnt in sorted((o.get("reasons") or {}).items()):
            print(f"    {reason}: {cnt:,}")
    if rec.get("error"):
        e = rec["error"]
        print(f"\nerror in stage {e.get('stage')}: {e.get('type')}: {e.get('message')}")
        print(f"resume with: rayline run {rec.get('spec_path') or 'SPEC'} --resume {rec['run_id']}")
    html = store.run_dir(rec["run_id"]) / "report.html"
    if html.exists():
        print(f"\nreport: {html}")
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
    r.set_defaults(fn=_cmd_run)

    rs = sub.add_parser("runs", help="list runs or show one")
    rs.add_argument("action", choices=["list", "show"])
    rs.add_argument("run", nargs="?")
    rs.add_argument(
        "--run-store", help="run store directory (default: $RAYLINE_RUN_STORE or ./runs)"
    )
    rs.add_argument("--limit", type=int, default=20)
    rs.add_argument("--json", action="store_true", help="print the raw run record")
    rs.set_defaults(fn=_cmd_runs)

    lg = sub.add_parser("lineage", help="print the lineage graph of a run")
    lg.add_argument("run")
    lg.add_argument(
        "--run-store", help="run store directory (default: $RAYLINE_RUN_STORE or ./runs)"
    )
    lg.add_argument("--json", action="store_true", help="print the OpenLineage events")
    lg.set_defaults(fn=_cmd_lineage)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from .config import SpecError
    from .runner import RunFailed

    try:
        return int(args.fn(args))
    except SpecError as e:
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
