"""materialize(): one initialization, on the requested device and dtype, nothing left uninitialized."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convzoo
from convzoo.models.materialize import materialize, reject_zero_init_residual, reset_zoo_parameters_
from convzoo.models.registry import get_model_entry


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=True)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_zoo_parameters_(self, zero_init_last_bn=True, last_bn_names=("bn2",))


def test_materialized_model_is_fully_initialized_on_device_and_dtype() -> None:
    model = materialize(_Net, device="cpu", dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in model.parameters())
    assert model.bn2.num_batches_tracked.dtype == torch.long and model.bn2.num_batches_tracked == 0
    torch.testing.assert_close(model.bn2.running_mean, torch.zeros(8, dtype=torch.float64))
    torch.testing.assert_close(model.bn2.running_var, torch.ones(8, dtype=torch.float64))
    assert not model.bn2.weight.any() and not model.conv.bias.any()
    std = model.conv.weight.std().item()  # He fan-out: std = sqrt(2 / (8 * 9)) = 0.167
    assert 0.1 < std < 0.25
    assert model.fc.weight.abs().max() <= 1 / 8**0.5 + 1e-12  # torch's default Linear init bound


def test_a_module_with_tensors_and_no_reset_is_refused() -> None:
    class Raw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.raw = Raw()

        def reset_parameters(self) -> None:
            reset_zoo_parameters_(self)

    with pytest.raises(TypeError, match="Raw holds tensors but has no reset_parameters"):
        materialize(Net)


def test_errors() -> None:
    with pytest.raises(TypeError, match="must define reset_parameters"):
        materialize(lambda: nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="dtype must be a floating point dtype"):
        materialize(_Net, dtype=torch.int64)
    with pytest.raises(ValueError, match="zero_init_residual=True does not apply to net"):
        reject_zero_init_residual(True, "net")
    reject_zero_init_residual(False, "net")


def _zoo_models() -> list[str]:
    """convzoo's own models (other test modules register tiny test models in the same registry)."""
    return [n for n in convzoo.list_models() if get_model_entry(n).builder.__module__.startswith("convzoo.")]


@pytest.mark.parametrize("name", _zoo_models())
def test_every_zoo_model_takes_device_and_dtype(name: str) -> None:
    model = convzoo.create_model(name, device="cpu", dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in model.parameters())
    assert all(t.device.type == "cpu" for t in model.state_dict().values())


def test_place_rejects_a_non_floating_dtype() -> None:
    with pytest.raises(ValueError, match="floating point dtype, got torch.int64"):
        convzoo.create_model("cifar_resnet20", dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype, got 'float64'"):
        convzoo.create_model("cifar_resnet20", dtype="float64")
