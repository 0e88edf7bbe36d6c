"""``convzoo compare``: table files, skipping of unregistered kinds, reuse of finished runs; ``demo`` (slow)."""

from __future__ import annotations

import csv
import io
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


def test_compare_refuses_an_unknown_model_up_front(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", "--model", "nope", "--convs", "standard,doconv", *TINY, "--output", str(tmp_path / "c")]
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("convzoo compare: error: unknown model 'nope'") and len(err.splitlines()) == 1
    assert "'convzoo models' lists the zoo's models" in err
    assert "skipping" not in captured.out and not (tmp_path / "c").exists()
    assert main([*args[:2], "tv:nope", *args[3:]]) == 2
    assert "unknown torchvision model 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_and_deployed_outputs_match(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--convs", "standard,doconv", "--epochs", "2", "--output", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "deployed outputs match" in out and (tmp_path / "demo" / "compare.md").is_file()


def test_content_aware_rows_report_the_trained_models_effective_macs(tmp_path: Path) -> None:
    import torch

    from convzoo.models import create_model
    from convzoo.ops.cac import CAConv2d
    from convzoo.ops.cac_cost import cac_statistics
    from convzoo.train.compare import compare, table_rows

    options = dict(zip([a.removeprefix("--").replace("-", "_") for a in TINY[::2]], TINY[1::2], strict=True))
    options = {k: (v if k in ("data", "device") else False if v == "false" else int(v)) for k, v in options.items()}
    result = compare("test_tiny", ["standard", "cac"], output=tmp_path / "c", log=lambda _: None, **options)
    standard, cac = result.rows
    assert standard.effective_macs == [] and standard.trained_macs == standard.deployed_macs
    assert len(cac.effective_macs) == 1

    # the effective cost lies between the same network with every window smooth and every window sharp
    network = create_model("test_tiny", conv="cac").eval()
    images = [torch.randn(4, 3, 8, 8)]
    all_sharp = float(cac_statistics(network, images).image_macs.mean())
    with torch.no_grad():
        for layer in network.modules():
            if isinstance(layer, CAConv2d):
                layer.beta.fill_(-1e4)
    all_smooth = float(cac_statistics(network, images).image_macs.mean())
    assert all_smooth < all_sharp
    assert all_smooth <= cac.trained_macs <= all_sharp
    assert table_rows(result)[1][4] == f"{cac.trained_macs / 1e6:.2f}"


def _compare(out: Path, *extra: str) -> list[str]:
    return [
        "compare",
        "--model",
        "test_tiny",
        "--convs",
        "standard",
        "--seeds",
        "2",
        *TINY,
        "--output",
        str(out),
        *extra,
    ]


def test_ctrl_c_between_runs_then_rerun_trains_only_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import convzoo.train.compare as module

    train, calls = module.train, []

    def interrupted_on_the_second_run(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    monkeypatch.setattr(module, "train", interrupted_on_the_second_run)
    assert main(_compare(tmp_path / "c")) == 130
    err = capsys.readouterr().err
    assert err == "convzoo compare: interrupted; rerun the same command to continue (finished runs are reused)\n"
    assert main(_compare(tmp_path / "c")) == 0
    out = capsys.readouterr().out
    assert out.count("reusing finished run") == 1 and out.count("training test_tiny") == 1
    assert [r["seeds"] for r in csv.DictReader((tmp_path / "c" / "compare.csv").open())] == ["2"]
    assert not [p for p in (tmp_path / "c").rglob(".*.tmp")]


def test_stale_or_damaged_results_are_not_reused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c"
    args = _compare(out, "--epochs", "2")
    assert main(_compare(out)) == 0
    one_epoch = (out / "standard-s0" / "results.json").read_text()
    assert main(args) == 0  # resumed to 2 epochs
    table = (out / "compare.csv").read_text()
    # killed after the 2-epoch checkpoint, before its results.json: the 1-epoch results must not be reused
    (out / "standard-s0" / "results.json").write_text(one_epoch)
    (out / "standard-s1" / "results.json").write_text("")  # and a damaged one is re-created, not an error
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("training test_tiny") == 2
    assert [r["top1_per_seed"] for r in csv.DictReader((out / "compare.csv").open())] == [
        r["top1_per_seed"] for r in csv.DictReader(io.StringIO(table))
    ]


def test_runs_trained_with_other_settings_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c"
    assert main(_compare(out, "--epochs", "2")) == 0
    capsys.readouterr()
    assert main(_compare(out, "--epochs", "2", "--lr", "0.05")) == 2
    assert "c/standard-s0 holds a run with lr=0.1, not lr=0.05; pass another --output" in capsys.readouterr().err
    assert main(_compare(out)) == 2  # --epochs 1
    assert "holds a run trained for 2 epochs, more than epochs=1" in capsys.readouterr().err


def test_demo_resume_picks_the_latest_demo_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from convzoo.commands.demo import _resume_folder

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--resume"]) == 2
    assert "no demo run to resume" in capsys.readouterr().err
    for name in ("demo-20250101-090000", "demo-20250102-080000"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    assert _resume_folder("latest") == "runs/demo-20250102-080000"
    assert _resume_folder("runs/demo-20250101-090000") == "runs/demo-20250101-090000"
    assert _resume_folder(None) is None


def test_repeated_conv_kinds_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", "--model", "test_tiny", "--convs", "standard,doconv,standard", *TINY]
    assert main([*args, "--output", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "convzoo compare: error: convs must name each conv kind once, got 'standard,doconv,standard' "
        "(repeated: standard)"
    )
    assert not (tmp_path / "c").exists()


def test_compare_output_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("keep")
    args = ["compare", "--model", "test_tiny", "--convs", "standard", *TINY, "--output", str(tmp_path / "file")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "output" in err and "is a file, not a folder" in err and len(err.splitlines()) == 1
    assert (tmp_path / "file").read_text() == "keep"


def test_compare_refuses_a_run_cut_within_a_later_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from convzoo.train.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "c"
    assert main(_compare(out, "--seeds", "1", "--epochs", "2")) == 0
    path = out / "standard-s0" / "checkpoint.safetensors"
    checkpoint = load_checkpoint(path)  # as if stopped 1 step into epoch 3 of a longer run
    checkpoint.meta.update(step=1)
    save_checkpoint(path, checkpoint)
    capsys.readouterr()
    assert main(_compare(out, "--seeds", "1", "--epochs", "2")) == 2
    assert "holds a run trained for 2 epochs and 1 steps, more than epochs=2" in capsys.readouterr().err


def test_ctrl_c_while_evaluating_then_rerun_keeps_the_trained_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import convzoo.train.engine as engine
    from convzoo.train.checkpoint import load_checkpoint

    evaluate = engine.evaluate

    def interrupted(*args: object, **kwargs: object) -> object:
        raise KeyboardInterrupt

    out = tmp_path / "c"
    monkeypatch.setattr(engine, "evaluate", interrupted)
    assert main(_compare(out, "--seeds", "1")) == 130
    meta = load_checkpoint(out / "standard-s0" / "checkpoint.safetensors").meta
    assert (meta["epoch"], meta["evaluated"]) == (1, False)
    monkeypatch.setattr(engine, "evaluate", evaluate)
    capsys.readouterr()
    assert main(_compare(out, "--seeds", "1")) == 0
    assert "training test_tiny conv=standard seed=0" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "standard-s0" / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1"] and rows[0]["test_top1"] != ""
