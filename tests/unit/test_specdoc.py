from pathlib import Path

from rayline.specdoc import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "spec-reference.md"


def test_spec_reference_is_current():
    assert DOC.read_text() == render(), (
        "regenerate: python -m rayline.specdoc > docs/spec-reference.md"
    )


def test_reference_covers_every_rule_and_step():
    text = render()
    for name in (
        "NotNullRule",
        "FreshnessRule",
        "JoinStep",
        "TimestampStep",
        "max_failed_fraction",
        "on_schema_change",
    ):
        assert name in text
