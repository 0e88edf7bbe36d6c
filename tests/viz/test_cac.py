"""CAC figures: mask grid (Fig. 3) and per-layer ρ bars (Fig. 4) are written as PNG files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import convzoo
from convzoo.models.cifar_resnet import CifarResNet
from convzoo.ops.cac_cost import cac_statistics, calibrate_sharp_ratio_
from convzoo.viz import plot_masks, plot_rho

PNG = b"\x89PNG\r\n\x1a\n"


def _model() -> nn.Module:
    model = convzoo.convert(CifarResNet(1), "cac")
    calibrate_sharp_ratio_(model, torch.randn(2, 3, 16, 16), 0.5)
    return model


def test_plot_masks_writes_a_png_for_every_layer(tmp_path: Path) -> None:
    model = _model()
    path = plot_masks(model, torch.randn(3, 16, 16), tmp_path / "masks.png")
    assert path.read_bytes()[:8] == PNG
    assert model.training  # mode restored
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed
    small = plot_masks(convzoo.deploy(model), torch.randn(1, 3, 16, 16), tmp_path / "small.png", max_layers=2)
    assert small.stat().st_size < path.stat().st_size


def test_plot_rho_accepts_a_mapping_or_statistics(tmp_path: Path) -> None:
    model = _model()
    stats = cac_statistics(model, [torch.randn(2, 3, 16, 16)])
    assert plot_rho(stats, tmp_path / "rho.png", title="CAC").read_bytes()[:8] == PNG
    assert plot_rho({"a": 0.2, "b": 1.0}, tmp_path / "rho2.png").read_bytes()[:8] == PNG


def test_plot_masks_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model Conv2d has no CAC layer to plot"):
        plot_masks(nn.Conv2d(3, 3, 3), torch.randn(3, 8, 8), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"image must be a \(C, H, W\) or \(B, C, H, W\) tensor, got"):
        plot_masks(_model(), torch.randn(8, 8), tmp_path / "x.png")
    with pytest.raises(ValueError, match="max_layers must be a positive int or None, got 0"):
        plot_masks(_model(), torch.randn(3, 8, 8), tmp_path / "x.png", max_layers=0)
    with pytest.raises(TypeError, match="model must be an nn.Module, got NoneType"):
        plot_masks(None, torch.randn(3, 8, 8), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"image must be a non-empty .* got shape \(0, 3, 8, 8\)"):
        plot_masks(_model(), torch.randn(0, 3, 8, 8), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_rho_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rho must be a non-empty mapping"):
        plot_rho({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"every ratio must be in \[0, 1\]"):
        plot_rho({"a": 1.5}, tmp_path / "x.png")
    with pytest.raises(TypeError, match=r"rho\['b'\] must be a real number in \[0, 1\], got 'x'"):
        plot_rho({"a": 0.5, "b": "x"}, tmp_path / "x.png")
    with pytest.raises(TypeError, match=r"rho\['a'\] must be a real number in \[0, 1\], got '0.5'"):
        plot_rho({"a": "0.5"}, tmp_path / "x.png")  # float('0.5') would have accepted it
    with pytest.raises(TypeError, match=r"rho\['a'\] must be a real number in \[0, 1\], got None"):
        plot_rho({"a": None}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_rho_accepts_scalar_tensors(tmp_path: Path) -> None:
    assert plot_rho({"a": torch.tensor(0.25)}, tmp_path / "rho.png").read_bytes()[:8] == PNG


def test_a_path_without_a_suffix_gets_png_appended_and_is_returned(tmp_path: Path) -> None:
    model = _model()
    masks = plot_masks(model, torch.randn(3, 16, 16), tmp_path / "masks")
    rho = plot_rho({"a": 0.5}, str(tmp_path / "rho"))
    assert (masks, rho) == (tmp_path / "masks.png", tmp_path / "rho.png")
    assert masks.read_bytes()[:8] == PNG and rho.read_bytes()[:8] == PNG
    upper = plot_rho({"a": 0.5}, tmp_path / "RHO.PNG")
    assert upper == tmp_path / "RHO.PNG" and upper.read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RHO.PNG", "masks.png", "rho.png"]


@pytest.mark.parametrize("name", ["masks.jpg", "masks.txt", "masks.pdf", "masks.png.bak"])
def test_a_suffix_other_than_png_is_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    match = rf"path must name a PNG file \(suffix .png, or no suffix to have .png appended\), got '{path}'"
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        plot_masks(_model(), torch.randn(3, 8, 8), path)
    with pytest.raises(ValueError, match="path must name a PNG file"):
        plot_rho({"a": 0.5}, path)
    assert not any(tmp_path.iterdir())


def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    rho = plot_rho({"a": 0.5}, tmp_path / "new" / "dir" / "rho.png")
    masks = plot_masks(_model(), torch.randn(3, 8, 8), tmp_path / "other" / "masks")
    assert rho.read_bytes()[:8] == PNG and masks == tmp_path / "other" / "masks.png" and masks.is_file()


def test_a_directory_or_a_non_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"path '{tmp_path}' is a directory; give a file path, e.g. .*rho\.png"):
        plot_rho({"a": 0.5}, tmp_path)
    with pytest.raises(ValueError, match=r"is a directory; give a file path, e.g. .*masks\.png"):
        plot_masks(_model(), torch.randn(3, 8, 8), tmp_path)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike naming a .png file, got int"):
        plot_rho({"a": 0.5}, 5)
    assert not any(tmp_path.iterdir())
