"""The HTML report of a run: stages and timings, quality verdicts, analytics and charts,
outputs and lineage, in one self-contained file (charts embedded)."""

from __future__ import annotations

import base64
import html
import json
from typing import Any

from .lineage import format_graph, read_events
from .runstore import RunStore, atomic_write_text
from .storage import Loc, location

__all__ = ["write_html_report"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}.warn{color:#9a6700;font-weight:600}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:.85em}img{max-width:100%}
"""

_CLASS = {
    "succeeded": "ok",
    "passed": "ok",
    "reused": "ok",
    "failed": "bad",
    "interrupted": "bad",
    "warned": "warn",
    "quarantined": "warn",
    "tolerated": "warn",
    "running": "warn",
}


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _status(s: str | None) -> str:
    return f'<span class="{_CLASS.get(s or "", "")}">{_e(s)}</span>'


def _n(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return _e(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:,.4g}"
    return _e(x)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(path: str) -> str:
    p = location(path)
    if not p.is_file():
        return ""
    data = base64.b64encode(p.read_bytes()).decode()
    return f'<p><img alt="{_e(p.name)}" src="data:image/png;base64,{data}"></p>'


def _schema_section(rep: dict[str, Any]) -> str:
    rows = []
    for name, s in rep.get("sources", {}).items():
        changes = "; ".join(f"{c['kind']} {c['column']}" for c in s.get("changes", [])) or "none"
        rows.append(
            [
                _e(name),
                _e(s.get("basis")),
                _e(s.get("policy")),
                _e(s.get("version")),
                _e(changes),
                _n(s.get("rows")),
                _n(s.get("malformed")),
            ]
        )
    return _table(
        ["source", "compared with", "policy", "schema version", "changes", "rows", "malformed"],
        rows,
    )


def _quality_section(rep: dict[str, Any]) -> str:
    rows = []
    for r in rep.get("rules", []):
        samples = r.get("samples") or []
        sample = (
            f"<pre>{_e(json.dumps(samples[:3], indent=1, default=str))}</pre>" if samples else ""
        )
        frac = r.get("fraction")
        rows.append(
            [
                _e(r["rule"]),
                _e(r["type"]),
                _e(r["severity"]),
                _n(r.get("checked")),
                _n(r.get("failed")),
                f"{frac:.3%}" if isinstance(frac, float) else "",
                _status(r.get("verdict")),
                sample,
            ]
        )
    summary = (
        f"<p>{_n(rep.get('rows'))} rows checked: {_n(rep.get('clean_rows'))} clean, "
        f"{_n(rep.get('quarantined_rows'))} quarantined. Verdict: {_status(rep.get('verdict'))}</p>"
    )
    return summary + _table(
        ["rule", "type", "severity", "checked", "failed", "fraction", "verdict", "samples"], rows
    )


def _analytics_section(rep: dict[str, Any]) -> str:
    rows = []
    for c, s in (rep.get("numeric") or {}).items():
        q = s.get("quantiles", {})
        out = (rep.get("outliers") or {}).get(c, {})
        rows.append(
            [
                _e(c),
                _n(s["count"]),
                _n(s["nulls"]),
                _n(s["mean"]),
                _n(s["stddev"]),
                _n(s["min"]),
                _n(q.get("0.5")),
                _n(s["max"]),
                _n(out.get("count")),
            ]
        )
    out = _table(
        ["column", "count", "nulls", "mean", "stddev", "min", "median", "max", "outliers"], rows
    )
    cats = []
    for c, s in (rep.get("categorical") or {}).items():
        top = ", ".join(
            f"{_e(t['value'])} ({t['count']:,})"
            for t in (rep.get("top_values") or {}).get(c, [])[:5]
        )
        cats.append([_e(c), _n(s["count"]), _n(s["nulls"]), _n(s["cardinality"]), top])
    if cats:
        out += _table(["column", "count", "nulls", "distinct values", "top values"], cats)
    for chart in (rep.get("charts") or {}).values():
        out += _img(chart)
    return out


def _ml_section(rep: dict[str, Any]) -> str:
    split = rep.get("split", {})
    out = [
        f"<p>model <b>{_e(rep.get('model_name'))}</b>, task {_e(rep.get('task'))}, label "
        f"{_e(rep.get('label'))}; split: train {_n(split.get('train'))}, validation "
        f"{_n(split.get('validation'))}, test {_n(split.get('test'))} rows "
        f"({_n(split.get('without_label'))} without a label left out)</p>"
    ]
    metric = rep.get("gate_metric")
    rows = []
    for c in rep.get("candidates", []):
        g = c.get("gate", {})
        verdict = f"promoted to {g.get('alias')}" if g.get("promoted") else "not promoted"
        rows.append(
            [
                _e(c["framework"]),
                _e(c["version"]),
                _n(c["metrics"].get(metric)),
                _n(c["baseline"].get(metric)),
                _status("passed" if g.get("promoted") else "warned") + " " + _e(verdict),
                _e("; ".join(g.get("reasons", []))),
            ]
        )
    out.append(
        _table(["framework", "version", metric or "metric", "baseline", "gate", "why"], rows)
    )
    tuning = rep.get("tuning")
    if tuning:
        out.append("<h3>Tuning trials</h3>")
        out.append(
            _table(
                ["trial", "params", "status", "val_loss"],
                [
                    [
                        _e(t.get("id")),
                        _e(json.dumps(t.get("params"), default=str)),
                        _e(t.get("status")),
                        _n(t.get("val_loss", t.get("last_val_loss"))),
                    ]
                    for t in tuning.get("trials", [])
                ],
            )
        )
    for c in rep.get("candidates", []):
        m = {k: v for k, v in c["metrics"].items() if isinstance(v, int | float)}
        out.append(f"<h3>{_e(c['framework'])} (version {_e(c['version'])})</h3>")
        out.append(
            _table(
                ["metric", "model", "baseline"],
                [[_e(k), _n(v), _n(c["baseline"].get(k))] for k, v in m.items()],
            )
        )
        for col, sl in (c.get("slices") or {}).items():
            keys = [k for k in sl[0] if k != "value"] if sl else []
            out.append(
                f"<p>by {_e(col)}</p>"
                + _table([col] + keys, [[_e(r["value"])] + [_n(r[k]) for k in keys] for r in sl])
            )
        out.extend(_img(p) for p in c.get("charts", []))
    return "".join(out)


def write_html_report(store: RunStore, run_id: str) -> Loc:
    """Render ``<run_dir>/report.html`` from the run record and the stage reports."""
    rec = store.read_record(run_id)
    run_dir = store.run_dir(run_id)
    parts = [
        f"<h1>Run {_e(run_id)}</h1>",
        _table(
            ["pipeline", "status", "started", "ended", "code"],
            [
                [
                    _e(rec["pipeline"]),
                    _status(rec["status"]),
                    _e(rec["started_at"]),
                    _e(rec.get("ended_at")),
                    _e(rec.get("code_version")),
                ]
            ],
        ),
    ]
    if rec.get("error"):
        err = rec["error"]
        parts.append(
            f"<h2>Error</h2><p class='bad'>stage {_e(err.get('stage'))}: {_e(err.get('type'))}</p>"
            f"<pre>{_e(err.get('message'))}</pre>"
        )
    parts.append("<h2>Stages</h2>")
    parts.append(
        _table(
            ["#", "stage", "type", "status", "seconds", "rows in", "rows out"],
            [
                [
                    str(i + 1),
                    _e(s["name"]),
                    _e(s["type"]),
                    _status(s["status"]),
                    _n(s.get("duration_s")),
                    _n(s.get("rows_in")),
                    _n(s.get("rows_out")),
                ]
                for i, s in enumerate(rec["stages"])
            ],
        )
    )
    for s in rec["stages"]:
        rep = store.read_report(run_id, s["name"])
        if not rep:
            continue
        section = {
            "schema": _schema_section,
            "quality": _quality_section,
            "analytics": _analytics_section,
            "ml": _ml_section,
        }.get(s["type"])
        if section:
            parts.append(
                f"<h2>{_e('ML' if s['type'] == 'ml' else s['type'].title())}: {_e(s['name'])}</h2>{section(rep)}"
            )
    if rec.get("outputs"):
        o = rec["outputs"]
        rows = [
            [_e(k), _e(v.get("table")), _e(v.get("path")), _n(v.get("rows"))] for k, v in o.items()
        ]
        parts.append("<h2>Outputs</h2>" + _table(["output", "table", "path", "rows"], rows))
        reasons = o.get("quarantine", {}).get("reasons") or {}
        if reasons:
            parts.append(
                _table(
                    ["quarantine reason", "rows"],
                    [[_e(k), _n(v)] for k, v in sorted(reasons.items())],
                )
            )
    parts.append(f"<h2>Lineage</h2><pre>{_e(format_graph(read_events(run_dir)))}</pre>")
    doc = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Rayline run {_e(run_id)}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>"
    )
    path = run_dir / "report.html"
    atomic_write_text(path, doc)
    return path
