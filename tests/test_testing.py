"""convzoo.testing: the helpers every fold / conversion equivalence test relies on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convzoo
from convzoo.ops.cac import cac_layers
from convzoo.ops.doconv import DOConv2d
from convzoo.testing import make_trained_like_, randomize_batchnorm_


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16, dtype=torch.float64)),
        nn.BatchNorm1d(5),
        nn.SyncBatchNorm(4),
    )


def _bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_randomize_batchnorm_moves_every_statistic_and_affine_parameter() -> None:
    # A no-op (or partial) randomize_batchnorm_ would make every BN-fold test pass on a fresh BN, which is
    # almost the identity: every entry of every BN must leave its initial value.
    model = _net()
    assert randomize_batchnorm_(model, generator=torch.Generator().manual_seed(0)) is model
    bns = _bns(model)
    assert len(bns) == 4
    for bn in bns:
        assert (bn.running_mean != 0).all(), bn
        assert (bn.running_var != 1).all() and (bn.running_var > 0).all(), bn
        assert (bn.weight != 1).all(), bn
        assert (bn.bias != 0).all(), bn
        assert bn.running_mean.std() > 0.05 and bn.weight.std() > 0.05  # random, not one constant
    assert bns[1].running_mean.dtype == torch.float64  # each BN keeps its dtype
    assert not torch.equal(bns[0].running_mean, bns[1].running_mean[:8].float())


def test_randomize_batchnorm_is_reproducible_with_a_generator_and_leaves_other_layers() -> None:
    a, b = _net(), _net()
    b.load_state_dict(a.state_dict())
    conv_weight = a[0].weight.clone()
    randomize_batchnorm_(a, generator=torch.Generator().manual_seed(3))
    randomize_batchnorm_(b, generator=torch.Generator().manual_seed(3))
    for name, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], value, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(a[0].weight, conv_weight, rtol=0, atol=0)


def test_randomize_batchnorm_without_affine_parameters() -> None:
    bn = nn.BatchNorm2d(6, affine=False)
    randomize_batchnorm_(bn)
    assert (bn.running_mean != 0).all() and (bn.running_var != 1).all()


def test_randomize_batchnorm_handles_bns_without_running_statistics_or_affine() -> None:
    model = nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False), nn.BatchNorm2d(3, affine=False))
    randomize_batchnorm_(model, generator=torch.Generator().manual_seed(0))
    assert (model[0].weight != 1).all() and model[0].running_mean is None
    assert (model[1].running_var != 1).all() and model[1].weight is None


def test_randomize_batchnorm_needs_a_module() -> None:
    with pytest.raises(TypeError, match="model must be an nn.Module, got NoneType"):
        randomize_batchnorm_(None)


@pytest.mark.parametrize("kind", ["doconv", "cac"])
def test_make_trained_like_moves_bn_d_prime_and_cac_masks(kind: str) -> None:
    x = torch.randn(2, 3, 16, 16)
    model = make_trained_like_(convzoo.create_model("cifar_resnet20", conv=kind), x, sharp_ratio=0.5)
    assert not model.training
    assert all((bn.running_mean != 0).all() for bn in _bns(model))
    if kind == "doconv":
        assert all(m.d_delta.abs().sum() > 0 for m in model.modules() if isinstance(m, DOConv2d))
    else:
        model(x)
        assert all(0.2 < float(layer.last_rho().mean()) < 0.8 for _, layer in cac_layers(model))
