"""Shake-Shake: the autograd function, train/eval mixing, counts vs Gastaldi, deploy, errors."""

from __future__ import annotations

import warnings

import pytest
import torch

import convzoo
from convzoo.models.cifar_shakeshake import CifarShakeShake, ShakeBlock, ShakeShakeFunction, shake_shake
from convzoo.profiling import count_parameters
from convzoo.testing import randomize_batchnorm_


def test_forward_and_backward_use_independent_coefficients() -> None:
    x1 = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64).view(3, 1, 1, 1)
    beta = torch.tensor([0.7, 0.2, 0.4], dtype=torch.float64).view(3, 1, 1, 1)
    out = ShakeShakeFunction.apply(x1, x2, alpha, beta)
    torch.testing.assert_close(out, alpha * x1 + (1 - alpha) * x2, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x1.grad, beta * grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x2.grad, (1 - beta) * grad, rtol=1e-12, atol=1e-12)


def test_training_shakes_per_image_and_eval_averages() -> None:
    x1, x2 = torch.zeros(64, 1, 2, 2), torch.ones(64, 1, 2, 2)
    torch.testing.assert_close(shake_shake(x1, x2, training=False), torch.full_like(x1, 0.5))
    mixed = shake_shake(x1, x2, training=True, generator=torch.Generator().manual_seed(0))
    per_image = mixed[:, 0, 0, 0]
    assert (mixed == per_image.view(-1, 1, 1, 1)).all()  # one coefficient per image
    assert per_image.min() >= 0 and per_image.max() <= 1 and per_image.std() > 0.1


def test_block_in_eval_mode_is_the_mean_of_the_branches_plus_shortcut() -> None:
    block = ShakeBlock(4, 8, 2).double().eval()
    randomize_batchnorm_(block)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    expected = (block.branch1(x) + block.branch2(x)) / 2 + block.downsample(x)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
    # shortcut: ReLU, 1x1/2 convs on the even and the one-pixel-shifted grid, concatenated, BN
    r = torch.relu(x)
    shifted = torch.nn.functional.pad(r[:, :, 1:, 1:], (0, 1, 0, 1))
    cat = torch.cat((block.downsample.conv1(r), block.downsample.conv2(shifted)), 1)
    torch.testing.assert_close(block.downsample(x), block.downsample.bn(cat), rtol=1e-12, atol=1e-12)


def test_parameters_match_hand_formula_and_gastaldi() -> None:
    model = convzoo.create_model("cifar_shakeshake26_2x96d")
    params, channels = 3 * 16 * 9 + 2 * 16, 16
    for width in (96, 192, 384):
        for _ in range(4):
            params += 2 * (channels * width * 9 + 2 * width + width * width * 9 + 2 * width)
            if channels != width:
                params += 2 * channels * (width // 2) + 2 * width
            channels = width
    params += 384 * 10 + 10
    assert count_parameters(model) == params
    assert round(params / 1e6, 1) == 26.2  # Gastaldi (2017), Table 1: 26 2x96d, 26.2M


def test_deploy_traces_and_folds_every_bn_that_follows_a_conv() -> None:
    model = CifarShakeShake(8, 8, 5).double().eval()
    randomize_batchnorm_(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could not fx-trace" fallback
        deployed = convzoo.deploy(model)
    left = [n for n, m in deployed.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert left and all(n.endswith("downsample.bn") for n in left)  # only BNs after a concat stay
    torch.testing.assert_close(deployed(x), model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"depth": 25}, "depth must be 6n\\+2"), ({"base_width": 0}, "base_width must be a positive int")],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CifarShakeShake(**kwargs)


def test_a_cpu_generator_serves_branches_on_another_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.rand(device='cuda', generator=<CPU generator>) raises; the coefficients are drawn on the
    generator's device and moved. (Meta tensors stand in for CUDA; rand is checked as CUDA checks it.)"""
    rand = torch.rand

    def checked_rand(*args, generator=None, device=None, **kwargs):
        if generator is not None and torch.device(device).type != generator.device.type:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator")
        return rand(*args, generator=generator, device=device, **kwargs)

    monkeypatch.setattr(torch, "rand", checked_rand)
    x1, x2 = torch.empty(4, 3, 2, 2, device="meta"), torch.empty(4, 3, 2, 2, device="meta")
    mixed = shake_shake(x1, x2, training=True, generator=torch.Generator().manual_seed(0))
    assert mixed.device.type == "meta" and mixed.shape == x1.shape
