"""CAC's computational cost (§5.1, eq. 17), the cost-aware loss (eq. 13) and per-layer / per-image statistics.

Per CAC layer and image, with ρ the fraction of sharp windows and n the number of output positions::

    c = n · (ρ · MACs_kxk + (1 - ρ) · MACs_1x1 + 13)       # eq. 17; 13 = score map, eq. 16

where ``MACs_kxk = C_out · C_in/g · k_h · k_w`` and ``MACs_1x1 = C_out · C_in/g`` per position. The
model cost ``c(M)`` adds the MACs of every other ``nn.Conv2d`` and ``nn.Linear`` (fixed), and the
baseline ``c(M_b)`` is the same model with standard convs (ρ = 1, no score map), so
``c(M) / c(M_b)`` is the model-level MAC ratio the paper reports. During training ρ carries the
straight-through gradient (its value is the hard ρ, its gradient that of the mean of M).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from convzoo.ops.cac import SCORE_MACS_PER_POSITION, CAConv2d, CACStatsMixin, cac_layers, gradient_map
from convzoo.ops.registry import check_module


def layer_cost(layer: CACStatsMixin) -> Tensor:
    """Differentiable cost (MACs per image, batch mean) of a CAC layer's most recent call, eq. (17)."""
    rho_ste = getattr(layer, "last_rho_ste", None)
    rho = rho_ste.mean() if rho_ste is not None else layer.last_rho().mean()
    positions = layer.last_output_size[0] * layer.last_output_size[1]  # type: ignore[index]
    sharp, smooth = layer.macs_per_position()
    return positions * (rho * sharp + (1 - rho) * smooth + SCORE_MACS_PER_POSITION)


def baseline_layer_cost(layer: CACStatsMixin) -> int:
    """MACs per image of the standard conv at the layer's most recent output size."""
    layer.last_rho()  # raises if the layer has not run
    positions = layer.last_output_size[0] * layer.last_output_size[1]  # type: ignore[index]
    return positions * layer.macs_per_position()[0]


def _ignore_call(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
    """The forward hook a copy of a watched model gets: copies are not watched."""


class _RecordingHook:
    """Forward hook reporting to one :class:`PlainMacs`; a deep copy or pickle of the model drops it.

    A copied model (``convzoo.deploy``, ``copy.deepcopy``, ``torch.save``) would otherwise either fail
    to copy the hook's handles or report its own calls into the original model's cost.
    """

    def __init__(self, owner: PlainMacs) -> None:
        self.owner = owner

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        self.owner.record(module, output)

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return _ignore_call

    def __reduce__(self) -> tuple[Callable[..., None], tuple[()]]:
        return _no_hook, ()


def _no_hook() -> Callable[..., None]:
    return _ignore_call


class PlainMacs:
    """Records the MACs per image of every ``nn.Conv2d`` / ``nn.Linear`` call but CAC layers' (forward hooks).

    ``total`` is the sum over those modules of their most recent call. Use as a context manager
    or call ``remove()``.
    """

    def __init__(self, model: nn.Module) -> None:
        self._macs: dict[int, float] = {}
        hook = _RecordingHook(self)
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(hook)
            for module in model.modules()
            # CAC layers are costed by their own formula (CACSharpConv2d is also an nn.Conv2d)
            if isinstance(module, nn.Conv2d | nn.Linear) and not isinstance(module, CACStatsMixin)
        ]

    def record(self, module: nn.Module, output: Tensor) -> None:
        """Store the MACs per image of ``module``'s call that produced ``output``."""
        batch = output.shape[0] if output.dim() > 1 else 1
        if isinstance(module, nn.Conv2d):
            per_output = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = module.in_features
        self._macs[id(module)] = output.numel() * per_output / batch

    @property
    def total(self) -> float:
        return float(sum(self._macs.values()))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> PlainMacs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _check_model(model: object) -> list[tuple[str, nn.Module]]:
    layers = cac_layers(check_module(model))
    if not layers:
        raise ValueError(
            f"model {type(model).__name__} has no CAC layer; convert it with convzoo.convert(model, 'cac')"
        )
    return layers


class CACLoss(nn.Module):
    """The cost-aware objective of eq. (13): ``L = ℓ · (c(M) / c(M_b))^λ``.

    Args:
        model: a model with CAC layers; the cost is read from the masks of its most recent forward.
        lam: a finite λ >= 0 (0.3 in the paper); λ = 0 gives back ℓ. Any finite λ is accepted, but
            ``ratio ** λ`` overflows to inf (ratio > 1) or underflows to 0 (ratio < 1) in float32 once
            ``λ · |ln ratio|`` exceeds about 88, so keep λ of the order of the paper's.

    ``forward(task_loss)`` takes the scalar task loss ℓ and returns L; ``last_ratio`` holds the
    detached ``c(M) / c(M_b)`` of the latest call. Call ``remove()`` to detach its hooks from ``model``.
    """

    _last_ratio: Tensor | None

    def __init__(self, model: nn.Module, lam: float = 0.3) -> None:
        super().__init__()
        self._layers = [layer for _, layer in _check_model(model)]
        if not isinstance(lam, Real) or isinstance(lam, bool) or not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a finite real number >= 0, got {lam!r}")
        self.lam = float(lam)
        self._plain = PlainMacs(model)
        self._last_ratio = None

    @property
    def last_ratio(self) -> float | None:
        """The detached ``c(M) / c(M_b)`` of the latest call, or None before the first.

        Read out of the device only here: the training step itself never waits for the device.
        """
        return None if self._last_ratio is None else float(self._last_ratio)

    def cost_ratio(self) -> Tensor:
        """c(M) / c(M_b) of the model's most recent forward, differentiable w.r.t. every γ and β."""
        cost = sum(layer_cost(layer) for layer in self._layers) + self._plain.total
        baseline = sum(baseline_layer_cost(layer) for layer in self._layers) + self._plain.total
        return cost / baseline

    def forward(self, task_loss: Tensor) -> Tensor:
        """task_loss: scalar ℓ -> scalar ℓ · (c(M)/c(M_b))^λ."""
        if not isinstance(task_loss, Tensor):
            raise TypeError(f"task_loss must be a Tensor, got {type(task_loss).__name__}")
        ratio = self.cost_ratio()
        self._last_ratio = ratio.detach()  # kept on the device: float() here would sync every step
        if self.lam == 0:
            return task_loss
        return task_loss * ratio.to(task_loss.dtype) ** self.lam

    def remove(self) -> None:
        """Remove the forward hooks this loss put on the model."""
        self._plain.remove()

    def extra_repr(self) -> str:
        return f"lam={self.lam}, layers={len(self._layers)}"


@dataclass
class CACStatistics:
    """Per-layer ρ averaged over a data set and per-image effective MACs of the whole model.

    Attributes:
        rho: layer name -> mean over images of the fraction of sharp windows.
        image_macs: (N,) float64, effective MACs of each image (CAC layers by eq. 17 + other convs/linears).
        baseline_macs: MACs per image of the same model with standard convs.
    """

    rho: dict[str, float]
    image_macs: Tensor
    baseline_macs: float

    @property
    def mean_ratio(self) -> float:
        """Mean effective MACs relative to the standard-conv model."""
        return float(self.image_macs.mean()) / self.baseline_macs

    def table(self) -> str:
        """A plain-text summary: ρ per layer, then per-image MACs (mean, min, max)."""
        width = max(len(name) for name in self.rho)
        lines = [f"{'layer':<{width}}  rho"]
        lines += [f"{name:<{width}}  {rho:.3f}" for name, rho in self.rho.items()]
        macs = self.image_macs
        lines.append(
            f"effective MACs/image: mean {float(macs.mean()) / 1e6:.2f}M, min {float(macs.min()) / 1e6:.2f}M, "
            f"max {float(macs.max()) / 1e6:.2f}M; standard convs {self.baseline_macs / 1e6:.2f}M "
            f"({100 * (1 - self.mean_ratio):.1f}% fewer)"
        )
        return "\n".join(lines)


@torch.no_grad()
def cac_statistics(
    model: nn.Module, data: Iterable[Any], *, max_batches: int | None = None, device: torch.device | str | None = None
) -> CACStatistics:
    """Run ``model`` in eval mode over ``data`` and collect CAC statistics.

    Args:
        model: a model with CAC layers (training or deployed form).
        data: an iterable of batches, each an input tensor (B, C, H, W) or a tuple/list whose first
            element is one (as a DataLoader yields).
        max_batches: stop after this many batches.
        device: move inputs there (default: the device of the model's first parameter).
    """
    layers = _check_model(model)
    if isinstance(data, Tensor):
        raise TypeError(
            f"data must be an iterable of batches (e.g. [x] or a DataLoader), got a single Tensor of shape "
            f"{tuple(data.shape)}; wrap one batch in a list: cac_statistics(model, [x])"
        )
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be an iterable of batches (e.g. [x] or a DataLoader), got {data!r}")
    if max_batches is not None and (
        not isinstance(max_batches, int) or isinstance(max_batches, bool) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    if device is None:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else None
    # summed on the model's device and read out once at the end (no device sync per batch and layer)
    rho_sums: dict[str, Tensor | float] = dict.fromkeys((name for name, _ in layers), 0.0)
    image_macs: list[Tensor] = []
    baseline = 0.0
    training = model.training
    model.eval()
    try:
        with PlainMacs(model) as plain:
            for index, batch in enumerate(data):
                if max_batches is not None and index >= max_batches:
                    break
                inputs = batch[0] if isinstance(batch, tuple | list) and batch else batch
                if not isinstance(inputs, Tensor):
                    raise TypeError(
                        f"each batch must be a Tensor (B, C, H, W) or a tuple/list starting with one, "
                        f"got {batch!r:.200} (batch {index})"
                    )
                if inputs.dim() != 4:
                    raise ValueError(
                        f"each batch must hold a 4-D input (B, C, H, W), "
                        f"got shape {tuple(inputs.shape)} (batch {index})"
                    )
                model(inputs.to(device) if device is not None else inputs)
                macs: Tensor | float = plain.total
                baseline = plain.total
                for name, layer in layers:
                    rho_sums[name] = rho_sums[name] + layer.last_rho().sum()
                    macs = macs + layer.effective_macs_per_image()  # (B,) float64
                    baseline += baseline_layer_cost(layer)
                image_macs.append(macs)
    finally:
        model.train(training)
    if not image_macs:
        raise ValueError("data yielded no batch")
    all_macs = torch.cat(image_macs).cpu()
    return CACStatistics({name: float(total) / len(all_macs) for name, total in rho_sums.items()}, all_macs, baseline)


@torch.no_grad()
def calibrate_sharp_ratio_(model: nn.Module, inputs: Tensor, rho: float | Sequence[float]) -> dict[str, float]:
    """Set γ = 1 and β per CAC layer so that a fraction ``rho`` of the windows of ``inputs`` is sharp, in place.

    Layers are calibrated in module order, each on the inputs it receives once the layers before it
    are calibrated (a window is sharp iff G > the layer's (1 - ρ)-quantile of G). Useful to start
    fine-tuning a converted model at a given budget, or to benchmark a range of ρ.

    Args:
        model: a model with CAC layers in training form.
        inputs: a batch (B, C, H, W) to calibrate on.
        rho: one target ratio in [0, 1] for every layer, or one per layer in module order.

    Returns:
        layer name -> ρ achieved on ``inputs`` (ties in G can make it differ slightly from the target).
    """
    layers = [(name, layer) for name, layer in _check_model(model) if isinstance(layer, CAConv2d)]
    targets = [rho] * len(layers) if isinstance(rho, Real) else list(rho)
    if len(targets) != len(layers) or not all(isinstance(r, Real) and 0.0 <= float(r) <= 1.0 for r in targets):
        raise ValueError(f"rho must be a ratio in [0, 1] or {len(layers)} of them (one per CAC layer), got {rho!r}")
    training = model.training
    model.eval()
    captured: dict[str, Tensor] = {}
    try:
        for (_, layer), target in zip(layers, targets):
            handle = layer.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0]))
            try:
                model(inputs)
            finally:
                handle.remove()
            x = captured.pop("x")
            grad = gradient_map(layer.spec, x, layer.spec.output_size(x.shape[-2], x.shape[-1]))
            layer.gamma.fill_(1.0)
            if target >= 1.0:
                layer.beta.fill_(1.0)
            elif target <= 0.0:
                layer.beta.fill_(-float(grad.max()) - 1.0)
            else:
                layer.beta.fill_(-float(torch.quantile(grad.flatten().double(), 1.0 - float(target))))
        model(inputs)
        return {name: float(layer.last_rho().mean()) for name, layer in layers}
    finally:
        model.train(training)
