"""Checkpoints: nested training state round-trips through safetensors+JSON; writes are atomic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from convzoo.train.checkpoint import Checkpoint, flatten_state, load_checkpoint, save_checkpoint, unflatten_state


def test_optimizer_state_round_trip(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "tuple": (1, 2.5, None, "x")}
    path = save_checkpoint(tmp_path / "c.safetensors", Checkpoint(model.state_dict(), {"epoch": 2}, None, state))
    loaded = load_checkpoint(path)
    assert loaded.meta == {"epoch": 2} and loaded.ema is None
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model[key], value)
    restored = loaded.state["optimizer"]
    assert restored["param_groups"] == optimizer.state_dict()["param_groups"]
    for index, buffers in optimizer.state_dict()["state"].items():
        assert torch.equal(restored["state"][index]["momentum_buffer"], buffers["momentum_buffer"])
    assert torch.equal(loaded.state["rng"], state["rng"]) and loaded.state["tuple"] == (1, 2.5, None, "x")
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_flatten_refuses_arbitrary_objects() -> None:
    with pytest.raises(TypeError, match="cannot store a object"):
        flatten_state({"x": object()}, "s.", {})
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state({1: [torch.ones(2)]}, "s.", tensors)
    assert torch.equal(unflatten_state(skeleton, tensors)[1][0], torch.ones(2))


def test_loading_never_unpickles(tmp_path: Path) -> None:
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.ones(1)}, pickled)
    with pytest.raises(ValueError, match="not a readable safetensors checkpoint"):
        load_checkpoint(pickled)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_an_interrupted_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import convzoo.train.checkpoint as module

    path = save_checkpoint(tmp_path / "c.safetensors", Checkpoint({"w": torch.ones(2)}, {"epoch": 1}))

    def dies_half_way(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # Ctrl-C while the new checkpoint is being written

    monkeypatch.setattr(module, "save_file", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, Checkpoint({"w": torch.zeros(2)}, {"epoch": 2}))
    assert load_checkpoint(path).meta == {"epoch": 1} and [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_loading_reads_the_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run may replace its checkpoint while another process loads it: one read cannot mix two files."""
    path = save_checkpoint(tmp_path / "c.safetensors", Checkpoint({"w": torch.arange(3.0)}, {"epoch": 4}))
    reads = []
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or read_bytes(self))

    def second_open(*args, **kwargs):
        raise AssertionError("the file was opened a second time")

    monkeypatch.setattr(torch.UntypedStorage, "from_file", second_open)
    loaded = load_checkpoint(path)
    assert reads == [path] and loaded.meta == {"epoch": 4} and torch.equal(loaded.model["w"], torch.arange(3.0))
