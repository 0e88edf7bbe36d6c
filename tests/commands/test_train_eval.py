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
        (["--recipe", "no_such_file.yaml"], "recipe file 'no_such_file.yaml' does not exist"),
        (["--scheduler", "multistep", "--milestones", "1", "--gamma", "-1"], "gamma must be a finite number in (0, 1]"),
        (["--scheduler", "step", "--gamma", "-0.5"], "gamma must be a finite number in (0, 1], got -0.5"),
        (["--min-lr", "5", "--lr", "0.1"], "min_lr (5.0) must be <= lr (0.1)"),
        (["--momentum", "1.5"], "momentum must be a finite number in [0, 1), got 1.5"),
        (["--lr", "nan"], "lr must be a finite number >= 0, got nan"),
        (["--weight-decay", "inf"], "weight_decay must be a finite number >= 0, got inf"),
        (
            ["--num-classes", "0"],
            "num_classes must be an int >= 1 (or null/none for the data's own class count), got 0",
        ),
        (["--num-classes", "-5"], "num_classes must be an int >= 1"),
        (
            ["--scheduler", "multistep", "--milestones", "0,1"],
            "milestones must be a list of strictly increasing epochs",
        ),
        (["--device", "cuda:x"], "device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:x'"),
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
    err = capsys.readouterr().err
    assert "cannot decode image" in err and "0.png" in err
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


def test_malformed_recipe_yaml_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("epochs: [1\n")
    assert main(["train", *TINY, "--recipe", str(recipe), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"convzoo train: error: recipe '{recipe}' is not valid YAML: expected ',' or ']'")
    assert "at line 2, column 1" in err and len(err.splitlines()) == 1
    recipe.write_text("milestones: [a, b]\n")
    assert main(["train", *TINY, "--recipe", str(recipe), "--output", str(tmp_path / "run")]) == 2
    assert "config key 'milestones' must be a list of ints, e.g. [82, 123], got ['a', 'b']" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def no_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.usefixtures("no_accelerators")
@pytest.mark.parametrize(
    ("command", "device", "message"),
    [
        ("train", "cuda", "device 'cuda': CUDA is not available on this machine"),
        ("train", "cuda:1", "device 'cuda:1': CUDA is not available on this machine"),
        ("train", "mps", "device 'mps': MPS (Apple GPU) is not available on this machine"),
        ("compare", "cuda", "device 'cuda': CUDA is not available on this machine"),
        ("eval", "cuda", "device 'cuda': CUDA is not available on this machine"),
        ("demo", "cuda", "device 'cuda': CUDA is not available on this machine"),
    ],
)
def test_missing_accelerator_is_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, device: str, message: str
) -> None:
    out = str(tmp_path / "run")
    argv = {
        "train": ["train", *TINY, "--output", out],
        "compare": ["compare", *TINY, "--convs", "standard", "--output", out],
        "eval": ["eval", "--checkpoint", out],
        "demo": ["demo", "--output", out],
    }[command]
    assert main([*argv, "--device", device]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"convzoo {command}: error: {message}") and "--device cpu" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.usefixtures("no_accelerators")
def test_cpu_and_auto_devices_pass_the_check() -> None:
    from convzoo.train.distributed import check_device

    check_device("cpu")
    check_device("auto")


@pytest.mark.usefixtures("no_accelerators")
def test_late_milestones_print_one_warning_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", *TINY, "--recipe", "doconv-cifar", "--epochs", "2", "--output", str(tmp_path / "run")]
    assert main([*argv, "--device", "cuda"]) == 2  # stops at the device check, after the config is made
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == (
        "convzoo train: warning: milestones [82, 123] are not before epochs (2), so the rate is not decayed there "
        "in this run (they apply if it is resumed with more epochs); pass --milestones to decay within it"
    )
    assert lines[1].startswith("convzoo train: error: device 'cuda'") and len(lines) == 2


def test_ctrl_c_is_one_line_on_a_clean_line_then_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from convzoo.train.engine import Trainer

    step, calls = Trainer._train_step, []

    def ctrl_c_in_epoch_two(self: Trainer, *args: object) -> object:
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return step(self, *args)

    monkeypatch.setattr(Trainer, "_train_step", ctrl_c_in_epoch_two)
    args = ["train", *TINY, "--batch-size", "8", "--epochs", "2", "--progress", "true", "--output", str(tmp_path / "r")]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # the progress bar is cleared first, so the message starts its own line (tqdm redraws with \r)
    assert err.split("\r")[-1].lstrip("\n") == (
        "convzoo train: interrupted; rerun it with --resume to continue from the last checkpoint\n"
    )
    assert main([*args, "--resume"]) == 0
    rows = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["epoch", "1", "2"]


def _one_error_line(capsys: pytest.CaptureFixture[str], command: str = "train") -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"convzoo {command}: error: ")
    return err


def test_resume_with_changed_settings_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--output", str(run)]) == 0
    before = {name: (run / name).read_bytes() for name in ("checkpoint.safetensors", "config.yaml", "metrics.csv")}
    capsys.readouterr()
    changed = ["--lr", "0.05", "--batch-size", "8", "--seed", "2", "--optimizer", "adamw"]
    assert main(["train", *TINY, "--epochs", "2", "--output", str(run), "--resume", *changed]) == 2
    err = _one_error_line(capsys)
    for shown in ("batch_size=16 (now 8)", "optimizer='sgd' (now 'adamw')", "lr=0.1 (now 0.05)", "seed=0 (now 2)"):
        assert shown in err
    assert "only " in err and "epochs" in err.split("only ")[1]
    assert before == {name: (run / name).read_bytes() for name in before}
    # settings that may change: more epochs, progress, evaluation and checkpoint intervals, device
    more = ["--epochs", "2", "--eval-every", "2", "--checkpoint-every", "3", "--progress", "false"]
    assert main(["train", *TINY, *more, "--output", str(run), "--resume"]) == 0
    assert "epochs: 2" in (run / "config.yaml").read_text()


def test_resume_of_another_run_into_a_run_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for run in (first, second):
        assert main(["train", *TINY, "--epochs", "1", "--output", str(run)]) == 0
    before = {p.name: p.read_bytes() for p in second.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "2", "--output", str(second), "--resume", str(first)]) == 2
    assert "already holds another run's checkpoint" in _one_error_line(capsys)
    assert before == {p.name: p.read_bytes() for p in second.iterdir() if p.is_file()}


@pytest.mark.parametrize("output", ["file", "file/run"])
def test_output_that_is_a_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], output: str) -> None:
    (tmp_path / "file").write_text("keep")
    assert main(["train", *TINY, "--epochs", "1", "--output", str(tmp_path / output)]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)
    assert (tmp_path / "file").read_text() == "keep"


def test_eval_on_data_with_more_classes_than_the_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", *TINY, "--num-classes", "5", "--epochs", "1", "--output", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--json"]) == 0  # its own data, with its 5 classes
    assert len(json.loads(capsys.readouterr().out)["per_class"]) == 5
    assert main(["eval", "--checkpoint", str(run), "--data", "digits"]) == 2
    err = _one_error_line(capsys, "eval")
    assert "data 'digits' has 10 classes but the checkpoint" in err and "has num_classes=5" in err


def test_ctrl_c_during_start_up_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import convzoo.cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(convzoo.cli, "build_parser", interrupted)
    try:
        status = main(["train", "--list-recipes"])
    except KeyboardInterrupt:  # not let through: it would stop the whole pytest session
        pytest.fail("Ctrl-C during start-up escaped main() as a traceback")
    assert status == 130
    assert capsys.readouterr().err == "convzoo: interrupted\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-classes", "abc"], "argument --num-classes: expected an int or none, got 'abc'"),
        (["--image-size", "1.5"], "argument --image-size: expected an int or none, got '1.5'"),
        (["--ema", "x"], "argument --ema: expected a number, true or false, got 'x'"),
        (["--milestones", "1,,2"], "argument --milestones: expected comma-separated ints such as 82,123, got '1,,2'"),
        (["--milestones", "1,"], "argument --milestones: expected comma-separated ints"),
        (["--milestones", "a"], "argument --milestones: expected comma-separated ints"),
        (["--progress", "maybe"], "argument --progress: expected true or false, got 'maybe'"),
    ],
)
def test_flag_values_name_the_expected_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, "--output", str(tmp_path / "run"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"convzoo train: error: {message}")
    assert "_optional_int" not in err and "_float_or_bool" not in err and "_milestones" not in err


def test_milestones_flag_values() -> None:
    from convzoo.commands.train import _milestones

    assert _milestones("82, 123") == [82, 123] and _milestones("") == []


def test_ctrl_c_before_the_run_folder_is_written_says_to_start_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import convzoo.train.engine as engine

    prepare = engine.prepare_data

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "prepare_data", interrupted)  # Ctrl-C while the data loads
    argv = ["train", *TINY, "--epochs", "1", "--output", str(tmp_path / "run")]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err == "convzoo train: interrupted; nothing was trained yet: rerun the same command to start over\n"
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(engine, "prepare_data", prepare)
    assert main(argv) == 0
