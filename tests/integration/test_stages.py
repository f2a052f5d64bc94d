"""Stage behaviour on small, hand-made data through the real runner and Spark-on-Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayline.runner import RunFailed, run_pipeline
from rayline.storage import StorageError

pytestmark = pytest.mark.integration

PEOPLE = """
id,name,age,country,email,score
1,ann,34,SE,ann@x.org,0.5
2,bob,17,NO,bob@x.org,0.7
3,cid,,SE,not-an-email,0.9
4,dan,52,XX,dan@x.org,1.5
4,eve,41,NO,eve@x.org,0.1
6,fay,29,SE,fay@x.org,0.3
"""
COUNTRIES = """
code,label
SE,Sweden
NO,Norway
"""


def people_sources(write_csv, **over):
    return {
        "people": {"path": write_csv("people", PEOPLE), "format": "csv", **over},
        "countries": {"path": write_csv("countries", COUNTRIES), "format": "csv"},
    }


def adults_stages(*, schema: bool = False, **rule_over):
    """Select id and age from people, then one range rule `adults` (age >= 18, severity fail)."""
    rule = {
        "name": "adults",
        "type": "range",
        "column": "age",
        "min": 18,
        "severity": "fail",
        **rule_over,
    }
    stages = [{"name": "schema", "type": "schema"}] if schema else []
    return stages + [
        {
            "name": "p",
            "type": "transform",
            "input": "people",
            "steps": [{"op": "select", "columns": ["id", "age"]}],
        },
        {"name": "checks", "type": "quality", "rules": [rule]},
    ]


def read_table(spark, result, which):
    """The table as the run published it (a Delta table: its directory also holds the files of
    earlier versions)."""
    out = result.record["outputs"][which]
    return spark.read.format("delta").option("versionAsOf", out["version"]).load(out["path"])


def test_quality_rules_quarantine_with_reasons(spark, write_csv, make_spec):
    spec = make_spec(
        people_sources(write_csv),
        [
            {"name": "schema", "type": "schema"},
            {
                "name": "prep",
                "type": "transform",
                "input": "people",
                "steps": [{"op": "derive", "columns": {"adult": "age >= 18"}}],
            },
            {
                "name": "checks",
                "type": "quality",
                "rules": [
                    {"name": "age_present", "type": "not_null", "columns": ["age"]},
                    {"name": "id_unique", "type": "unique", "columns": ["id"]},
                    {"name": "age_range", "type": "range", "column": "age", "min": 18, "max": 120},
                    {
                        "name": "email_ok",
                        "type": "regex",
                        "column": "email",
                        "pattern": "[^@]+@[^@]+",
                        "severity": "warn",
                    },
                    {
                        "name": "country_known",
                        "type": "referential",
                        "column": "country",
                        "source": "countries",
                        "source_column": "code",
                    },
                    {
                        "name": "score_set",
                        "type": "in_set",
                        "column": "score",
                        "values": [0.1, 0.3, 0.5, 0.7, 0.9],
                    },
                    {"name": "score_expr", "type": "expression", "expression": "score <= 1.0"},
                    {"name": "rows", "type": "row_count", "min": 3, "max": 100},
                ],
            },
        ],
    )
    result = run_pipeline(spec, spark=spark)
    report = json.loads(Path(result.run_dir, "reports", "checks.json").read_text())
    by = {r["rule"]: r for r in report["rules"]}
    assert by["age_present"]["failed"] == 1  # cid
    assert by["id_unique"]["failed"] == 2  # both rows with id 4
    assert by["age_range"]["failed"] == 1  # bob (17); null age is not_null's business
    assert by["email_ok"]["failed"] == 1 and by["email_ok"]["verdict"] == "warned"
    assert by["country_known"]["failed"] == 1  # XX
    assert by["score_set"]["failed"] == 1 and by["score_expr"]["failed"] == 1  # 1.5
    assert by["rows"]["verdict"] == "passed" and by["rows"]["observed"] == 6
    assert by["id_unique"]["samples"] and {s["name"] for s in by["id_unique"]["samples"]} == {
        "dan",
        "eve",
    }

    clean = {r["name"] for r in read_table(spark, result, "curated").collect()}
    assert clean == {"ann", "cid", "fay"} - {"cid"}  # cid: null age; email warn keeps nothing out
    q = {
        r["name"]: set(r["_rayline_reasons"])
        for r in read_table(spark, result, "quarantine").collect()
    }
    assert q["bob"] == {"age_range"}
    assert q["cid"] == {"age_present", "email_ok"}
    assert q["dan"] == {"id_unique", "country_known", "score_set", "score_expr"}
    assert q["eve"] == {"id_unique"}
    assert (
        result.record["stages"][2]["rows_in"] == 6 and result.record["stages"][2]["rows_out"] == 2
    )
    assert result.record["outputs"]["quarantine"]["reasons"]["id_unique"] == 2
    # registered in the catalog
    table = spec.outputs.curated.table
    assert spark.table(table).count() == 2


def test_malformed_lines_are_quarantined_with_the_raw_line(spark, write_csv, make_spec):
    path = write_csv(
        "m",
        """
        a,b,c
        1,x,2013-01-01T10:00:00Z
        oops,y,2013-01-01T10:00:00Z
        3,z
        4,w,2013-01-01T11:00:00Z
    """,
    )
    spec = make_spec(
        {
            "m": {
                "path": path,
                "format": "csv",
                "max_malformed_fraction": 0.6,
                "columns": [
                    {"name": "a", "type": "int"},
                    {"name": "b", "type": "string"},
                    {"name": "c", "type": "timestamp"},
                ],
            }
        },
        [
            {"name": "schema", "type": "schema"},
            {
                "name": "prep",
                "type": "transform",
                "input": "m",
                "steps": [{"op": "select", "columns": ["a", "b"]}],
            },
        ],
    )
    result = run_pipeline(spec, spark=spark)
    assert sorted(r["a"] for r in read_table(spark, result, "curated").collect()) == [1, 4]
    q = read_table(spark, result, "quarantine").collect()
    assert sorted(r["_rayline_raw"] for r in q) == ["3,z", "oops,y,2013-01-01T10:00:00Z"]
    assert all(r["_rayline_reasons"] == ["malformed"] and r["_rayline_source"] == "m" for r in q)
    schema_report = json.loads(Path(result.run_dir, "reports", "schema.json").read_text())
    assert schema_report["sources"]["m"]["malformed"] == 2
    assert result.record["outputs"]["quarantine"]["reasons"] == {"malformed": 2}


def test_transform_steps(spark, write_csv, make_spec):
    spec = make_spec(
        people_sources(write_csv),
        [
            {
                "name": "prep",
                "type": "transform",
                "input": "people",
                "steps": [
                    {"op": "filter", "condition": "age IS NULL OR age < 50"},
                    {"op": "fill_null", "values": {"age": 0}},
                    {"op": "dedupe", "keys": ["id"], "order_by": "age DESC"},
                    {
                        "op": "join",
                        "source": "countries",
                        "on": ["country"],
                        "right_on": ["code"],
                        "how": "inner",
                        "columns": ["label"],
                        "prefix": "c_",
                        "broadcast": True,
                    },
                    {"op": "rename", "columns": {"name": "who"}},
                    {"op": "cast", "columns": {"age": "double"}},
                    {
                        "op": "derive",
                        "columns": {"age2": "age * 2", "tag": "concat(who, '/', c_label)"},
                    },
                    {
                        "op": "timestamp",
                        "column": "ts",
                        "from_parts": {"year": "2020", "month": "1", "day": "id", "hour": "12"},
                        "timezone": "Europe/Stockholm",
                    },
                    {"op": "drop", "columns": ["email"]},
                ],
            }
        ],
    )
    result = run_pipeline(spec, spark=spark)
    rows = {r["who"]: r.asDict() for r in read_table(spark, result, "curated").collect()}
    # dan (52) filtered out; eve (41, id 4) kept; XX has no country -> inner join drops nothing else
    assert set(rows) == {"ann", "bob", "cid", "eve", "fay"}
    assert rows["cid"]["age"] == 0.0 and rows["cid"]["age2"] == 0.0
    assert rows["eve"]["tag"] == "eve/Norway"
    assert "email" not in rows["ann"]
    # 12:00 in Stockholm (UTC+1 in January) is 11:00 UTC
    assert str(rows["ann"]["ts"]) == "2020-01-01 11:00:00"


def test_unknown_column_names_stage_step_and_column(spark, write_csv, make_spec):
    spec = make_spec(
        people_sources(write_csv),
        [
            {
                "name": "prep",
                "type": "transform",
                "input": "people",
                "steps": [
                    {"op": "select", "columns": ["id", "name"]},
                    {"op": "derive", "columns": {"x": "nmae || '!'"}},
                ],
            }
        ],
    )
    with pytest.raises(RunFailed) as e:
        run_pipeline(spec, spark=spark)
    msg = str(e.value)
    assert "stage 'prep'" in msg and "steps[1] (derive)" in msg and "nmae" in msg
    record = json.loads(Path(spec.run_store, e.value.run_id, "run.json").read_text())
    assert record["status"] == "failed"
    assert record["error"]["stage"] == "prep"
    assert record["stages"][0]["status"] == "failed"
    assert not Path(spec.warehouse, spec.outputs.curated.table).exists()


def test_missing_source_names_the_source(spark, make_spec, tmp_path):
    spec = make_spec(
        {"gone": {"path": str(tmp_path / "nope" / "*.csv"), "format": "csv"}},
        [{"name": "schema", "type": "schema"}],
    )
    # Found before any stage runs (tests/unit/test_preflight.py: before Ray starts).
    with pytest.raises(StorageError, match=r"sources.gone: source 'gone': no file matches"):
        run_pipeline(spec, spark=spark)


def test_empty_source_is_an_error(spark, write_csv, make_spec):
    path = write_csv("empty", "a,b\n")
    spec = make_spec(
        {"e": {"path": path, "format": "csv"}},
        [
            {"name": "schema", "type": "schema"},
            {
                "name": "p",
                "type": "transform",
                "input": "e",
                "steps": [{"op": "select", "columns": ["a"]}],
            },
        ],
    )
    with pytest.raises(RunFailed, match=r"source 'e'.*empty"):
        run_pipeline(spec, spark=spark)


def test_schema_policies(spark, write_csv, make_spec, tmp_path):
    path = write_csv("s", "a,b\n1,2\n3,4\n")
    stages = [
        {"name": "schema", "type": "schema"},
        {
            "name": "p",
            "type": "transform",
            "input": "s",
            "steps": [{"op": "derive", "columns": {"z": "1"}}],
        },
    ]

    def run(policy):
        return run_pipeline(
            make_spec({"s": {"path": path, "format": "csv", "on_schema_change": policy}}, stages),
            spark=spark,
        )

    first = run("evolve")
    assert (
        json.loads(Path(first.run_dir, "reports", "schema.json").read_text())["sources"]["s"][
            "version"
        ]
        == 1
    )

    # a new column and a widened type
    write_csv("s", "a,b,c\n1,2.5,x\n3,4.5,y\n")
    with pytest.raises(RunFailed) as e:
        run("fail")
    assert "source 's'" in str(e.value) and "'b' widened: expected int, found double" in str(
        e.value
    )
    assert "'c' added" in str(e.value)

    warned = run("warn")
    rep = json.loads(Path(warned.run_dir, "reports", "schema.json").read_text())["sources"]["s"]
    assert rep["version"] == 1 and {c["kind"] for c in rep["changes"]} == {"added", "widened"}
    assert "c" not in read_table(spark, warned, "curated").columns

    evolved = run("evolve")
    rep = json.loads(Path(evolved.run_dir, "reports", "schema.json").read_text())["sources"]["s"]
    assert rep["version"] == 2
    assert {c["name"]: c["type"] for c in rep["accepted"]} == {
        "a": "int",
        "b": "double",
        "c": "string",
    }
    out = read_table(spark, evolved, "curated")
    assert sorted(r["b"] for r in out.collect()) == [2.5, 4.5]

    # an incompatible type is an error under every policy, naming the column
    write_csv("s", "a,b,c\nx1,2.5,x\nx3,4.5,y\n")
    with pytest.raises(RunFailed, match=r"column 'a' incompatible: expected int, found string"):
        run("evolve")


def test_fail_rule_stops_the_run_and_publishes_nothing(spark, write_csv, make_spec):
    spec = make_spec(people_sources(write_csv), adults_stages())
    with pytest.raises(RunFailed) as e:
        run_pipeline(spec, spark=spark)
    assert "adults (range, severity fail): 1 failing of 6" in str(e.value)
    rec = json.loads(Path(spec.run_store, e.value.run_id, "run.json").read_text())
    assert rec["status"] == "failed" and rec["error"]["stage"] == "checks"
    report = json.loads(Path(spec.run_store, e.value.run_id, "reports", "checks.json").read_text())
    assert report["verdict"] == "failed"
    assert not Path(spec.warehouse, spec.outputs.curated.table).exists()
    assert Path(spec.run_store, e.value.run_id, "report.html").exists()


def test_tolerated_fraction(spark, write_csv, make_spec):
    spec = make_spec(people_sources(write_csv), adults_stages(max_failed_fraction=0.2))
    result = run_pipeline(spec, spark=spark)
    report = json.loads(Path(result.run_dir, "reports", "checks.json").read_text())
    assert report["rules"][0]["verdict"] == "tolerated"
    assert result.record["outputs"]["quarantine"]["rows"] == 1


def test_resume_reuses_unchanged_stages(spark, write_csv, make_spec):
    sources = people_sources(write_csv)
    stages = adults_stages(schema=True)
    spec = make_spec(sources, stages)
    with pytest.raises(RunFailed) as e:
        run_pipeline(spec, spark=spark)
    run_id = e.value.run_id
    stages[2]["rules"][0]["severity"] = "quarantine"
    fixed = make_spec(sources, stages)
    result = run_pipeline(fixed, spark=spark, resume=run_id)
    assert result.run_id == run_id
    statuses = [s["status"] for s in result.record["stages"]]
    assert statuses == ["reused", "reused", "succeeded"]
    assert [a["status"] for a in result.record["attempts"]] == ["failed", "succeeded"]
    assert (
        result.record["outputs"]["curated"]["rows"] == 5
    )  # bob (17) quarantined; a null age passes a range
    with pytest.raises(RunFailed, match="already succeeded"):
        run_pipeline(fixed, spark=spark, resume=run_id)


def fail_at_publish(spec, spark, monkeypatch):
    """Run ``spec`` with publishing failing (disk full) and return its RunFailed, checked to
    name the fault; publishing works again afterwards."""
    from rayline import runner

    real, real_link = runner.write_table, runner.link_table

    def disk_full(*a, **k):
        raise OSError("disk full")

    # the curated table (the quality stage's files, linked) and the quarantine table (written)
    monkeypatch.setattr(runner, "write_table", disk_full)
    monkeypatch.setattr(runner, "link_table", disk_full)
    try:
        with pytest.raises(RunFailed, match="disk full") as e:
            run_pipeline(spec, spark=spark)
    finally:
        monkeypatch.setattr(runner, "write_table", real)
        monkeypatch.setattr(runner, "link_table", real_link)
    return e.value


@pytest.mark.parametrize("checkpoint", [False, True])
def test_resume_after_publish_failure_runs_only_publish(
    spark, write_csv, make_spec, checkpoint, monkeypatch
):
    """Without checkpoints (the default) the transform is recomputed lazily on resume and
    counts as reused; with them, it is read back from its Parquet copy."""
    sources = people_sources(write_csv)
    spec = make_spec(
        sources, adults_stages(schema=True, severity="quarantine"), checkpoint_stages=checkpoint
    )
    failed = fail_at_publish(spec, spark, monkeypatch)
    rec = json.loads(Path(spec.run_store, failed.run_id, "run.json").read_text())
    assert rec["error"]["stage"] == "publish"
    assert ("data" in rec["stages"][1]["outputs"]) is checkpoint
    assert not Path(spec.warehouse, spec.outputs.curated.table).exists()
    result = run_pipeline(spec, spark=spark, resume=failed.run_id)
    assert [s["status"] for s in result.record["stages"]] == ["reused"] * 3
    assert result.record["outputs"]["curated"]["rows"] == 5
    assert result.record["outputs"]["quarantine"]["rows"] == 1
    assert result.record["stages"][1]["rows_out"] == 6


def test_resume_reads_a_quality_stage_written_by_an_older_rayline(
    spark, write_csv, make_spec, monkeypatch
):
    """--resume of a run whose quality stage wrote its rows in the layout before the kinds (one
    table partitioned by a boolean ``_rayline_q``, every row with its reasons, no
    ``rows_partition_by`` in the report): the kept rows and the quarantined ones with their
    reasons come back from it, and nothing is recomputed."""
    import shutil

    from pyspark.sql import functions as F

    spec = make_spec(people_sources(write_csv), adults_stages(severity="quarantine"))
    run_id = fail_at_publish(spec, spark, monkeypatch).run_id
    report_path = Path(spec.run_store, run_id, "reports", "checks.json")
    report = json.loads(report_path.read_text())
    base = report["outputs"]["rows"]

    # rewrite the stage's rows as an older Rayline left them
    rows = spark.read.parquet(base)
    bad = F.col("_rayline_kind") == "quarantined"
    legacy = rows.select(
        "id",
        "age",
        bad.alias("_rayline_q"),
        F.when(bad, F.array(F.lit("adults")))
        .otherwise(F.array().cast("array<string>"))
        .alias("_rayline_reasons"),
    )
    legacy.write.partitionBy("_rayline_q").parquet(base + ".legacy")
    shutil.rmtree(base)
    Path(base + ".legacy").rename(base)
    del report["rows_partition_by"]
    report_path.write_text(json.dumps(report))

    result = run_pipeline(spec, spark=spark, resume=run_id)
    assert [s["status"] for s in result.record["stages"]] == ["reused", "reused"]
    assert result.record["outputs"]["curated"]["rows"] == 5
    assert sorted(r["id"] for r in read_table(spark, result, "curated").collect()) == [
        1,
        3,
        4,
        4,
        6,
    ]
    q = read_table(spark, result, "quarantine").collect()
    assert [(r["id"], r["age"], list(r["_rayline_reasons"])) for r in q] == [(2, 17, ["adults"])]
    assert result.record["outputs"]["quarantine"]["reasons"] == {"adults": 1}


def test_resume_reruns_from_changed_input(spark, write_csv, make_spec):
    sources = people_sources(write_csv)
    stages = [
        {"name": "schema", "type": "schema"},
        {
            "name": "p",
            "type": "transform",
            "input": "people",
            "steps": [{"op": "select", "columns": ["id", "agee"]}],
        },
    ]
    with pytest.raises(RunFailed) as e:
        run_pipeline(make_spec(sources, stages), spark=spark)
    stages[1]["steps"][0]["columns"] = ["id", "age"]
    result = run_pipeline(make_spec(sources, stages), spark=spark, resume=e.value.run_id)
    assert [s["status"] for s in result.record["stages"]] == ["reused", "succeeded"]


def test_resume_after_source_change_reruns_everything(spark, write_csv, make_spec):
    sources = people_sources(write_csv)
    stages = adults_stages(schema=True)
    with pytest.raises(RunFailed) as e:
        run_pipeline(make_spec(sources, stages), spark=spark)
    # the data is fixed instead of the rule: the source's fingerprint changes
    write_csv("people", PEOPLE.replace("2,bob,17,", "2,bob,18,"))
    result = run_pipeline(make_spec(sources, stages), spark=spark, resume=e.value.run_id)
    assert [s["status"] for s in result.record["stages"]] == ["succeeded"] * 3
    assert result.record["outputs"]["curated"]["rows"] == 6


def test_not_nullable_contract_column(spark, write_csv, make_spec):
    path = write_csv("nn", "a,b\n1,x\n,y\n3,\n")
    cols = [{"name": "a", "type": "int", "nullable": False}, {"name": "b", "type": "string"}]
    stages = [
        {"name": "schema", "type": "schema"},
        {
            "name": "p",
            "type": "transform",
            "input": "nn",
            "steps": [{"op": "select", "columns": ["a", "b"]}],
        },
    ]
    with pytest.raises(RunFailed, match=r"column 'a' is declared not nullable but has 1 null"):
        run_pipeline(
            make_spec({"nn": {"path": path, "format": "csv", "columns": cols}}, stages), spark=spark
        )
    result = run_pipeline(
        make_spec(
            {"nn": {"path": path, "format": "csv", "columns": cols, "on_schema_change": "warn"}},
            stages,
        ),
        spark=spark,
    )
    rep = json.loads(Path(result.run_dir, "reports", "schema.json").read_text())["sources"]["nn"]
    assert {"kind": "nullability", "column": "a", "nulls": 1} in rep["changes"]


def test_profile_statistics_quantiles_top_values_and_outlier_samples(spark, tmp_path, make_spec):
    """The profile on 30 rows in 3 files: statistics and quantiles as Spark computes them
    (percentile_approx is exact on so few rows), exact distinct counts, and the first outlier
    rows in data order (as a limit picks them)."""
    values = [1, 2, 2, 3, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
              14, 15, 16, 200, 300]  # fmt: skip
    lines = ["id,v,w,c"]
    for i, v in enumerate(values):
        w = "" if i % 7 == 3 else str(round((i * 37 % 11) * 0.5, 1))
        lines.append(f"{i},{v},{w},{'abcde'[i % 5] if i % 4 else 'z'}")
    data = tmp_path / "nums"
    data.mkdir()
    for part in range(3):  # three files: three partitions to merge
        rows = lines[1 + part * 10 : 11 + part * 10]
        (data / f"part{part}.csv").write_text("\n".join([lines[0], *rows]) + "\n")
    spec = make_spec(
        {"nums": {"path": str(data / "*.csv"), "format": "csv"}},
        [
            {"name": "schema", "type": "schema"},
            {
                "name": "prep",
                "type": "transform",
                "input": "nums",
                "steps": [{"op": "select", "columns": ["id", "v", "w", "c"]}],
            },
            {
                "name": "profile",
                "type": "analytics",
                "numeric_columns": ["v", "w"],
                "categorical_columns": ["c"],
                "quantiles": [0.05, 0.5, 0.95],
                "sample_size": 1,
            },
        ],
    )
    result = run_pipeline(spec, spark=spark)
    rep = json.loads(Path(result.run_dir, "reports", "profile.json").read_text())
    df = read_table(spark, result, "curated")
    qs = [0.05, 0.25, 0.5, 0.75, 0.95]
    for c in ("v", "w"):
        want = df.selectExpr(
            "count(*) AS rows",
            f"count({c}) AS n",
            f"avg({c}) AS mean",
            f"stddev({c}) AS sd",
            f"min({c}) AS lo",
            f"max({c}) AS hi",
            f"percentile_approx(CAST({c} AS DOUBLE), array({','.join(map(str, qs))}), 100000) AS q",
        ).first()
        got = rep["numeric"][c]
        assert got["count"] == want["n"] and got["nulls"] == want["rows"] - want["n"]
        assert got["mean"] == pytest.approx(want["mean"], rel=1e-12)
        assert got["stddev"] == pytest.approx(want["sd"], rel=1e-12)
        assert (got["min"], got["max"]) == (want["lo"], want["hi"])
        assert got["quantiles"] == {str(q): v for q, v in zip(qs, want["q"], strict=True)}
    assert rep["numeric"]["w"]["nulls"] == 4  # rows 3, 10, 17, 24
    cat = rep["categorical"]["c"]
    assert cat == {"count": 30, "nulls": 0, "cardinality": 6}  # z, a, b, c, d, e: exact
    assert rep["top_values"]["c"][0] == {"value": "z", "count": 8}
    out = rep["outliers"]["v"]
    assert out["count"] == 2  # 200 and 300 lie beyond the upper fence
    assert out["samples"] == [{"id": 28, "v": 200, "w": 1.0, "c": "z"}]  # the first in data order


def test_dedupe_before_a_unique_rule_shuffles_and_sorts_once(spark, write_csv, make_spec):
    """A dedupe whose keys include a following unique rule's columns shuffles by those columns,
    so that the rule's window reuses its shuffle and sort; the rows are the same as without."""
    from types import SimpleNamespace

    from rayline.stages import quality, transform

    path = write_csv(
        "legs",
        """
        id,day,slot,v
        1,1,1,10
        1,1,1,10
        1,1,2,11
        2,1,1,12
        2,2,1,13
        2,2,1,13
        3,1,1,14
        """,
    )
    spec = make_spec(
        {"legs": {"path": path, "format": "csv"}},
        [
            {
                "name": "prep",
                "type": "transform",
                "input": "legs",
                "steps": [{"op": "dedupe", "keys": ["day", "slot", "id"]}],
            },
            {
                "name": "checks",
                "type": "quality",
                "rules": [{"name": "one_per_day", "type": "unique", "columns": ["id", "day"]}],
            },
        ],
    )
    result = run_pipeline(spec, spark=spark)
    clean = sorted(
        (r["id"], r["day"], r["slot"]) for r in read_table(spark, result, "curated").collect()
    )
    bad = sorted(
        (r["id"], r["day"], r["slot"]) for r in read_table(spark, result, "quarantine").collect()
    )
    assert clean == [(2, 1, 1), (2, 2, 1), (3, 1, 1)]  # duplicates dropped, one row each
    assert bad == [(1, 1, 1), (1, 1, 2)]  # id 1 twice on day 1 (two slots)

    prep, checks = spec.stages
    hint = transform.cluster_hint(prep, SimpleNamespace(spec=spec))
    assert hint == ["id", "day"]
    raw = spark.read.option("header", "true").option("inferSchema", "true").csv(path)

    def plan(cluster_by):
        rows = transform.apply_steps(raw, prep.steps, None, cluster_by=cluster_by)
        work, _ = quality._row_flags(rows, checks, None)
        return work._jdf.queryExecution().executedPlan().toString()

    shared, apart = plan(hint), plan(None)
    assert shared.count("Exchange hashpartitioning") == 1 and shared.count("Sort [") == 1
    assert apart.count("Exchange hashpartitioning") == 2  # without the hint: two shuffles


@pytest.mark.parametrize("after", [None, "transform"])
def test_curated_table_is_the_quality_stages_files(spark, write_csv, make_spec, after):
    """The quality stage writes its rows partitioned by kind and by the curated table's columns;
    publishing links the clean and warned files into place (no second write) unless a stage that
    changes the rows follows the quality stage. Either way the same table."""
    import os

    from rayline.stages import quality

    stages = [
        {"name": "schema", "type": "schema"},
        {
            "name": "prep",
            "type": "transform",
            "input": "people",
            "steps": [{"op": "filter", "condition": "true"}],
        },
        {
            "name": "checks",
            "type": "quality",
            "rules": [
                {"name": "adults", "type": "range", "column": "age", "min": 18},
                {
                    "name": "email_ok",
                    "type": "regex",
                    "column": "email",
                    "pattern": "[^@]+@[^@]+",
                    "severity": "warn",
                },
            ],
        },
        {"name": "profile", "type": "analytics", "numeric_columns": ["score"]},
    ]
    if after:
        stages.append(
            {"name": "post", "type": "transform", "steps": [{"op": "filter", "condition": "true"}]}
        )
    table = f"t_link_{os.getpid()}_{after or 'none'}"
    spec = make_spec(
        people_sources(write_csv),
        stages,
        outputs={"curated": {"table": table, "partition_by": ["country"]}},
    )
    result = run_pipeline(spec, spark=spark)
    out = result.record["outputs"]["curated"]
    assert out["rows"] == 5  # bob (17) quarantined; cid's bad email only warned
    got = spark.table(table)
    assert sorted(got.columns) == sorted(["id", "name", "age", "country", "email", "score"])
    assert {r["name"] for r in got.collect()} == {"ann", "cid", "dan", "eve", "fay"}
    assert {p.name for p in Path(out["path"]).iterdir() if p.is_dir() and p.name[0] != "_"} == {
        "country=SE",
        "country=NO",
        "country=XX",
    }
    files = [f for f in Path(out["path"]).rglob("*.parquet") if "_delta_log" not in f.parts]
    assert files and all((f.stat().st_nlink > 1) is (after is None) for f in files)
    rows_dir = Path(result.run_dir, "stages", "checks", "rows")
    assert {p.name for p in rows_dir.iterdir() if p.is_dir()} == {
        f"{quality.KIND}=clean",
        f"{quality.KIND}=warned",
        f"{quality.KIND}=quarantined",
    }
    q = read_table(spark, result, "quarantine").collect()
    assert [(r["name"], r["_rayline_reasons"]) for r in q] == [("bob", ["adults"])]
    report = json.loads(Path(result.run_dir, "reports", "checks.json").read_text())
    by = {r["rule"]: r for r in report["rules"]}
    assert by["email_ok"]["failed"] == 1 and by["email_ok"]["samples"][0]["name"] == "cid"
    assert by["adults"]["failed"] == 1 and by["adults"]["samples"][0]["name"] == "bob"
