"""CAC figures: feature maps over their sharp-window masks (the paper's Fig. 3) and ρ per layer (Fig. 4).

Both are written as PNG files. Matplotlib's Agg canvas is used directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from numbers import Real
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from convzoo.ops.cac import cac_layers
from convzoo.ops.cac_cost import CACStatistics
from convzoo.ops.registry import check_module


def _figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas, independent of pyplot and of the user's global backend."""
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _png_path(path: object, example: str) -> Path:
    """``path`` as the PNG file to write: ``.png`` appended when it has no suffix (as matplotlib does).

    Raises:
        TypeError: ``path`` is not a str or ``os.PathLike``.
        ValueError: ``path`` is an existing directory or has a suffix other than ``.png``.
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike naming a .png file, got {type(path).__name__}")
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"path {str(path)!r} is a directory; give a file path, e.g. {file / example}")
    if not file.suffix:
        return file.with_name(file.name + ".png")
    if file.suffix.lower() != ".png":
        raise ValueError(
            f"path must name a PNG file (suffix .png, or no suffix to have .png appended), got {str(path)!r}"
        )
    return file


def _save_png(figure: Figure, path: Path) -> Path:
    """Write ``figure`` to ``path`` as PNG, creating missing parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, format="png")
    return path


@torch.no_grad()
def plot_masks(model: nn.Module, image: Tensor, path: str | Path, *, max_layers: int | None = None) -> Path:
    """Save a PNG like Fig. 3: for each CAC layer, its input feature map (channel mean) over its sharp-window mask.

    Args:
        model: a model with CAC layers (training or deployed form); run once in eval mode.
        image: one image (C, H, W) or a batch whose first image is shown (B, C, H, W); cast to the
            model's device and dtype.
        path: the PNG file to write: a ``.png`` suffix (any case), or none and ``.png`` is appended.
            Missing parent directories are created.
        max_layers: show only the first this many CAC layers.

    Returns:
        The path written (``path`` with ``.png`` appended if it had no suffix). Yellow = sharp windows
        (k×k conv), dark = smooth (1×1 conv).

    Raises:
        TypeError: ``model`` is not a module or ``path`` not a path.
        ValueError: no CAC layer, a bad ``image`` or ``max_layers``, ``path`` a directory or not ``.png``.
    """
    layers = cac_layers(check_module(model))
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no CAC layer to plot")
    if not isinstance(image, Tensor) or image.dim() not in (3, 4):
        raise ValueError(f"image must be a (C, H, W) or (B, C, H, W) tensor, got {getattr(image, 'shape', image)!r}")
    if image.numel() == 0:
        raise ValueError(f"image must be a non-empty (C, H, W) or (B, C, H, W) tensor, got shape {tuple(image.shape)}")
    if max_layers is not None:
        if not isinstance(max_layers, int) or max_layers < 1:
            raise ValueError(f"max_layers must be a positive int or None, got {max_layers!r}")
        layers = layers[:max_layers]
    path = _png_path(path, "masks.png")
    batch = (image if image.dim() == 4 else image.unsqueeze(0))[:1]
    features: dict[str, Tensor] = {}
    handles = [
        layer.register_forward_hook(lambda m, inputs, out, name=name: features.__setitem__(name, inputs[0][0].mean(0)))
        for name, layer in layers
    ]
    training = model.training
    model.eval()
    try:
        parameter = next(model.parameters(), None)
        model(batch.to(parameter.device, parameter.dtype) if parameter is not None else batch)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    figure = _figure(1.6 * len(layers) + 0.4, 3.6)
    axes = figure.subplots(2, len(layers), squeeze=False)
    for column, (name, layer) in enumerate(layers):
        top, bottom = axes[0, column], axes[1, column]
        top.imshow(features[name].float().cpu().numpy(), cmap="gray")
        bottom.imshow(layer.last_mask[0].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
        top.set_title(f"{name}\nρ={float(layer.last_rho()[0]):.2f}", fontsize=7)
        for axis in (top, bottom):
            axis.set_xticks([])
            axis.set_yticks([])
    axes[0, 0].set_ylabel("feature", fontsize=8)
    axes[1, 0].set_ylabel("sharp windows", fontsize=8)
    figure.tight_layout()
    return _save_png(figure, path)


def plot_rho(rho: Mapping[str, float] | CACStatistics, path: str | Path, *, title: str = "") -> Path:
    """Save a bar chart like Fig. 4: the fraction of sharp windows ρ of each layer, in layer order.

    Args:
        rho: layer name -> ρ, or the result of ``convzoo.cac_statistics``.
        path: the PNG file to write: a ``.png`` suffix (any case), or none and ``.png`` is appended.
            Missing parent directories are created.
        title: an optional figure title.

    Returns:
        The path written (``path`` with ``.png`` appended if it had no suffix).

    Raises:
        TypeError: a ratio is not a real number, ``path`` not a path.
        ValueError: ``rho`` empty, a ratio outside [0, 1], ``path`` a directory or not ``.png``.
    """
    values = rho.rho if isinstance(rho, CACStatistics) else rho
    if not isinstance(values, Mapping) or not values:
        raise ValueError(f"rho must be a non-empty mapping of layer name to ratio (or CACStatistics), got {rho!r}")
    names = list(values)
    for name in names:
        value = values[name]
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, Real) or isinstance(value, bool):
            raise TypeError(f"rho[{name!r}] must be a real number in [0, 1], got {value!r}")
    ratios = [float(values[name]) for name in names]
    if not all(0.0 <= r <= 1.0 for r in ratios):
        raise ValueError(f"every ratio must be in [0, 1], got {dict(zip(names, ratios))}")
    path = _png_path(path, "rho.png")
    figure = _figure(max(4.0, 0.3 * len(names) + 1.5), 3.0)
    axis = figure.subplots()
    axis.bar(range(1, len(names) + 1), ratios, color="tab:blue")
    axis.set_xlabel("layer index")
    axis.set_ylabel("ratio of sharp windows ρ")
    axis.set_ylim(0, 1)
    axis.set_xticks(range(1, len(names) + 1))
    axis.tick_params(axis="x", labelsize=6)
    if title:
        axis.set_title(title)
    figure.tight_layout()
    return _save_png(figure, path)
