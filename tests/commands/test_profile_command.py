"""``convzoo profile``: formats, options, files and user errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from convzoo.cli import main


def test_markdown_summary_of_a_zoo_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--model", "cifar_shufflenetv2", "--summary", "--no-memory"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### cifar_shufflenetv2") and "45,002,112" in out and "| layer" not in out


def test_json_with_an_operator_and_input_size(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["profile", "--model", "cifar_resnet20", "--conv", "doconv", "--input-size", "3", "16", "16"]
    assert main([*argv, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "cifar_resnet20 (conv=doconv)" and data["input_size"] == [3, 16, 16]
    assert any(row["kind"] == "doconv" for row in data["layers"])


def test_deploy_gives_the_plain_macs_and_csv_goes_to_a_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "sub" / "profile.csv"
    argv = ["profile", "--model", "cifar_resnet20", "--conv", "doconv", "--deploy", "--format", "csv"]
    assert main([*argv, "--output", str(path), "--no-memory"]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert int(rows[-1]["macs"]) == 40_813_184  # DO-Conv folds into the plain conv


def test_square_input_shorthand_and_num_classes(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["profile", "--model", "cifar_resnet20", "--input-size", "8", "--num-classes", "3", "--format", "json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["input_size"] == [3, 8, 8] and data["layers"][-1]["output_shape"] == [1, 3]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--model", "cifar_resnet20", "--input-size", "3", "32"], "--input-size takes C H W"),
        (["--model", "cifar_resnet20", "--conv", "nope"], "unknown conv kind 'nope'"),
        (["--model", "cifar_resnet20", "--conv", "doconv", "--conv-options", "[1]"], "must be a JSON object"),
        (["--model", "cifar_resnet20", "--conv", "doconv", "--conv-options", "{"], "must be a JSON object"),
        (["--model", "cifar_resnet20", "--num-classes", "0"], "num_classes must be a positive int, got 0"),
        (
            ["--model", "cifar_resnet20", "--input-size", "4", "32", "32", "--no-memory"],
            "cifar_resnet20 cannot run on input size 4 32 32; cifar_resnet20 expects 3 input channels "
            "(--input-size 3 H W) (torch: Given groups=1",
        ),
    ],
)
def test_user_errors_print_one_line_and_exit_2(extra: list[str], match: str, capsys) -> None:
    assert main(["profile", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convzoo profile: error:") and match in err and len(err.strip().splitlines()) == 1


def test_output_that_is_a_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--model", "cifar_resnet20", "--no-memory", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    example = tmp_path / "profile.md"
    assert err == f"convzoo profile: error: --output '{tmp_path}' is a directory; give a file path, e.g. {example}"


def test_no_memory_shows_memory_as_not_measured(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["profile", "--model", "cifar_resnet20", "--no-memory"]
    assert main([*argv, "--summary"]) == 0
    assert "| peak activation memory | not measured |" in capsys.readouterr().out
    assert main([*argv, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_activation_bytes"] is None


def test_cac_on_the_meta_device_is_not_reported_as_a_bad_input_size(monkeypatch, capsys) -> None:
    """profile_model's ValueErrors that are not a refused input pass through unchanged."""
    import convzoo

    create = convzoo.create_model
    monkeypatch.setattr(convzoo, "create_model", lambda *args, **kwargs: create(*args, **kwargs, device="meta"))
    assert main(["profile", "--model", "cifar_resnet20", "--conv", "cac", "--no-memory"]) == 2
    err = capsys.readouterr().err
    assert "CAC layer(s) on the meta device" in err and "cannot run on input size" not in err
