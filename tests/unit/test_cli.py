from pathlib import Path

from rayline.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_validate_ok(capsys):
    assert main(["validate", str(ROOT / "pipelines" / "flights.yaml")]) == 0
    assert "valid pipeline 'flights'" in capsys.readouterr().out


def test_validate_bad_spec_exit_2(tmp_path, capsys):
    p = tmp_path / "s.yaml"
    p.write_text("name: p\nsources: {}\nstages: []\noutputs: {curated: {table: t}}\n")
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert "sources" in err and "stages" in err


def test_runs_show_unknown_run(tmp_path, capsys):
    assert main(["runs", "show", "nope", "--run-store", str(tmp_path)]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


def test_runs_list_empty(tmp_path, capsys):
    assert main(["runs", "list", "--run-store", str(tmp_path)]) == 0
    assert "no runs" in capsys.readouterr().out
