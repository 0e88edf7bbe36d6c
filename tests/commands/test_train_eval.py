"""``convzoo train`` and ``convzoo eval`` end to end on tiny data; bad input exits 2 and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convzoo.cli import main

TINY = [
    "--model",
    "test_tiny",
    "--data",
    "fake",
    "--image-size",
    "8",
    "--train-subset",
    "8",
    "--test-subset",
    "4",
    "--batch-size",
    "16",
    "--progress",
    "false",
    "--device",
    "cpu",
]


def test_train_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *TINY,
                "--epochs",
                "1",
                "--recipe",
                "short-onecycle",
                "--warmup-epochs",
                "0.3",
                "--output",
                str(run),
            ]
        )
        == 0
    )
    assert "top-1" in capsys.readouterr().out
    config = (run / "config.yaml").read_text()
    assert "scheduler: onecycle" in config and "epochs: 1" in config
    assert main(["eval", "--checkpoint", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "results.json").read_text())
    assert report["top1"] == summary["top1"] and report["count"] == 40 and len(report["per_class"]) == 10
    assert main(["eval", "--checkpoint", str(run / "checkpoint.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "top-5" in out and "per-class top-1:" in out and "class9" in out


def test_list_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--list-recipes"]) == 0
    out = capsys.readouterr().out
    assert "doconv-cifar" in out and "He et al." in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no_such_model"], "unknown model 'no_such_model'"),
        (["--conv", "no_such_conv"], "unknown conv kind 'no_such_conv'"),
        (["--data", "no_such_data"], "unknown data 'no_such_data'"),
        (["--data", "imagefolder", "--data-dir", "/no/such/dir"], "expected root/train/<class>/<image>"),
        (["--recipe", "no_such_recipe"], "unknown recipe 'no_such_recipe'"),
    ],
)
def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert main(["train", *TINY, "--epochs", "1", "--output", str(tmp_path / "run"), *args]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_corrupt_image_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            (tmp_path / "data" / split / name / "0.png").write_bytes(b"garbage")
    args = [
        "train",
        "--model",
        "test_tiny",
        "--data",
        "imagefolder",
        "--data-dir",
        str(tmp_path / "data"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output",
        str(tmp_path / "run"),
    ]
    assert main(args) == 2
    assert "cannot decode image" in capsys.readouterr().err and "0.png" in capsys.readouterr().err + "0.png"
    assert not (tmp_path / "run").exists()


def test_checkpoint_from_another_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--output", str(run)]) == 0
    before = (run / "checkpoint.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--model", "test_tiny_nobn"]) == 2
    assert "is for model='test_tiny', not model='test_tiny_nobn'" in capsys.readouterr().err
    other = [a if a != "test_tiny" else "test_tiny_nobn" for a in TINY]
    assert main(["train", *other, "--epochs", "2", "--output", str(run), "--resume"]) == 2
    assert "is for model='test_tiny'" in capsys.readouterr().err
    assert main(["train", *TINY, "--epochs", "1", "--output", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "checkpoint.safetensors").read_bytes() == before
