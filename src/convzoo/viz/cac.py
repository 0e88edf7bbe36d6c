"""CAC figures: feature maps over their sharp-window masks (the paper's Fig. 3) and ρ per layer (Fig. 4).

Matplotlib's Agg canvas is used directly (no pyplot, no global backend change).
"""

from __future__ import annotations

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


@torch.no_grad()
def plot_masks(model: nn.Module, image: Tensor, path: str | Path, *, max_layers: int | None = None) -> Path:
    """Save a PNG like Fig. 3: for each CAC layer, its input feature map (channel mean) over its sharp-window mask.

    Args:
        model: a model with CAC layers (training or deployed form); run once in eval mode.
        image: one image (C, H, W) or a batch whose first image is shown (1, C, H, W).
        path: where to write the PNG.
        max_layers: show only the first this many CAC layers.

    Returns:
        The path written. Yellow = sharp windows (k×k conv), dark = smooth (1×1 conv).
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
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def plot_rho(rho: Mapping[str, float] | CACStatistics, path: str | Path, *, title: str = "") -> Path:
    """Save a bar chart like Fig. 4: the fraction of sharp windows ρ of each layer, in layer order.

    Args:
        rho: layer name -> ρ, or the result of ``convzoo.cac_statistics``.
        path: where to write the PNG.
        title: an optional figure title.
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
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path
