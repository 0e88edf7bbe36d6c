"""``convzoo compare``: table files, skipping of unregistered kinds, reuse of finished runs; ``demo`` (slow)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from convzoo.cli import main

TINY = [
    "--data",
    "fake",
    "--image-size",
    "8",
    "--train-subset",
    "4",
    "--test-subset",
    "2",
    "--batch-size",
    "8",
    "--epochs",
    "1",
    "--progress",
    "false",
    "--device",
    "cpu",
]


def test_compare_table_and_skips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--model",
        "test_tiny",
        "--convs",
        "standard,doconv,not_a_kind",
        "--seeds",
        "2",
        *TINY,
        "--output",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "note: skipping not_a_kind: conv kind 'not_a_kind' is not registered" in printed
    assert "| conv | params | MACs (M) |" in printed and "± " in printed
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["conv"] for r in rows] == ["standard", "doconv"] and rows[0]["seeds"] == "2"
    assert int(rows[1]["params"]) > int(rows[0]["params"])  # DO-Conv over-parameterizes in training
    assert rows[1]["deployed_macs"] == rows[0]["deployed_macs"]  # ... and folds back to the same conv
    assert (out / "compare.png").stat().st_size > 0 and (out / "compare.md").is_file()
    assert main(args) == 0  # finished runs are reused, not retrained nor refused
    assert capsys.readouterr().out.count("reusing finished run") == 4


def test_compare_needs_a_usable_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", "--model", "test_tiny", "--convs", "nope", *TINY, "--output", str(tmp_path / "c")]
    assert main(args) == 2
    assert "none of the convs ['nope'] could be trained" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_and_deployed_outputs_match(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--convs", "standard,doconv", "--epochs", "2", "--output", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "deployed outputs match" in out and (tmp_path / "demo" / "compare.md").is_file()
