"""convert(), deploy() and BatchNorm folding on convzoo, torchvision and timm models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convzoo
from convzoo import DOConv2d, conversion_report, convert, deploy, find_conv_bn_pairs, fold_batchnorm
from convzoo.testing import randomize_batchnorm_


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1)),
    )


def test_unknown_kind_lists_known_kinds() -> None:
    with pytest.raises(ValueError, match=r"unknown conv kind 'doconvv'; known kinds: .*doconv"):
        convert(small_net(), "doconvv")


def test_convert_replaces_kxk_and_reports_skips() -> None:
    model = convert(small_net(), "doconv")
    assert isinstance(model[0], DOConv2d) and isinstance(model[3][0], DOConv2d)
    assert type(model[3][1]) is nn.Conv2d
    report = conversion_report(model)
    assert [name for name, _ in report.replaced] == ["0", "3.0"]
    assert report.skipped == [("3.1", "1x1 kernel: no spatial patch")]
    assert "replaced" in str(report) and "3.1" in str(report)


def test_convert_copies_by_default_and_modifies_inplace_on_request() -> None:
    original = small_net()
    convert(original, "doconv")
    assert type(original[0]) is nn.Conv2d
    same = convert(original, "doconv", inplace=True)
    assert same is original and isinstance(original[0], DOConv2d)


def test_include_and_exclude_globs() -> None:
    model = convert(small_net(), "doconv", include="3.*")
    assert type(model[0]) is nn.Conv2d and isinstance(model[3][0], DOConv2d)
    assert ("0", "not matched by include") in conversion_report(model).skipped
    model = convert(small_net(), "doconv", exclude=["0"])
    assert type(model[0]) is nn.Conv2d and isinstance(model[3][0], DOConv2d)


def test_unmatched_pattern_warns_or_raises_when_strict() -> None:
    with pytest.warns(UserWarning, match=r"pattern 'layer9\.\*' matched no conv"):
        model = convert(small_net(), "doconv", exclude="layer9.*")
    assert conversion_report(model).unmatched_patterns == ["layer9.*"]
    with pytest.raises(ValueError, match="matched no conv"):
        convert(small_net(), "doconv", include="nothing", strict=True)


def test_converting_twice_is_idempotent() -> None:
    once = convert(small_net(), "doconv")
    with pytest.warns(UserWarning, match="no layer was replaced"):
        twice = convert(once, "doconv")
    report = conversion_report(twice)
    assert report.replaced == []
    assert ("0", "already a convzoo 'doconv' operator") in report.skipped
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(twice(x), once(x))


def test_keeps_training_mode_dtype_and_sharing() -> None:
    shared = nn.Conv2d(4, 4, 3, padding=1, dtype=torch.float64)
    model = nn.Sequential(shared, nn.ReLU(), shared).eval()
    converted = convert(model, "doconv")
    assert converted[0] is converted[2]
    assert not converted[0].training
    assert converted[0].W.dtype == torch.float64
    train_model = convert(nn.Sequential(nn.Conv2d(3, 3, 3)).train(), "doconv")
    assert train_model[0].training


def test_bare_conv_root_is_replaced() -> None:
    conv = nn.Conv2d(3, 4, 3)
    converted = convert(conv, "doconv")
    assert isinstance(converted, DOConv2d)
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(converted(x), conv(x))


def test_conv2d_subclasses_are_skipped_with_reason() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(timm_layers.Conv2dSame(3, 4, 3, stride=2))
    with pytest.warns(UserWarning):
        converted = convert(model, "doconv")
    assert "Conv2dSame is a subclass of nn.Conv2d" in conversion_report(converted).skipped[0][1]


def test_bad_argument_types() -> None:
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        convert("resnet", "doconv")
    with pytest.raises(TypeError, match="include must be a glob string"):
        convert(small_net(), "doconv", include=[1])
    with pytest.raises(TypeError, match="cannot convert '0' to 'doconv'.*d_mul"):
        convert(small_net(), "doconv", d_mul=2.5)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        deploy(None)


# --------------------------------------------------------------------- folding
def test_fold_batchnorm_only_where_the_conv_feeds_only_the_bn() -> None:
    class TwoUses(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
            self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            z = self.bn2(self.conv2(self.bn(y)))
            return z + y

    model = randomize_batchnorm_(TwoUses().double()).eval()
    assert find_conv_bn_pairs(model) == [("conv2", "bn2")]
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    expected = model(x)
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn2, nn.Identity) and isinstance(folded.bn, nn.BatchNorm2d)
    torch.testing.assert_close(folded(x), expected, rtol=1e-12, atol=1e-12)


def test_untraceable_model_falls_back_to_sequential_pairs() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.body(x)
            return self.body(-x)

    model = randomize_batchnorm_(Dynamic().double()).eval()
    with pytest.warns(UserWarning, match="could not fx-trace"):
        assert find_conv_bn_pairs(model) == [("body.0", "body.1")]


class ScaledConv(nn.Module):
    """A non-Conv2d module with its own exact BN fold, to test the fuse_batchnorm protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)

    def forward(self, x):
        return 2.0 * self.conv(x)

    def fuse_batchnorm(self, bn: nn.BatchNorm2d) -> nn.Module:
        scaled = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
        with torch.no_grad():
            scaled.weight.copy_(2.0 * self.conv.weight)
            scaled.bias.copy_(2.0 * self.conv.bias)
        return torch.nn.utils.fusion.fuse_conv_bn_eval(scaled.eval(), bn)


def test_modules_with_fuse_batchnorm_absorb_the_following_bn() -> None:
    model = nn.Sequential(ScaledConv(), nn.BatchNorm2d(4, dtype=torch.float64), nn.ReLU())
    randomize_batchnorm_(model).eval()
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    expected = model(x)
    deployed = deploy(model)
    assert type(deployed[0]) is nn.Conv2d and isinstance(deployed[1], nn.Identity)
    torch.testing.assert_close(deployed(x), expected, rtol=1e-12, atol=1e-12)


def test_bn_without_running_stats_is_not_folded() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3, track_running_stats=False)).eval()
    assert find_conv_bn_pairs(model) == []


def _no_trainable_forms(model: nn.Module) -> bool:
    return not any(isinstance(m, DOConv2d) for m in model.modules())


def _folded_bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


TORCHVISION_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "densenet121", "shufflenet_v2_x1_0"]


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_models_convert_and_deploy_exactly(name) -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.get_model(name, weights=None, num_classes=10).double()
    randomize_batchnorm_(model)
    model.eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        baseline = model(x)
        converted = convert(model, "doconv")
        torch.testing.assert_close(converted(x), baseline, rtol=1e-9, atol=1e-9)
        with torch.no_grad():
            for module in converted.modules():
                if isinstance(module, DOConv2d):
                    module.d_delta.normal_(0, 0.1)
        trained = converted(x)
        deployed = deploy(converted)
        torch.testing.assert_close(deployed(x), trained, rtol=1e-9, atol=1e-9)
    assert _no_trainable_forms(deployed)
    assert _folded_bn_count(deployed) < _folded_bn_count(converted)
    assert not deployed.training and converted.training is False


TIMM_MODELS = ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "regnetx_002", "convnext_atto"]


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_convert_and_deploy_exactly(name) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, num_classes=10).double()
    randomize_batchnorm_(model)
    model.eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        baseline = model(x)
        converted = convert(model, "doconv")
        assert conversion_report(converted).replaced
        torch.testing.assert_close(converted(x), baseline, rtol=1e-9, atol=1e-9)
        deployed = deploy(converted)
        torch.testing.assert_close(deployed(x), baseline, rtol=1e-9, atol=1e-9)
        timm_deployed = timm.utils.reparameterize_model(converted)
        torch.testing.assert_close(timm_deployed(x), baseline, rtol=1e-9, atol=1e-9)
    assert _no_trainable_forms(deployed) and _no_trainable_forms(timm_deployed)


def test_deployed_resnet_has_baseline_parameters_and_macs() -> None:
    from convzoo.profiling import count_macs, count_parameters

    baseline = deploy(convzoo.create_model("cifar_resnet20"))
    deployed = deploy(convzoo.create_model("cifar_resnet20", conv="doconv"))
    assert count_parameters(deployed) == count_parameters(baseline)
    assert count_macs(deployed) == count_macs(baseline)
    assert _folded_bn_count(deployed) == 0
