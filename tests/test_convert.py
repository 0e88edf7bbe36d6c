"""convert(), deploy() and BatchNorm folding on convzoo, torchvision and timm models."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import convzoo
from convzoo import (
    DOConv2d,
    conversion_report,
    convert,
    deploy,
    find_conv_bn_pairs,
    fold_batchnorm,
    reparameterize,
)
from convzoo.testing import make_trained_like_, randomize_batchnorm_


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


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda net: convert(net, "doconv", inplace="no"), "inplace must be a bool, got 'no'"),
        (lambda net: convert(net, "doconv", strict="yes"), "strict must be a bool, got 'yes'"),
        (lambda net: deploy(net, inplace="no"), "inplace must be a bool, got 'no'"),
        (lambda net: deploy(net, inplace=1), "inplace must be a bool, got 1"),
        (lambda net: deploy(net, fold_bn="false"), "fold_bn must be a bool, got 'false'"),
    ],
)
def test_flags_must_be_bools(call, match: str) -> None:
    # a truthy string such as 'no' used to flip the flag: convert(net, kind, inplace='no') mutated net
    net = small_net()
    with pytest.raises(TypeError, match=match):
        call(net)
    assert type(net[0]) is nn.Conv2d and isinstance(net[1], nn.BatchNorm2d) and net.training


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"include": 5}, "include must be a glob string or a list of glob strings, got 5"),
        ({"exclude": 5.0}, "exclude must be a glob string or a list of glob strings, got 5.0"),
        ({"layer_options": 5}, "layer_options must be callable, got 5"),
        (
            {"layer_options": lambda name, conv: [("d_mul", 9)]},
            r"layer_options\('0', conv\) must return a dict of options \(str keys\) or None, got \[\('d_mul', 9\)\]",
        ),
        ({"layer_options": lambda name, conv: {1: 2}}, r"layer_options\('0', conv\) must return a dict"),
    ],
)
def test_bad_patterns_and_layer_options(kwargs: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        convert(small_net(), "doconv", **kwargs)


def test_layer_options_may_return_none_or_a_dict() -> None:
    model = convert(small_net(), "doconv", layer_options=lambda name, conv: {"d_mul": 12} if name == "0" else None)
    assert model[0].d_mul == 12 and model[3][0].d_mul == 9


@pytest.mark.parametrize("function", [fold_batchnorm, find_conv_bn_pairs, reparameterize])
def test_folding_functions_need_a_module(function) -> None:
    with pytest.raises(TypeError, match="model must be an nn.Module, got NoneType"):
        function(None)


class BadFuse(nn.Module):
    def fuse(self) -> int:
        return 3


class FuseInPlace(nn.Module):
    """fuse() folding in place and returning self (as e.g. ultralytics models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.fused = False

    def forward(self, x):
        return self.body(x)

    def fuse(self) -> nn.Module:
        self.fused = True
        return self


def test_a_fuse_that_returns_no_module_is_named() -> None:
    with pytest.raises(TypeError, match=r"fuse\(\) of module 'body\.1' \(BadFuse\) returned 3, expected the nn.Module"):
        deploy(nn.ModuleDict({"body": nn.Sequential(nn.Conv2d(3, 3, 3), BadFuse())}))
    with pytest.raises(TypeError, match=r"fuse\(\) of the root module \(BadFuse\) returned 3"):
        reparameterize(BadFuse())


def test_a_fuse_that_returns_self_folds_in_place() -> None:
    model = randomize_batchnorm_(FuseInPlace().double()).eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    expected = model(x)
    deployed = deploy(model)
    assert deployed.fused and isinstance(deployed.body[1], nn.Identity)
    torch.testing.assert_close(deployed(x), expected, rtol=1e-12, atol=1e-12)


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


def _randomize_d_delta_(model: nn.Module, generator: torch.Generator) -> int:
    """Give every DOConv2d a trained-looking D' (D = I + D'); D' = 0 would hide a broken fold. Returns how many."""
    layers = [m for m in model.modules() if isinstance(m, DOConv2d)]
    with torch.no_grad():
        for layer in layers:
            layer.d_delta.copy_(0.1 * torch.randn(layer.d_delta.shape, generator=generator, dtype=torch.float64))
    return len(layers)


# timm model -> BatchNorm2d modules (timm's BatchNormAct2d included), all of which deploy folds.
TIMM_MODELS = {
    "resnet18": 20,
    "efficientnet_b0": 49,
    "mobilenetv3_small_100": 34,
    "regnetx_002": 44,
    "convnext_atto": 0,
}


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_timm_models_convert_and_deploy_exactly(name) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).double()
    randomize_batchnorm_(model)
    model.eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        baseline = model(x)
        converted = convert(model, "doconv")
        assert conversion_report(converted).replaced
        torch.testing.assert_close(converted(x), baseline, rtol=1e-9, atol=1e-9)  # D' = 0: the same function
        # A trained state: D' != 0 and fresh BN statistics, so a fold that drops either changes the output.
        assert _randomize_d_delta_(converted, generator) > 0
        randomize_batchnorm_(converted, generator=generator)
        trained = converted(x)
        assert not torch.allclose(trained, baseline, rtol=1e-3, atol=1e-3)
        deployed = deploy(converted)
        torch.testing.assert_close(deployed(x), trained, rtol=1e-10, atol=1e-10)
        timm_deployed = timm.utils.reparameterize_model(converted)
        torch.testing.assert_close(timm_deployed(x), trained, rtol=1e-10, atol=1e-10)
    assert _no_trainable_forms(deployed) and _no_trainable_forms(timm_deployed)
    assert _folded_bn_count(converted) == TIMM_MODELS[name]  # deploy() did not touch its input
    assert _folded_bn_count(deployed) == 0
    assert not deployed.training


def test_deployed_resnet_has_baseline_parameters_and_macs() -> None:
    from convzoo.profiling import count_macs, count_parameters

    baseline = deploy(convzoo.create_model("cifar_resnet20"))
    deployed = deploy(convzoo.create_model("cifar_resnet20", conv="doconv"))
    assert count_parameters(deployed) == count_parameters(baseline)
    assert count_macs(deployed) == count_macs(baseline)
    assert _folded_bn_count(deployed) == 0


REPARAMETERIZED = [
    ("cifar_resnet20", "doconv"),
    ("cifar_resnet20", "multiception"),
    ("cifar_resnet20", "dsconv"),
    ("cifar_resnet20", "mixconv"),
    ("cifar_resnet20", "cac"),
    ("cifar_mobilenetv2", "pyramid"),
    ("cifar_mobilenetv2", "dds"),
]


@pytest.mark.parametrize(("name", "kind"), REPARAMETERIZED, ids=[kind for _, kind in REPARAMETERIZED])
def test_timm_reparameterize_model_folds_every_kind_exactly(name: str, kind: str) -> None:
    """timm.utils.reparameterize_model understands every operator's fuse(), as convzoo.deploy() does."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model = make_trained_like_(convzoo.create_model(name, conv=kind, dtype=torch.float64), x)
    expected = model(x)
    folded = timm.utils.reparameterize_model(model)
    assert {type(m) for m in folded.modules()} != {type(m) for m in model.modules()}, "nothing was folded"
    torch.testing.assert_close(folded(x), expected, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------- devices and dtypes
def _kind_net(kind: str, **factory) -> nn.Module:
    """One layer of ``kind`` then BN and ReLU: (B, 8, H, W) -> (B, C, H, W). 5x5 kernels, so that the
    depthwise parts are wider than 3 and take the CPU fast paths (column-block weight gradients)."""
    if kind == "cpwc":
        conv = nn.Conv2d(8, 12, 1, bias=False, **factory)
    elif kind == "pyramid":
        conv = nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False, **factory)
    else:
        conv = nn.Conv2d(8, 12, 5, padding=2, bias=False, **factory)
    net = nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels, **factory), nn.ReLU())
    return convert(net, kind, strict=True)


@pytest.mark.parametrize("kind", list(convzoo.list_convs()))
def test_every_kind_trains_under_autocast(kind: str) -> None:
    """Forward and backward under torch.autocast (CPU bfloat16 here; CUDA float16 takes the same code):
    the output comes out in the autocast dtype and every float32 parameter gets a float32 gradient."""
    net = _kind_net(kind)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    assert y.dtype == torch.bfloat16  # CAC's straight-through term used to promote its output to float32
    y.float().square().mean().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    for name, parameter in net.named_parameters():
        if parameter.grad is not None:
            assert parameter.grad.dtype == torch.float32 and parameter.grad.isfinite().all(), name


@pytest.mark.parametrize("kind", list(convzoo.list_convs()))
def test_every_kind_runs_on_the_meta_device(kind: str) -> None:
    """Built on the meta device, every form runs there: a tensor made in forward or fuse() on another
    device (a CPU default, say, where CUDA is meant) would raise when mixed with the meta input."""
    net = _kind_net(kind, device="meta")
    x = torch.empty(2, 8, 9, 9, device="meta")
    assert net(x).device.type == "meta"
    assert net.eval()(x).device.type == "meta"
    deployed = deploy(net)
    assert {p.device.type for p in deployed.parameters()} == {"meta"}
    if kind != "cac":  # the sparse CAC form reads its sharp-window count on the host (one sync per call)
        assert deployed(x).device.type == "meta"


@pytest.mark.parametrize("kind", list(convzoo.list_convs()))
def test_every_kind_deploys_in_float16_with_float32_batchnorms(kind: str) -> None:
    """A half-precision model that keeps its BatchNorms in float32 (a common mixed set-up) deploys to
    float16 layers, as torch's fuse_conv_bn_eval does for nn.Conv2d, and computes what it computed."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float16)
    net = _kind_net(kind).half()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.float()
    make_trained_like_(net, x)
    with torch.no_grad():
        expected = net(x)
        deployed = deploy(net)
        y = deployed(x)
    assert y.dtype == torch.float16
    assert {p.dtype for p in deployed.parameters()} == {torch.float16}
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)


class _ConvBnReLU(nn.Module):
    def __init__(self, kind: str | None = None) -> None:
        super().__init__()
        conv = nn.Conv2d(4, 6, 1 if kind == "cpwc" else 3, padding=0 if kind == "cpwc" else 1, bias=False)
        self.conv = conv if kind is None else convert(conv, kind)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


@pytest.mark.parametrize("kind", [None, "cpwc", "cac"])
@pytest.mark.parametrize("container", ["sequential", "traced"])
def test_sync_batchnorm_folds_like_batchnorm(kind: str | None, container: str) -> None:
    """A model trained with SyncBatchNorm (``--sync-bn`` on CUDA) deploys with its BNs folded, into a plain
    conv and into the operators with fuse_batchnorm(); it used to keep every SyncBatchNorm unfolded."""
    torch.manual_seed(0)
    model = _ConvBnReLU(kind)
    if container == "sequential":
        model = nn.Sequential(model.conv, model.bn, model.act)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(randomize_batchnorm_(model)).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        expected = model(x)
        deployed = deploy(model)
        y = deployed(x)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deployed.modules())
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


FROZEN_CASES = {  # kind, the conv it replaces, parameters holding its kernel, parameters holding its bias
    "doconv": (lambda: nn.Conv2d(8, 16, 3, padding=1), {"W", "d_delta"}, {"bias"}),
    "cac": (lambda: nn.Conv2d(8, 16, 3, padding=1), {"weight"}, {"bias"}),
    "cpwc": (lambda: nn.Conv2d(8, 16, 1), {"weight"}, {"bias"}),
    "dds": (lambda: nn.Conv2d(8, 16, 3, padding=1), {"depthwise.weight", "pointwise.weight"}, {"pointwise.bias"}),
    "dds-depthwise": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), {"depthwise.weight"}, {"depthwise.bias"}),
    "pyramid": (
        lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8),
        {f"branches.{i}.weight" for i in range(3)},
        {f"branches.{i}.bias" for i in range(3)},
    ),
}


@pytest.mark.parametrize("case", sorted(FROZEN_CASES))
@pytest.mark.parametrize("frozen", ["all", "weight", "none"])
def test_a_frozen_conv_converts_to_a_frozen_layer(case: str, frozen: str) -> None:
    """The parameters holding the conv's kernel and bias keep its requires_grad flags (a frozen stem
    stays frozen; BitFit's trainable biases stay trainable); new parameters (CAC's γ, β, CPWC's
    context unit) stay trainable. DO-Conv's D' factors the kernel, so it follows the kernel's flag."""
    build, kernel_params, bias_params = FROZEN_CASES[case]
    conv = build()
    if frozen == "all":
        conv.requires_grad_(False)
    elif frozen == "weight":
        conv.weight.requires_grad_(False)
    model = convert(nn.Sequential(conv), case.split("-")[0])
    flags = {name.removeprefix("0."): p.requires_grad for name, p in model.named_parameters()}
    assert kernel_params | bias_params <= set(flags)
    for name, requires_grad in flags.items():
        if name in kernel_params:
            assert requires_grad is (frozen == "none"), name
        elif name in bias_params:
            assert requires_grad is (frozen != "all"), name
        else:
            assert requires_grad, name


class _FoldsItself(nn.Module):
    """A block that folds its own conv + BN from ``conv.weight`` (LeViT's ConvNorm, YOLO's ``fuse()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        return _fold_from_weight(self.conv, self.bn)


def _fold_from_weight(conv: nn.Module, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """What such a block does: a plain conv from the child's weight and geometry, BN folded."""
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    plain = plain.to(conv.weight.dtype).eval()
    with torch.no_grad():
        plain.weight.copy_(conv.weight)
    return torch.nn.utils.fusion.fuse_conv_bn_eval(plain, bn.eval())


@pytest.mark.parametrize("root", [True, False])
def test_convs_inside_a_block_that_folds_itself_convert_only_to_exact_weight_kinds(root: bool) -> None:
    """Such a block folds each child conv from its weight, dropping what CAC (or CPWC ...) adds: deploy
    used to give silently wrong outputs (timm RepVGG / MobileOne). convert() skips those kinds there and
    says why; DO-Conv, whose weight is its whole function, converts and folds exactly."""
    torch.manual_seed(0)
    model = (_FoldsItself() if root else nn.Sequential(_FoldsItself())).double()
    where = "the model (_FoldsItself, fuse())" if root else "'0' (_FoldsItself, fuse())"
    with pytest.warns(UserWarning, match="no layer was replaced"):
        skipped = convert(model, "cac")
    assert conversion_report(skipped).skipped == [
        (
            "conv" if root else "0.conv",
            f"inside {where}, which folds its convs from their weight (dropping what 'cac' adds)",
        )
    ]
    converted = make_trained_like_(convert(model, "doconv"), torch.randn(2, 4, 7, 7, dtype=torch.float64))
    assert conversion_report(converted).replaced
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = converted(x)
        torch.testing.assert_close(deploy(converted)(x), expected, rtol=1e-10, atol=1e-10)


def test_operators_inside_a_block_that_folds_itself_are_folded_first() -> None:
    """timm's RepGhostModule asserts its convs are nn.Conv2d when it reparameterizes: deploy() folds the DO-Conv
    layers inside it into nn.Conv2d first (exact), then lets the block fold them."""
    from timm.models.repghost import RepGhostModule

    torch.manual_seed(0)
    block = make_trained_like_(RepGhostModule(8, 16, reparam=True).double().eval(), torch.randn(2, 8, 7, 7).double())
    converted = convert(block, "doconv")
    assert [name for name, _ in conversion_report(converted).replaced] == ["cheap_operation.0"]
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = converted(x)
        deployed = deploy(converted)
        torch.testing.assert_close(deployed(x), expected, rtol=1e-10, atol=1e-10)
    assert not any(isinstance(module, convzoo.DOConv2d) for module in deployed.modules())
    assert [name for name, _ in deployed.named_children()] == ["primary_conv", "cheap_operation", "relu"]  # folded


def test_deploy_refuses_a_block_that_would_fold_an_operator_as_a_plain_conv() -> None:
    """A hand-built model (no convert() to skip it): timm's RepVGG block around a CPWC operator."""
    from timm.models.byobnet import RepVggBlock

    block = RepVggBlock(8, 8).eval()
    block.conv_1x1.conv = convzoo.CPWConv2d.from_conv(block.conv_1x1.conv)
    with pytest.raises(
        ValueError,
        match=r"deploy: module '0' \(RepVggBlock\) folds its own convs with reparameterize\(\) from their weight, "
        r"which would drop what the convzoo 'cpwc' operator at '0.conv_1x1.conv'",
    ):
        deploy(nn.Sequential(block))


@pytest.mark.parametrize(
    ("kind", "model", "reason"),
    [
        (
            "mixconv",
            lambda: nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)),
            "cannot replace 1->16 k3x3 s1 g1 by a MixConv: in_channels=1 < 3 kernels (3, 5, 7)",
        ),
        (
            "pyramid",
            lambda: nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, groups=2), nn.Conv2d(8, 8, 3, padding=1, groups=8)),
            "pyramid cannot replace 2->2 k3x3 s1 g2: 2 channels < 3 dilations (1, 2, 3)",
        ),
        ("cpwc", lambda: nn.Sequential(nn.Conv2d(8, 8, 1, padding=1), nn.Conv2d(8, 8, 1)), "padded pointwise conv"),
    ],
)
def test_a_conv_the_kind_cannot_build_is_skipped_not_fatal(kind: str, model, reason: str) -> None:
    """A grayscale stem (1 channel for MixConv's 3 kernels), a 2-channel depthwise conv for the pyramid's 3
    dilations, a padded 1x1 for CPWC: each used to abort the whole conversion."""
    converted = convert(model(), kind)
    report = conversion_report(converted)
    assert [name for name, _ in report.replaced] == ["1"]
    assert report.skipped[0][0] == "0" and report.skipped[0][1].startswith(reason)
    with pytest.raises(convzoo.ConvNotReplaceableError):
        convzoo.get_conv_kind(kind).from_conv(model()[0])  # direct callers still get a ValueError


def test_an_option_error_still_fails_the_conversion() -> None:
    with pytest.raises(ValueError, match=r"cannot convert '0' to 'mixconv': kernels must be odd positive ints"):
        convert(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)), "mixconv", kernels=(2,))


@pytest.mark.parametrize("kind", ["doconv", "cac", "dsconv", "multiception", "dds"])
def test_hooks_on_a_replaced_conv_and_a_folded_bn_keep_firing(kind: str) -> None:
    """Activation capture by hooks (timm FeatureHooks, profilers) used to stop silently after convert() and
    deploy(). The BN's hook moves to what stands in for it, which outputs what the BN output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).double()
    fired: list[str] = []
    captured: dict[str, torch.Tensor] = {}
    model[0].register_forward_pre_hook(lambda module, args: fired.append("conv pre"))
    model[0].register_forward_hook(lambda module, args, out: fired.append("conv"))
    model[1].register_forward_hook(lambda module, args, out: captured.__setitem__("bn", out))
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    converted = make_trained_like_(convert(model, kind), x)
    fired.clear()
    with torch.no_grad():
        converted(x)
    assert fired == ["conv pre", "conv"]
    expected = captured["bn"]
    deployed = deploy(converted)
    fired.clear()
    with torch.no_grad():
        deployed(x)
    assert fired == ["conv pre", "conv"]
    torch.testing.assert_close(captured["bn"], expected, rtol=1e-10, atol=1e-10)


def test_a_child_or_attribute_named_fuse_is_not_a_folding_block() -> None:
    """Segmentation nets name feature-fusion layers ``fuse``: only a method of the class counts (every conv
    of such a model used to be skipped, and deploy() called the child module with no input)."""

    class FusionHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(4, 4, 3, padding=1)
            self.fuse = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fuse(self.stem(x))

    converted = convert(FusionHead(), "cac")
    assert [name for name, _ in conversion_report(converted).replaced] == ["stem", "fuse"]
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(deploy(converted)(x), converted.eval()(x))


def test_a_conv_shared_inside_and_outside_a_folding_block_stays_shared() -> None:
    model = nn.Sequential(nn.Identity(), _FoldsItself())
    model[0] = model[1].conv  # the same conv in two slots, one inside the folding block
    with pytest.warns(UserWarning, match="no layer was replaced"):
        converted = convert(model, "cac")
    assert converted[0] is converted[1].conv and type(converted[0]) is nn.Conv2d
    assert {name for name, _ in conversion_report(converted).skipped} == {"0", "1.conv"}


def test_user_hooks_do_not_run_while_deploy_traces_the_model() -> None:
    """deploy() finds conv-BN pairs with an fx trace: a hook carried onto a traced container ran on proxies
    there, and one that cannot (a finiteness check) made the trace fail, so no BN was folded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)).double()
    seen: list[type] = []

    def finite(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen.append(type(out))
        if not torch.isfinite(out).all():
            raise FloatingPointError("non-finite activation")

    model[0].register_forward_hook(finite)
    converted = make_trained_like_(convert(model, "dsconv"), torch.randn(2, 4, 7, 7, dtype=torch.float64))
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deployed = deploy(converted)
    assert seen == [] and not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), converted(x), rtol=1e-10, atol=1e-10)
    assert seen == [torch.Tensor, torch.Tensor]


def test_a_bad_pyramid_option_is_an_error_even_where_every_conv_is_narrow() -> None:
    with pytest.raises(ValueError, match="dilations must be an int >= 1, got 0"):
        convert(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, groups=2)), "pyramid", dilations=(1, 0, 2))
