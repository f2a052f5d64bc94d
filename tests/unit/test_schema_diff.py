import pytest

from rayline.stages.schema import _compare_types, diff_columns


def cols(*spec):
    return [{"name": n, "type": t, "nullable": True} for n, t in spec]


@pytest.mark.parametrize(
    "expected, observed, verdict",
    [
        ("int", "int", "same"),
        ("bigint", "int", "fits"),
        ("double", "int", "fits"),
        ("int", "bigint", "widened"),
        ("int", "double", "widened"),
        ("float", "double", "widened"),
        ("string", "int", "fits"),
        ("int", "string", "incompatible"),
        ("timestamp", "date", "fits"),
        ("date", "timestamp", "widened"),
        ("double", "timestamp", "incompatible"),
        ("decimal(10,2)", "int", "fits"),
    ],
)
def test_compare_types(expected, observed, verdict):
    assert _compare_types(expected, observed) == verdict


def test_diff_detects_added_removed_widened_incompatible():
    expected = cols(("a", "int"), ("b", "int"), ("c", "int"), ("gone", "string"))
    observed = cols(("a", "int"), ("b", "double"), ("c", "string"), ("new", "string"))
    changes, merged = diff_columns(expected, observed)
    kinds = {(c["kind"], c["column"]) for c in changes}
    assert kinds == {("widened", "b"), ("incompatible", "c"), ("added", "new"), ("removed", "gone")}
    types = {c["name"]: c["type"] for c in merged}
    # widened columns take the wider type; incompatible ones keep the expected one
    assert types == {"a": "int", "b": "double", "c": "int", "new": "string"}
    # merged keeps the observed (file) order, which CSV reading relies on
    assert [c["name"] for c in merged] == ["a", "b", "c", "new"]


def test_narrower_data_is_no_change():
    changes, merged = diff_columns(cols(("a", "bigint")), cols(("a", "int")))
    assert changes == []
    assert merged[0]["type"] == "bigint"
