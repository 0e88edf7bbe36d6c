"""CAC cost (eq. 17), CACLoss (eq. 13), statistics and calibration."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import convzoo
from convzoo.models.cifar_resnet import CifarResNet
from convzoo.ops.cac import CAConv2d, cac_layers
from convzoo.ops.cac_cost import (
    CACLoss,
    CACStatistics,
    baseline_layer_cost,
    cac_statistics,
    calibrate_sharp_ratio_,
    layer_cost,
)

F64 = {"dtype": torch.float64}


def _model() -> nn.Module:
    """conv3x3 (CAC) -> ReLU -> conv1x1 -> pool -> linear, in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    ).double()
    return convzoo.convert(model, "cac")


def test_layer_cost_follows_eq_17() -> None:
    layer = CAConv2d(4, 6, 3, padding=1, groups=2, **F64)
    layer.beta.data.fill_(-1.0)  # every window smooth
    layer(torch.randn(2, 4, 5, 7, **F64))
    positions, kxk, one = 35, 6 * 2 * 9, 6 * 2
    assert float(layer_cost(layer).detach()) == positions * (one + 13)
    assert baseline_layer_cost(layer) == positions * kxk
    layer.beta.data.fill_(1.0)
    layer(torch.randn(2, 4, 5, 7, **F64))
    assert float(layer_cost(layer).detach()) == positions * (kxk + 13)


def test_cost_ratio_counts_the_other_layers_and_the_score_map() -> None:
    model = _model()
    loss = CACLoss(model, lam=0.3)
    model(torch.randn(2, 3, 6, 6, **F64))
    kxk = 36 * 8 * 3 * 9
    other = 36 * 4 * 8 + 5 * 4
    expected = (kxk + 36 * 13 + other) / (kxk + other)  # ρ = 1 at initialization
    assert_close(loss.cost_ratio(), torch.tensor(expected, **F64), rtol=1e-14, atol=0)


def test_lambda_zero_gives_the_task_loss() -> None:
    model = _model()
    loss = CACLoss(model, lam=0)
    model(torch.randn(2, 3, 6, 6, **F64))
    task = torch.tensor(1.2345, **F64, requires_grad=True)
    assert torch.equal(loss(task), task)
    assert loss.last_ratio is not None


def test_loss_is_task_loss_times_ratio_power_lambda_and_rises_with_rho() -> None:
    model = _model()
    layer = cac_layers(model)[0][1]
    loss = CACLoss(model, lam=0.3)
    x = torch.randn(2, 3, 6, 6, **F64)
    ratios, losses = [], []
    for target in (0.0, 0.25, 0.5, 1.0):
        calibrate_sharp_ratio_(model, x, target)
        model.train()
        model(x)
        ratios.append(float(loss.cost_ratio().detach()))
        task = torch.tensor(2.0, **F64)
        losses.append(float(loss(task).detach()))
        assert losses[-1] == pytest.approx(2.0 * ratios[-1] ** 0.3, rel=1e-14)
        assert float(layer.last_rho().mean()) == pytest.approx(target, abs=0.05)
    assert ratios == sorted(ratios) and len(set(ratios)) == 4
    assert losses == sorted(losses)


def test_cost_gradient_reaches_gamma_and_beta() -> None:
    model = _model()
    x = torch.randn(2, 3, 6, 6, **F64)
    calibrate_sharp_ratio_(model, x, 0.5)
    model.train()
    loss = CACLoss(model, lam=1.0)
    model(x)
    loss(torch.tensor(1.0, **F64)).backward()  # constant task loss: only the cost has a gradient
    layer = cac_layers(model)[0][1]
    assert float(layer.beta.grad) > 0 and float(layer.gamma.grad) > 0  # cost falls as β or γ falls
    assert layer.weight.grad is None


def test_statistics_average_rho_over_images_and_count_macs_per_image() -> None:
    model = _model()
    x = torch.randn(6, 3, 6, 6, **F64)
    x[:3] = x[:3].mean((2, 3), keepdim=True)  # flat images: only the zero-padded border is sharp
    calibrate_sharp_ratio_(model, x, 0.5)
    stats = cac_statistics(model, [(x[:4], None), x[4:]])
    model.eval()
    model(x)
    layer = cac_layers(model)[0][1]
    assert stats.rho == {"0": pytest.approx(float(layer.last_rho().mean()), rel=1e-14)}
    kxk, one, other = 8 * 3 * 9, 8 * 3, 36 * 4 * 8 + 5 * 4
    rho = layer.last_rho()
    assert_close(stats.image_macs, 36 * (rho * kxk + (1 - rho) * one + 13) + other, rtol=1e-14, atol=0)
    assert stats.image_macs[:3].max() < stats.image_macs[3:].min()  # compute follows content
    assert stats.baseline_macs == 36 * kxk + other
    assert 0 < stats.mean_ratio < 1
    assert "effective MACs/image" in stats.table()
    deployed = cac_statistics(convzoo.deploy(model, fold_bn=False), [x])
    assert_close(deployed.image_macs, stats.image_macs, rtol=1e-14, atol=0)


def test_statistics_on_a_cifar_resnet_have_one_rho_per_cac_layer() -> None:
    model = convzoo.convert(CifarResNet(1), "cac")
    stats = cac_statistics(model, [torch.randn(2, 3, 8, 8)], max_batches=1)
    assert isinstance(stats, CACStatistics) and len(stats.rho) == 7
    assert all(r == 1.0 for r in stats.rho.values())


def test_layers_copy_and_pickle_after_a_training_forward() -> None:
    model = _model().train()
    CACLoss(model)(model(torch.randn(2, 3, 6, 6, **F64)).sum())
    assert cac_layers(model)[0][1].last_rho_ste is not None
    clone = copy.deepcopy(model)
    assert cac_layers(clone)[0][1].last_rho_ste is None
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert cac_layers(torch.load(buffer, weights_only=False))[0][1].last_rho_ste is None


def test_a_model_watched_by_a_loss_deploys_and_its_copies_do_not_report() -> None:
    """deploy() copies layers (BN folding deep-copies each conv): the loss's hooks must not break that,
    and a copy's calls must not change the cost of the model the loss watches."""
    model = convzoo.create_model("cifar_resnet20", conv="cac").double()
    criterion = CACLoss(model)
    criterion(model(torch.randn(2, 3, 16, 16, **F64)).sum())
    ratio = float(criterion.cost_ratio().detach())
    deployed = convzoo.deploy(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        deployed(torch.randn(1, 3, 8, 8, **F64))
        clone(torch.randn(1, 3, 8, 8, **F64))
    assert float(criterion.cost_ratio().detach()) == ratio
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())


def test_has_cac_layers_is_exported() -> None:
    assert convzoo.has_cac_layers(_model())
    assert not convzoo.has_cac_layers(nn.Conv2d(3, 3, 3))


# ---------------------------------------------------------------------------- errors
def test_loss_needs_a_model_with_cac_layers() -> None:
    with pytest.raises(ValueError, match="model Sequential has no CAC layer"):
        CACLoss(nn.Sequential(nn.Conv2d(3, 3, 3)))
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        CACLoss("resnet")


@pytest.mark.parametrize("lam", [-0.1, float("nan"), float("inf"), -float("inf"), "0.3", True, None])
def test_lambda_must_be_finite_and_non_negative(lam: object) -> None:
    with pytest.raises(ValueError, match=f"lam must be a finite real number >= 0, got {lam!r}"):
        CACLoss(_model(), lam=lam)


def test_a_large_finite_lambda_is_accepted() -> None:
    # Documented: any finite lambda is allowed; ratio ** lambda then overflows or underflows in float32.
    assert CACLoss(_model(), lam=1e6).lam == 1e6


def test_loss_before_a_forward_and_with_a_non_tensor() -> None:
    loss = CACLoss(_model())
    with pytest.raises(RuntimeError, match="has not been run yet"):
        loss(torch.tensor(1.0))
    with pytest.raises(TypeError, match="task_loss must be a Tensor, got float"):
        loss(1.0)


def test_remove_detaches_the_hooks() -> None:
    model = _model()
    loss = CACLoss(model)
    loss.remove()
    assert not any(m._forward_hooks for m in model.modules())


def test_statistics_errors() -> None:
    model = _model()
    with pytest.raises(ValueError, match="max_batches must be a positive int or None, got 0"):
        cac_statistics(model, [torch.randn(1, 3, 4, 4, **F64)], max_batches=0)
    with pytest.raises(
        TypeError, match=r"each batch must be a Tensor \(B, C, H, W\) or a tuple/list starting with one"
    ):
        cac_statistics(model, [{"x": 1}])
    with pytest.raises(ValueError, match="data yielded no batch"):
        cac_statistics(model, [])
    with pytest.raises(ValueError, match="max_batches must be a positive int or None, got True"):
        cac_statistics(model, [torch.randn(1, 3, 4, 4, **F64)], max_batches=True)


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (None, TypeError, r"data must be an iterable of batches \(e.g. \[x\] or a DataLoader\), got None"),
        (5, TypeError, "data must be an iterable of batches .*got 5"),
        (
            torch.randn(2, 3, 4, 4, **F64),
            TypeError,
            r"got a single Tensor of shape \(2, 3, 4, 4\); wrap one batch in a list: cac_statistics\(model, \[x\]\)",
        ),
        ([[]], TypeError, r"each batch must be a Tensor \(B, C, H, W\) or a tuple/list starting with one, got \[\]"),
        ([()], TypeError, r"each batch must be a Tensor .*got \(\) \(batch 0\)"),
        (
            [torch.randn(1, 3, 4, 4, **F64), torch.randn(3, 4, 4, **F64)],
            ValueError,
            r"each batch must hold a 4-D input \(B, C, H, W\), got shape \(3, 4, 4\) \(batch 1\)",
        ),
    ],
)
def test_statistics_data_must_be_an_iterable_of_4d_batches(data: object, error: type[Exception], match: str) -> None:
    model = _model()
    with pytest.raises(error, match=match):
        cac_statistics(model, data)
    assert model.training  # mode restored even when a batch is refused


def test_calibration_errors() -> None:
    model = _model()
    x = torch.randn(1, 3, 4, 4, **F64)
    with pytest.raises(ValueError, match=r"rho must be a ratio in \[0, 1\] or 1 of them"):
        calibrate_sharp_ratio_(model, x, 1.5)
    with pytest.raises(ValueError, match=r"rho must be a ratio in \[0, 1\] or 1 of them"):
        calibrate_sharp_ratio_(model, x, [0.5, 0.5])


def test_loss_does_not_read_the_ratio_out_of_the_device() -> None:
    """``float(ratio)`` in forward synced the device on every training step; ``last_ratio`` is read on
    demand. On the meta device any read-out raises, so the step itself must do none."""
    with torch.device("meta"):
        model = convzoo.convert(CifarResNet(1, 4), "cac")
    loss = CACLoss(model, lam=0.3)
    task = model(torch.empty(2, 3, 8, 8, device="meta")).sum()
    assert loss(task).device.type == "meta"
    cpu_model = _model()
    cpu_loss = CACLoss(cpu_model, lam=0.3)
    assert cpu_loss.last_ratio is None
    cpu_model(torch.randn(2, 3, 6, 6, **F64))
    cpu_loss(torch.tensor(1.0, **F64))
    assert isinstance(cpu_loss.last_ratio, float)
    assert cpu_loss.last_ratio == float(cpu_loss.cost_ratio().detach())


# ---------------------------------------------------------------------------- images of different sizes
def _baseline(side: int) -> int:
    """MACs per image of ``_model()`` with its standard conv at side x side."""
    positions = side * side
    return positions * (8 * 3 * 9 + 4 * 8) + 5 * 4


def test_statistics_compare_each_image_with_the_baseline_at_its_own_size() -> None:
    model = _model()  # just converted: ρ = 1, so each image costs its baseline plus the score map
    big, small = torch.randn(1, 3, 8, 8, **F64), torch.randn(2, 3, 4, 4, **F64)
    stats = cac_statistics(model, [big, small])
    baselines = torch.tensor([_baseline(8), _baseline(4), _baseline(4)], **F64)
    assert_close(stats.image_baseline_macs, baselines, rtol=0, atol=0)
    score = torch.tensor([64 * 13, 16 * 13, 16 * 13], **F64)
    assert_close(stats.image_macs, baselines + score, rtol=1e-14, atol=0)
    assert stats.baseline_macs == pytest.approx(float(baselines.mean()), rel=1e-14)
    assert stats.mean_ratio == pytest.approx(float((baselines + score).sum() / baselines.sum()), rel=1e-14)
    assert 1 < stats.mean_ratio < 1.1
    reordered = cac_statistics(model, [small, big])
    assert reordered.mean_ratio == pytest.approx(stats.mean_ratio, rel=1e-14)  # order does not matter
    summary = stats.table().splitlines()[-1]
    assert f"standard convs mean {float(baselines.mean()) / 1e6:.2f}M" in summary


def test_table_says_more_when_the_cost_went_up() -> None:
    stats = cac_statistics(_model(), [torch.randn(2, 3, 6, 6, **F64)])  # ρ = 1: the score map costs extra
    assert stats.mean_ratio > 1
    summary = stats.table().splitlines()[-1]
    assert summary.endswith(f"({100 * (stats.mean_ratio - 1):.1f}% more)") and "fewer" not in summary
    assert "-" not in summary


def test_statistics_result_checks_its_fields() -> None:
    macs = torch.ones(2, **F64)
    with pytest.raises(TypeError, match=r"image_baseline_macs must be a non-empty 1-d tensor \(N,\), got 5.0"):
        CACStatistics({"a": 1.0}, macs, 5.0)
    with pytest.raises(ValueError, match=r"one entry per image, got shapes \(2,\) and \(3,\)"):
        CACStatistics({"a": 1.0}, macs, torch.ones(3, **F64))


# ---------------------------------------------------------------------------- empty and unbatched inputs
def test_statistics_skip_empty_batches() -> None:
    model = _model()
    x = torch.randn(3, 3, 6, 6, **F64)
    expected = cac_statistics(model, [x])
    stats = cac_statistics(model, [x[:0], (x, None), torch.empty(0, 3, 9, 9, **F64)])
    assert stats.rho == expected.rho
    assert_close(stats.image_macs, expected.image_macs, rtol=0, atol=0)
    assert_close(stats.image_baseline_macs, expected.image_baseline_macs, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"data yielded no image \(2 empty batches\)"):
        cac_statistics(model, [x[:0], x[:0]])


def test_loss_costs_an_unbatched_input_as_a_batch_of_one() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 3, padding=1)).double()
    model = convzoo.convert(model, "cac", include=["1"])
    loss = CACLoss(model, lam=1.0)
    x = torch.randn(3, 8, 8, **F64)
    model(x.unsqueeze(0))
    batched = loss.cost_ratio().detach()
    model(x)
    assert loss._plain.total == 16 * 3 * 64  # the 1x1 conv's MACs for one image
    assert_close(loss.cost_ratio().detach(), batched, rtol=1e-14, atol=0)
    plain, kxk = 16 * 3 * 64, 64 * 16 * 16 * 9
    expected = torch.tensor((plain + kxk + 64 * 13) / (plain + kxk), **F64)  # ρ = 1 at initialization
    assert_close(batched, expected, rtol=1e-14, atol=0)


def test_loss_after_a_forward_on_an_empty_batch_is_the_task_loss() -> None:
    model = _model().train()
    loss = CACLoss(model, lam=0.3)
    model(torch.randn(2, 3, 6, 6, **F64))
    loss(torch.tensor(1.0, **F64))
    ratio = loss.last_ratio
    model(torch.randn(0, 3, 6, 6, **F64))  # the hooks must not divide by the empty batch
    task = torch.tensor(0.0, **F64, requires_grad=True)
    assert loss(task) is task  # no image, no cost: the batch contributes only its task loss
    assert loss.last_ratio == ratio
    with pytest.raises(ValueError, match=r"most recent call ran on an empty batch \(B = 0\)"):
        loss.cost_ratio()


def test_loss_refuses_a_non_scalar_task_loss() -> None:
    model = _model()
    loss = CACLoss(model)
    model(torch.randn(2, 3, 6, 6, **F64))
    with pytest.raises(ValueError, match=r"task_loss must be a scalar \(0-d\) tensor, got shape \(2,\); reduce it"):
        loss(torch.ones(2, **F64))
    with pytest.raises(ValueError, match=r"got shape \(1,\)"):
        loss(torch.ones(1, **F64))


# ---------------------------------------------------------------------------- dtype, device, meta
def test_statistics_cast_inputs_to_the_model_dtype() -> None:
    model = _model()  # float64
    x = torch.randn(2, 3, 6, 6)  # what a float32 DataLoader yields
    stats = cac_statistics(model, [x])
    expected = cac_statistics(model, [x.double()])
    assert_close(stats.image_macs, expected.image_macs, rtol=0, atol=0)
    assert stats.rho == expected.rho


@pytest.mark.parametrize(
    ("device", "error", "match"),
    [
        ("gpu", ValueError, r"device must be a torch.device, a device string such as 'cpu' or 'cuda:0', or None"),
        (3.5, TypeError, r"device must be a torch.device, .* got 3.5"),
        ("meta", ValueError, r"cac_statistics needs real data, but device='meta'"),
    ],
)
def test_statistics_device_errors(device: object, error: type[Exception], match: str) -> None:
    model = _model()
    with pytest.raises(error, match=match):
        cac_statistics(model, [torch.randn(1, 3, 4, 4, **F64)], device=device)
    assert model.training


def test_statistics_refuse_integer_images() -> None:
    with pytest.raises(TypeError, match=r"each batch must hold a floating-point input, got torch.uint8 \(batch 0\)"):
        cac_statistics(_model(), [torch.zeros(1, 3, 4, 4, dtype=torch.uint8)])


def test_statistics_refuse_a_model_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = convzoo.convert(CifarResNet(1, 4), "cac")
    with pytest.raises(ValueError, match="cac_statistics needs real data, but CifarResNet is on the meta device"):
        cac_statistics(model, [torch.randn(1, 3, 8, 8)])
