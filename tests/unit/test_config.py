import textwrap

import pytest

from rayline.config import SpecError, load_spec, parse_spec

BASE = {
    "name": "p",
    "sources": {"a": {"path": "a.csv", "format": "csv"}, "b": {"path": "b.csv", "format": "csv"}},
    "stages": [
        {
            "name": "prep",
            "type": "transform",
            "input": "a",
            "steps": [{"op": "select", "columns": ["x"]}],
        },
        {
            "name": "q",
            "type": "quality",
            "rules": [{"name": "r", "type": "not_null", "columns": ["x"]}],
        },
    ],
    "outputs": {"curated": {"table": "t"}},
}


def spec(**over):
    import copy

    d = copy.deepcopy(BASE)
    d.update(over)
    return d


def test_valid_spec_parses_with_defaults():
    s = parse_spec(spec())
    assert [st.name for st in s.stages] == ["prep", "q"]
    assert s.outputs.quarantine_or_default().table == "t_quarantine"
    assert s.session.num_executors == 1
    assert s.stages[1].rules[0].severity == "quarantine"


def test_unknown_step_type_names_the_key():
    d = spec()
    d["stages"][0]["steps"] = [{"op": "explode", "columns": ["x"]}]
    with pytest.raises(SpecError) as e:
        parse_spec(d, "f.yaml")
    msg = str(e.value)
    assert "f.yaml" in msg and "stages.0.transform.steps.0" in msg and "'explode'" in msg


def test_unknown_rule_type_names_the_key():
    d = spec()
    d["stages"][1]["rules"] = [{"name": "r", "type": "sorted", "column": "x"}]
    with pytest.raises(SpecError, match=r"stages\.1\.quality\.rules\.0.*'sorted'"):
        parse_spec(d)


def test_misspelt_key_is_reported():
    d = spec()
    d["sources"]["a"]["formatt"] = "csv"
    with pytest.raises(SpecError, match=r"sources\.a\.formatt: unknown key"):
        parse_spec(d)


def test_missing_source_reference_is_reported_before_spark():
    d = spec()
    d["stages"][1]["rules"] = [{"name": "r", "type": "referential", "column": "x", "source": "zzz"}]
    with pytest.raises(SpecError, match=r"rules\[0\]\.source: unknown source 'zzz'"):
        parse_spec(d)


def test_join_with_unknown_source():
    d = spec()
    d["stages"][0]["steps"] = [{"op": "join", "source": "nope", "on": ["k"]}]
    with pytest.raises(SpecError, match="unknown source 'nope'"):
        parse_spec(d)


@pytest.mark.parametrize(
    "rule, fragment",
    [
        ({"name": "r", "type": "range", "column": "x"}, "give min, max or both"),
        ({"name": "r", "type": "range", "column": "x", "min": 5, "max": 1}, "above max"),
        ({"name": "r", "type": "regex", "column": "x", "pattern": "("}, "does not compile"),
        ({"name": "r", "type": "row_count", "severity": "quarantine", "min": 1}, "severity"),
        ({"name": "r", "type": "freshness", "column": "t", "max_age": "3 years"}, "max_age"),
        ({"name": "bad name", "type": "not_null", "columns": ["x"]}, "name"),
        (
            {"name": "r", "type": "not_null", "columns": ["x"], "max_failed_fraction": 2},
            "max_failed_fraction",
        ),
    ],
)
def test_rule_validation(rule, fragment):
    d = spec()
    d["stages"][1]["rules"] = [rule]
    with pytest.raises(SpecError, match=fragment):
        parse_spec(d)


def test_duplicate_rule_and_stage_names():
    d = spec()
    d["stages"][1]["rules"] = [
        {"name": "r", "type": "not_null", "columns": ["x"]},
        {"name": "r", "type": "not_null", "columns": ["y"]},
    ]
    with pytest.raises(SpecError, match="repeated"):
        parse_spec(d)
    d = spec()
    d["stages"][1]["name"] = "prep"
    with pytest.raises(SpecError, match="stage names must be unique"):
        parse_spec(d)


def test_unknown_type_in_contract():
    d = spec()
    d["sources"]["a"]["columns"] = [{"name": "x", "type": "integr"}]
    with pytest.raises(SpecError, match="unknown type 'integr'"):
        parse_spec(d)


def test_type_aliases_normalise():
    d = spec()
    d["sources"]["a"]["columns"] = [{"name": "x", "type": "Integer"}, {"name": "y", "type": "long"}]
    s = parse_spec(d)
    assert [c.type for c in s.sources["a"].columns] == ["int", "bigint"]


def test_env_expansion_and_overrides(monkeypatch):
    monkeypatch.setenv("DATA", "/d")
    monkeypatch.setenv("RAYLINE_NUM_EXECUTORS", "3")
    monkeypatch.setenv("RAYLINE_WAREHOUSE", "/w")
    d = spec()
    d["sources"]["a"]["path"] = "${DATA}/a.csv"
    d["sources"]["b"]["path"] = "${NOPE:-fallback}/b.csv"
    s = parse_spec(d)
    assert s.sources["a"].path == "/d/a.csv"
    assert s.sources["b"].path == "fallback/b.csv"
    assert s.session.num_executors == 3
    assert s.warehouse == "/w"


def test_unset_env_without_default_is_an_error(monkeypatch):
    monkeypatch.delenv("NOPE_X", raising=False)
    d = spec()
    d["sources"]["a"]["path"] = "${NOPE_X}/a.csv"
    with pytest.raises(SpecError, match=r"spec\.sources\.a\.path: environment variable NOPE_X"):
        parse_spec(d)


def test_yaml_on_key_stays_a_string(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(
        textwrap.dedent("""
        name: p
        sources:
          a: {path: a.csv, format: csv}
          b: {path: b.csv, format: csv}
        stages:
          - name: prep
            type: transform
            input: a
            steps:
              - {op: join, source: b, on: [k], how: left}
        outputs: {curated: {table: t}}
    """)
    )
    s = load_spec(p)
    assert s.stages[0].steps[0].on == ["k"]


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: p\nsources: [a\n  b: {\n")
    with pytest.raises(SpecError, match=r"bad\.yaml:\d+:\d+: not valid YAML"):
        load_spec(p)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_example_spec_is_valid():
    from pathlib import Path

    s = load_spec(Path(__file__).resolve().parents[2] / "pipelines" / "flights.yaml")
    assert {"flights", "weather", "airlines", "airports"} <= set(s.sources)
    types = {r.type for st in s.stages if st.type == "quality" for r in st.rules}
    assert {
        "not_null",
        "unique",
        "range",
        "regex",
        "in_set",
        "referential",
        "row_count",
        "freshness",
        "expression",
    } <= types
