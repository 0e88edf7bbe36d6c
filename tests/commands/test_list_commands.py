"""``convzoo convs`` and ``convzoo models``: glob patterns; a pattern matching nothing says so and exits 1."""

from __future__ import annotations

import pytest

from convzoo.cli import main


def test_patterns_list_the_matches(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "cifar_resnet2*"]) == 0
    assert "cifar_resnet20" in capsys.readouterr().out.split()
    assert main(["convs", "do*"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("doconv ") and captured.err == ""


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("models", "convzoo models: no model matches 'zz_nothing*'; 'convzoo models' lists them all"),
        ("convs", "convzoo convs: no conv kind matches 'zz_nothing*'; 'convzoo convs' lists them all"),
    ],
)
def test_a_pattern_matching_nothing_says_so(command: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "zz_nothing*"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == message


def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    """`convzoo train --list-recipes | head -1`: a closed pipe ends the command quietly, with status 1."""
    import subprocess
    import sys

    command = [
        sys.executable,
        "-c",
        "import sys; from convzoo.cli import main; sys.exit(main())",
        "train",
        "--list-recipes",
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        process.stdout.close()  # like `head` exiting: closed long before the child (importing torch) prints
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=120) == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr
