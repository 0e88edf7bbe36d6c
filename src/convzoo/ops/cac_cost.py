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

import itertools
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
    """Differentiable cost (MACs per image, batch mean) of a CAC layer's most recent call, eq. (17).

    Returns:
        A 0-d tensor. Raises ValueError when that call ran on an empty batch (B = 0): a mean over no
        image is undefined (it would be NaN).
    """
    rho_ste = getattr(layer, "last_rho_ste", None)
    rho_per_image = rho_ste if rho_ste is not None else layer.last_rho()  # (B,)
    if rho_per_image.shape[0] == 0:
        raise ValueError(
            f"{type(layer).__name__}'s most recent call ran on an empty batch (B = 0): "
            "its cost per image is undefined; skip empty batches"
        )
    rho = rho_per_image.mean()
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
        """Store the MACs per image of ``module``'s call that produced ``output``.

        ``output`` is a conv's (B, C_out, H', W') or, for an unbatched input, (C_out, H', W') (one image,
        as ``nn.Conv2d`` takes it); a linear's (B, ..., out_features) or, unbatched, (out_features,). The
        MACs per image are read from the shape of one image, so an empty batch (B = 0) records the same
        MACs per image as any other batch.
        """
        if isinstance(module, nn.Conv2d):
            per_output = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
            image_shape = output.shape[1:] if output.dim() == 4 else output.shape
        else:
            per_output = module.in_features
            image_shape = output.shape[1:] if output.dim() > 1 else output.shape
        self._macs[id(module)] = math.prod(image_shape) * per_output

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

    ``forward(task_loss)`` takes the scalar (0-d) task loss ℓ and returns L; ``last_ratio`` holds the
    detached ``c(M) / c(M_b)`` of the latest call. The model may run on a batch (B, C, H, W) or on one
    unbatched image (C, H, W). A forward on an empty batch (B = 0) has no cost: ``forward`` then returns
    ``task_loss`` unchanged and ``last_ratio`` keeps its value. Call ``remove()`` to detach its hooks
    from ``model``.
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
        """c(M) / c(M_b) of the model's most recent forward, a 0-d tensor differentiable w.r.t. every γ and β.

        Raises ValueError when that forward ran on an empty batch (there is no image to cost).
        """
        cost = sum(layer_cost(layer) for layer in self._layers) + self._plain.total
        baseline = sum(baseline_layer_cost(layer) for layer in self._layers) + self._plain.total
        return cost / baseline

    def _last_batch_was_empty(self) -> bool:
        """Whether the model's most recent forward ran on an empty batch (shapes only: no device sync)."""
        return any(layer.last_rho().shape[0] == 0 for layer in self._layers)

    def forward(self, task_loss: Tensor) -> Tensor:
        """task_loss: 0-d ℓ -> 0-d ℓ · (c(M)/c(M_b))^λ (ℓ itself after a forward on an empty batch)."""
        if not isinstance(task_loss, Tensor):
            raise TypeError(f"task_loss must be a Tensor, got {type(task_loss).__name__}")
        if task_loss.dim() != 0:
            raise ValueError(
                f"task_loss must be a scalar (0-d) tensor, got shape {tuple(task_loss.shape)}; "
                "reduce it first, e.g. F.cross_entropy(..., reduction='mean') or loss.mean()"
            )
        if self._last_batch_was_empty():  # no image: no cost to weigh, the batch contributes only ℓ
            return task_loss
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
        image_baseline_macs: (N,) float64, MACs of each image through the same model with standard
            convs (at that image's size: images of different sizes have different baselines).
    """

    rho: dict[str, float]
    image_macs: Tensor
    image_baseline_macs: Tensor

    def __post_init__(self) -> None:
        for name in ("image_macs", "image_baseline_macs"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.dim() != 1 or value.numel() == 0:
                raise TypeError(f"{name} must be a non-empty 1-d tensor (N,), got {value!r:.100}")
        if self.image_macs.shape != self.image_baseline_macs.shape:
            raise ValueError(
                f"image_macs and image_baseline_macs must have one entry per image, got shapes "
                f"{tuple(self.image_macs.shape)} and {tuple(self.image_baseline_macs.shape)}"
            )

    @property
    def baseline_macs(self) -> float:
        """Mean over images of the MACs per image of the same model with standard convs."""
        return float(self.image_baseline_macs.mean())

    @property
    def mean_ratio(self) -> float:
        """Mean effective MACs over the mean MACs of the standard-conv model on the same images.

        That is, total effective MACs over total standard MACs of the data set: with images of
        different sizes each is compared with its own baseline, and larger images weigh more.
        """
        return float(self.image_macs.sum()) / float(self.image_baseline_macs.sum())

    def table(self) -> str:
        """A plain-text summary: ρ per layer, then per-image MACs (mean, min, max) against standard convs."""
        width = max(len(name) for name in self.rho)
        lines = [f"{'layer':<{width}}  rho"]
        lines += [f"{name:<{width}}  {rho:.3f}" for name, rho in self.rho.items()]
        macs, base = self.image_macs, self.image_baseline_macs
        if float(base.min()) == float(base.max()):
            standard = f"{self.baseline_macs / 1e6:.2f}M"
        else:  # images of different sizes
            standard = (
                f"mean {self.baseline_macs / 1e6:.2f}M, min {float(base.min()) / 1e6:.2f}M, "
                f"max {float(base.max()) / 1e6:.2f}M"
            )
        reduction = 1 - self.mean_ratio
        lines.append(
            f"effective MACs/image: mean {float(macs.mean()) / 1e6:.2f}M, min {float(macs.min()) / 1e6:.2f}M, "
            f"max {float(macs.max()) / 1e6:.2f}M; standard convs {standard} "
            f"({100 * abs(reduction):.1f}% {'fewer' if reduction >= 0 else 'more'})"
        )
        return "\n".join(lines)


def _statistics_device(model: nn.Module, device: object) -> torch.device | None:
    """``device`` as a torch.device (default: the device of the model's first parameter, or None)."""
    if device is None:
        parameter = next(model.parameters(), None)
        return parameter.device if parameter is not None else None
    if not isinstance(device, torch.device | str):
        raise TypeError(
            f"device must be a torch.device, a device string such as 'cpu' or 'cuda:0', or None, got {device!r}"
        )
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device must be a torch.device, a device string such as 'cpu' or 'cuda:0', or None, got {device!r}"
        ) from None


def _check_real_data(model: nn.Module, device: torch.device | None) -> None:
    """Refuse the meta device: ρ and the effective MACs are read from masks computed on real values."""
    on_meta = any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))
    if on_meta or (device is not None and device.type == "meta"):
        where = f"{type(model).__name__} is on the meta device" if on_meta else "device='meta'"
        raise ValueError(
            f"cac_statistics needs real data, but {where}: CAC's masks (hence ρ and the effective MACs) "
            "depend on the values of the images and weights, which the meta device does not hold; "
            "materialize the model first (model.to_empty(device='cpu'), then load its weights)"
        )


@torch.no_grad()
def cac_statistics(
    model: nn.Module, data: Iterable[Any], *, max_batches: int | None = None, device: torch.device | str | None = None
) -> CACStatistics:
    """Run ``model`` in eval mode over ``data`` and collect CAC statistics.

    Args:
        model: a model with CAC layers (training or deployed form), not on the meta device.
        data: an iterable of batches, each a floating-point input tensor (B, C, H, W) or a tuple/list
            whose first element is one (as a DataLoader yields). Batches may differ in size (B, H and W);
            each image is compared with the standard-conv model at its own size. Empty batches (B = 0)
            are skipped.
        max_batches: stop after this many batches (empty ones included).
        device: move inputs there (default: the device of the model's first parameter). Inputs are
            also cast to the dtype of the model's first parameter when it is floating point.

    Returns:
        :class:`CACStatistics` over every image of the batches read.

    Raises:
        TypeError: ``data`` is not an iterable of batches, a batch holds no tensor or a non-floating one,
            ``device`` is not a device.
        ValueError: the model has no CAC layer or is on the meta device, a batch is not 4-D, ``device``
            names no device or inputs cannot move there, ``data`` yields no image.
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
    device = _statistics_device(model, device)
    _check_real_data(model, device)
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else None
    # summed on the model's device and read out once at the end (no device sync per batch and layer)
    rho_sums: dict[str, Tensor | float] = dict.fromkeys((name for name, _ in layers), 0.0)
    image_macs: list[Tensor] = []
    image_baselines: list[Tensor] = []
    batches = 0
    training = model.training
    model.eval()
    try:
        with PlainMacs(model) as plain:
            for index, batch in enumerate(data):
                if max_batches is not None and index >= max_batches:
                    break
                batches += 1
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
                if not inputs.is_floating_point():
                    raise TypeError(
                        f"each batch must hold a floating-point input, got {inputs.dtype} (batch {index}); "
                        "convert images to float first (e.g. x.float() / 255)"
                    )
                if inputs.shape[0] == 0:  # no image: nothing to count (an empty batch is skipped)
                    continue
                try:
                    inputs = inputs.to(device=device, dtype=dtype)
                except (RuntimeError, AssertionError) as error:  # e.g. 'cuda' on a machine without CUDA
                    raise ValueError(f"cannot move batch {index} to device={str(device)!r}: {error}") from None
                model(inputs)
                macs: Tensor | float = plain.total
                baseline = plain.total
                for name, layer in layers:
                    rho_sums[name] = rho_sums[name] + layer.last_rho().sum()
                    macs = macs + layer.effective_macs_per_image()  # (B,) float64
                    baseline += baseline_layer_cost(layer)
                image_macs.append(macs)
                image_baselines.append(torch.full((inputs.shape[0],), baseline, dtype=torch.float64))
    finally:
        model.train(training)
    if not image_macs:
        raise ValueError("data yielded no batch" if not batches else f"data yielded no image ({batches} empty batches)")
    all_macs = torch.cat(image_macs).cpu()
    rho = {name: float(total) / len(all_macs) for name, total in rho_sums.items()}
    return CACStatistics(rho, all_macs, torch.cat(image_baselines))


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
