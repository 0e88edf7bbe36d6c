"""CACSharpConv2d: an always-sharp CAC layer deploys to its plain conv and still counts as a CAC layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import convzoo
from convzoo.ops.cac import CAConv2d, cac_layers
from convzoo.ops.cac_cost import cac_statistics, calibrate_sharp_ratio_
from convzoo.ops.cac_sharp import CACSharpConv2d
from convzoo.ops.cac_sparse import CACSparseConv2d
from convzoo.profiling import profile_model
from convzoo.testing import randomize_batchnorm_

F64 = {"dtype": torch.float64}
TIGHT = {"rtol": 1e-12, "atol": 1e-12}


def _fresh_cac_model() -> nn.Module:
    """A just-converted CAC cifar_resnet20 (γ = 0, β = 1 everywhere: every layer always sharp)."""
    torch.manual_seed(0)
    model = convzoo.create_model("cifar_resnet20", conv="cac").double()
    randomize_batchnorm_(model)
    return model.eval()


def test_a_converted_model_deploys_to_plain_convs_with_cac_statistics() -> None:
    model = _fresh_cac_model()
    x = torch.randn(3, 3, 16, 16, **F64)
    with torch.no_grad():
        expected = model(x)
    deployed = convzoo.deploy(model)
    layers = cac_layers(deployed)
    assert len(layers) == 19 and all(isinstance(m, CACSharpConv2d) for _, m in layers)
    assert all(isinstance(m, nn.Conv2d) for _, m in layers)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())  # every BN folded
    with torch.no_grad():
        assert_close(deployed(x), expected, **TIGHT)
    # the statistics see the same layers, every window sharp, at the conv's cost (no score map runs)
    trained, folded = cac_statistics(model, [x]), cac_statistics(deployed, [x])
    assert list(folded.rho) == list(trained.rho) and set(folded.rho.values()) == {1.0}
    assert folded.baseline_macs == trained.baseline_macs
    assert_close(folded.image_macs, torch.full((3,), folded.baseline_macs, **F64))
    assert bool((trained.image_macs > folded.image_macs).all())  # the training form pays the score map


def test_profile_and_plot_masks_see_the_folded_layers(tmp_path) -> None:
    deployed = convzoo.deploy(_fresh_cac_model())
    report = profile_model(deployed, (3, 16, 16))
    assert report.cac is not None and report.cac.layers == 19 and report.cac.sharp_ratio == 1.0
    assert report.cac.effective_macs == report.cac.baseline_macs == report.macs
    from convzoo.viz import plot_masks

    path = plot_masks(deployed, torch.randn(3, 16, 16, **F64), tmp_path / "masks.png")
    assert path.stat().st_size > 0
    layer = cac_layers(deployed)[0][1]
    assert layer.last_mask.shape == (1, 16, 16) and bool(layer.last_mask.all())


def test_mixed_model_reports_every_layer() -> None:
    """Half the layers calibrated to ρ = 1 (always sharp), half data-dependent: all 19 stay in the statistics."""
    model = _fresh_cac_model()
    x = torch.randn(4, 3, 16, 16, **F64)
    calibrate_sharp_ratio_(model, x, [1.0 if index % 2 else 0.4 for index in range(19)])
    trained = cac_statistics(model, [x])
    deployed = convzoo.deploy(model)
    kinds = [type(m) for _, m in cac_layers(deployed)]
    assert kinds.count(CACSharpConv2d) == 9 and kinds.count(CACSparseConv2d) == 10
    for _, layer in cac_layers(deployed):
        if isinstance(layer, CACSparseConv2d):
            layer.threshold = 0.5  # no timing: the same outputs on either path
    folded = cac_statistics(deployed, [x])
    assert list(folded.rho) == list(trained.rho)
    # calibration puts β exactly at a window's G, so the last-bit differences of folded BatchNorms can flip
    # that one window (1/256 of a layer's windows here); the values must agree to a few windows
    folded_rho, trained_rho = torch.tensor(list(folded.rho.values())), torch.tensor(list(trained.rho.values()))
    assert_close(folded_rho, trained_rho, rtol=0, atol=0.01)
    assert profile_model(deployed, (3, 16, 16)).cac.layers == 19


@pytest.mark.parametrize("bias", [True, False])
def test_fuse_batchnorm_is_exact(bias: bool) -> None:
    cac = CAConv2d(4, 6, 3, stride=2, padding=1, bias=bias, padding_mode="reflect", **F64).eval()
    bn = randomize_batchnorm_(nn.BatchNorm2d(6, **F64)).eval()
    x = torch.randn(2, 4, 9, 8, **F64)
    fused = cac.fuse().fuse_batchnorm(bn)
    assert isinstance(fused, CACSharpConv2d) and fused.bias is not None and fused.padding_mode == "reflect"
    with torch.no_grad():
        assert_close(fused(x), bn(cac(x)), **TIGHT)


def test_state_dict_has_the_sparse_forms_keys_and_parameters_are_frozen() -> None:
    cac = CAConv2d(4, 6, 3, padding=1).eval()
    sharp, sparse = cac.fuse(), cac.fuse(fold_always_sharp=False)
    assert set(sharp.state_dict()) == set(sparse.state_dict()) == {"weight", "bias", "gamma", "beta"}
    sparse.load_state_dict(sharp.state_dict())  # a deployed checkpoint loads into either form
    assert not any(p.requires_grad for p in sharp.parameters())
    assert "always sharp" in repr(sharp)


def test_unbatched_input_and_errors() -> None:
    cac = CAConv2d(4, 6, 3, padding=1).eval()
    sharp = cac.fuse()
    x = torch.randn(4, 7, 5)
    with torch.no_grad():
        assert_close(sharp(x), cac(x.unsqueeze(0)).squeeze(0))
    assert sharp.last_mask.shape == (1, 7, 5)
    with pytest.raises(ValueError, match="CACSharpConv2d has in_channels=4, got an input with 3 channels"):
        sharp(torch.randn(1, 3, 7, 5))
    with pytest.raises(ValueError, match="needs gamma >= 0 and beta > 0"):
        CACSharpConv2d(cac.spec, cac.weight, cac.bias, torch.tensor(1.0), torch.tensor(-0.5))
    with pytest.raises(ValueError, match="weight must have shape"):
        CACSharpConv2d(cac.spec, torch.zeros(6, 4, 5, 5), None, cac.gamma, cac.beta)
    with pytest.raises(TypeError, match="spec must be a ConvSpec"):
        CACSharpConv2d("spec", cac.weight, cac.bias, cac.gamma, cac.beta)


def test_exports_as_a_plain_conv() -> None:
    deployed = convzoo.deploy(_fresh_cac_model().float())
    x = torch.randn(2, 3, 16, 16)
    exported = torch.export.export(deployed, (x,))
    with torch.no_grad():
        assert_close(exported.module()(x), deployed(x), rtol=1e-5, atol=1e-5)
