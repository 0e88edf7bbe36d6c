"""Parameters, MACs, a per-layer table and peak activation memory of one forward pass.

MACs are FLOPs / 2 as counted by ``torch.utils.flop_counter`` (convolutions, linears, matmuls,
attention). Two ways keep an operator from counting as 0:

- a module may define ``convzoo_macs(self, input, output) -> int`` (MACs for the whole batch of
  that call); its whole subtree is then counted by that formula instead of the flop counter.
  CAC layers use it to report their *effective* MACs (eq. 17 of the paper), which depend on the
  input, so profile them on real images (``inputs=``);
- a custom ``torch.library`` op gets a formula with :func:`register_op_macs`.

Any conv, linear or convzoo operator that still counts 0 MACs raises a warning.

``profile_model(model, input_size)`` returns a :class:`ProfileReport` that prints as Markdown
and converts to CSV and JSON; ``count_parameters`` and ``count_macs`` are the two headline
numbers on their own.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from convzoo.ops.conv_spec import check_bool
from convzoo.ops.registry import check_module, operator_kind

__all__ = [
    "CACSummary",
    "LayerProfile",
    "ProfileReport",
    "count_macs",
    "count_parameters",
    "profile_model",
    "register_op_macs",
]

MacsFormula = Callable[..., int]
_OP_MACS: dict[Any, MacsFormula] = {}


def register_op_macs(op: Any, formula: MacsFormula) -> None:
    """Register the MAC count of a custom op so the flop counter does not count it as 0.

    Args:
        op: the op's overload packet, e.g. ``torch.ops.mylib.myop``.
        formula: ``(*arg_shapes, out_shape=..., **kwargs) -> int`` MACs of one call; tensor
            arguments arrive as their shapes (``torch.Size``), others as they are.
    """
    if not isinstance(op, torch._ops.OpOverloadPacket):
        raise TypeError(f"op must be an op overload packet such as torch.ops.mylib.myop, got {op!r}")
    if not callable(formula):
        raise TypeError(f"formula must be callable, got {formula!r}")
    _OP_MACS[op] = formula


def _flop_mapping() -> dict[Any, Callable[..., int]]:
    def as_flops(formula: MacsFormula) -> Callable[..., int]:
        return lambda *args, **kwargs: 2 * int(formula(*args, **kwargs))

    return {op: as_flops(formula) for op, formula in _OP_MACS.items()}


# ------------------------------------------------------------------ report types
@dataclass
class LayerProfile:
    """One row of the per-layer table.

    Attributes:
        name: qualified module name (``""`` for the model itself).
        type: module class name.
        kind: the convzoo operator kind, or None.
        calls: times the module ran in the profiled forward pass.
        output_shape: shape of its (first call's) output, batch dimension included.
        parameters: parameters of the module and its children.
        macs: MACs per image over all its calls.
        macs_source: ``"flop_counter"`` or ``"convzoo_macs"`` (the module's own formula).
    """

    name: str
    type: str
    kind: str | None
    calls: int
    output_shape: tuple[int, ...] | None
    parameters: int
    macs: int
    macs_source: str


@dataclass
class CACSummary:
    """Content-aware convolution: effective cost against the same model with standard convs.

    Attributes:
        layers: number of CAC layers.
        effective_macs: MACs per image of the whole model with CAC layers at their effective cost.
        baseline_macs: MACs per image of the whole model with each CAC layer counted as the
            standard k x k conv it replaces.
        sharp_ratio: mean over CAC layers of the fraction of sharp windows (rho), or None.
    """

    layers: int
    effective_macs: int
    baseline_macs: int
    sharp_ratio: float | None

    @property
    def reduction(self) -> float:
        """Fractional MAC reduction, 1 - effective / baseline."""
        return 1.0 - self.effective_macs / self.baseline_macs if self.baseline_macs else 0.0


@dataclass
class ProfileReport:
    """What :func:`profile_model` measured. MACs are per image; memory is for the whole batch.

    Attributes:
        model: a display name.
        input_size: (C, H, W) of one image.
        batch_size: images in the profiled forward pass.
        parameters: all parameters; ``trainable_parameters`` those with ``requires_grad``.
        macs: MACs per image, each ``convzoo_macs`` module counted by its own formula.
        flop_counter_macs: FLOPs / 2 per image as ``torch.utils.flop_counter`` counts the ops
            actually run (differs from ``macs`` where a module defines ``convzoo_macs``).
        peak_activation_bytes: peak bytes held by tensors created during the eval forward pass
            (weights and the input excluded), for the whole batch; None when not measured
            (``memory=False``).
        layers: the per-layer table, leaf modules and convzoo operators in call order.
        other_macs: MACs per image not inside any listed layer (functional ops in containers).
        cac: the CAC summary when the model has CAC layers, else None.
    """

    model: str
    input_size: tuple[int, ...]
    batch_size: int
    parameters: int
    trainable_parameters: int
    macs: int
    flop_counter_macs: int
    peak_activation_bytes: int | None
    layers: list[LayerProfile] = field(default_factory=list)
    other_macs: int = 0
    cac: CACSummary | None = None

    # ------------------------------------------------------------ formats
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of everything in the report (``peak_activation_bytes`` None if not measured)."""
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        for row in data["layers"]:
            row["output_shape"] = None if row["output_shape"] is None else list(row["output_shape"])
        if self.cac is not None:
            data["cac"]["reduction"] = self.cac.reduction
        return data

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_csv(self) -> str:
        """The per-layer table as CSV, plus ``(other)`` and ``(total)`` rows."""
        buffer = io.StringIO()
        columns = ["name", "type", "kind", "calls", "output_shape", "parameters", "macs", "macs_source"]
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in self.layers:
            shape = "x".join(map(str, row.output_shape)) if row.output_shape else ""
            writer.writerow(
                [row.name, row.type, row.kind or "", row.calls, shape, row.parameters, row.macs, row.macs_source]
            )
        writer.writerow(["(other)", "", "", "", "", "", self.other_macs, "flop_counter"])
        writer.writerow(["(total)", "", "", "", "", self.parameters, self.macs, ""])
        return buffer.getvalue()

    def summary_rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs of the headline numbers, as printed above the table."""
        rows = [
            ("input", f"{'x'.join(map(str, self.input_size))}, batch {self.batch_size}"),
            ("parameters", f"{self.parameters:,} ({_si(self.parameters)})"),
            ("MACs / image", f"{self.macs:,} ({_si(self.macs)})"),
        ]
        if self.flop_counter_macs != self.macs:
            rows.append(("MACs run (flop counter)", f"{self.flop_counter_macs:,} ({_si(self.flop_counter_macs)})"))
        memory = "not measured" if self.peak_activation_bytes is None else _bytes(self.peak_activation_bytes)
        rows.append(("peak activation memory", memory))
        if self.cac is not None:
            rho = "" if self.cac.sharp_ratio is None else f", mean sharp ratio {self.cac.sharp_ratio:.3f}"
            rows.append(
                (
                    "CAC effective MACs",
                    f"{_si(self.cac.effective_macs)} vs {_si(self.cac.baseline_macs)} with standard convs "
                    f"({100 * abs(self.cac.reduction):.2f}% {'fewer' if self.cac.reduction >= 0 else 'more'}, "
                    f"{self.cac.layers} layers{rho})",
                )
            )
        return rows

    def to_markdown(self, *, layers: bool = True) -> str:
        """Markdown: a summary table, then (if ``layers``) the per-layer table."""
        lines = [f"### {self.model}", "", "| | |", "|---|---|"]
        lines += [f"| {label} | {value} |" for label, value in self.summary_rows()]
        if layers:
            total = self.macs or 1
            lines += ["", "| layer | type | output | params | MACs | % MACs |", "|---|---|---|---:|---:|---:|"]
            for row in self.layers:
                shape = "x".join(map(str, row.output_shape[1:])) if row.output_shape else ""
                kind = f" ({row.kind})" if row.kind else ""
                lines.append(
                    f"| {row.name or '(model)'} | {row.type}{kind} | {shape} | {row.parameters:,} | "
                    f"{row.macs:,} | {100 * row.macs / total:.2f} |"
                )
            if self.other_macs:
                lines.append(f"| (other) | | | | {self.other_macs:,} | {100 * self.other_macs / total:.2f} |")
            lines.append(f"| **total** | | | **{self.parameters:,}** | **{self.macs:,}** | 100.00 |")
        return "\n".join(lines) + "\n"

    def format(self, fmt: str = "md", *, layers: bool = True) -> str:
        """The report as ``"md"`` (Markdown), ``"csv"`` or ``"json"``."""
        if fmt in ("md", "markdown"):
            return self.to_markdown(layers=layers)
        if fmt == "csv":
            return self.to_csv()
        if fmt == "json":
            return self.to_json() + "\n"
        raise ValueError(f"fmt must be one of 'md', 'csv', 'json', got {fmt!r}")

    def __str__(self) -> str:
        return self.to_markdown()


def _si(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {suffix}"
    return f"{value:g}"


def _bytes(value: int) -> str:
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= scale:
            return f"{value / scale:.2f} {suffix}"
    return f"{value} B"


# ------------------------------------------------------------------ counting
def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model`` (shared parameters once)."""
    check_module(model)
    return sum(p.numel() for p in model.parameters())


def _is_layer(module: nn.Module) -> bool:
    """Rows of the table: leaves, convzoo operators and modules with their own MAC formula."""
    return (
        callable(getattr(module, "convzoo_macs", None))
        or operator_kind(module) is not None
        or next(module.children(), None) is None
    )


def _layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every table row, not descending into a row's children."""
    seen: set[int] = set()

    def visit(name: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        if id(module) in seen:
            return
        seen.add(id(module))
        if _is_layer(module):
            yield name, module
            return
        for child_name, child in module.named_children():
            yield from visit(f"{name}.{child_name}" if name else child_name, child)

    yield from visit("", model)


@dataclass
class _LayerRecord:
    name: str
    module: nn.Module
    calls: int = 0
    counted_flops: int = 0
    own_macs: int | None = None
    output_shape: tuple[int, ...] | None = None
    order: int = -1
    start_flops: list[int] = field(default_factory=list)


def _example_input(model: nn.Module, input_size: tuple[int, ...], batch_size: int) -> Tensor:
    parameter = next(model.parameters(), None)
    buffer = next(model.buffers(), None)
    reference = parameter if parameter is not None else buffer
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.get_default_dtype()
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, *input_size, generator=generator, dtype=dtype).to(device)


def _check_input_size(input_size: object) -> tuple[int, int, int]:
    """``input_size`` as (C, H, W), three positive ints."""
    if isinstance(input_size, int) or not isinstance(input_size, tuple | list):
        raise TypeError(f"input_size must be a tuple of ints (C, H, W) such as (3, 32, 32), got {input_size!r}")
    if len(input_size) != 3 or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in input_size):
        raise ValueError(
            f"input_size must be (C, H, W), a tuple of 3 positive ints such as (3, 32, 32), got {input_size!r}; "
            "for inputs of another rank pass them with inputs="
        )
    return tuple(input_size)  # type: ignore[return-value]


def _check_inputs(inputs: object) -> Tensor:
    """``inputs`` as a non-empty floating-point batch (B, C, H, W)."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a Tensor (B, C, H, W) or None, got {type(inputs).__name__}")
    if inputs.dim() != 4:
        hint = "; add the batch dimension: inputs.unsqueeze(0)" if inputs.dim() == 3 else ""
        raise ValueError(f"inputs must be a batched tensor (B, C, H, W), got shape {tuple(inputs.shape)}{hint}")
    if inputs.shape[0] < 1:
        raise ValueError(f"inputs must hold at least one image, got shape {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor, got {inputs.dtype}; convert it, e.g. inputs.float()")
    return inputs


def _check_cac_on_real_data(model: nn.Module, x: Tensor) -> None:
    """Refuse CAC layers on the meta device: their effective MACs (eq. 17) are read from the masks of real images."""
    try:
        from convzoo.ops.cac import CACStatsMixin
    except ImportError:  # CAC not available
        return
    cac = [m for m in model.modules() if isinstance(m, CACStatsMixin)]
    if cac and (x.is_meta or any(p.is_meta for m in cac for p in m.parameters())):
        raise ValueError(
            f"profile: {type(model).__name__} has {len(cac)} CAC layer(s) on the meta device; their effective MACs "
            "(eq. 17) depend on the content of real images, which the meta device does not hold. Profile the model "
            "on a real device (model.to_empty(device='cpu'), then load its weights) with real images (inputs=), "
            "or profile the model with standard convs for the dense count"
        )


def _pending_layer(run: _CountingRun) -> str:
    """`` in layer 'name' (Type)`` for the table row whose forward was interrupted, else ``""``."""
    for record in run.records:
        if record.start_flops:  # its pre-hook ran, its forward hook did not
            return f" in layer {record.name or '(model)'!r} ({type(record.module).__name__})"
    return ""


def _refused_input(
    model: nn.Module, x: Tensor, input_size: object, given_inputs: bool, where: str, error: RuntimeError
) -> ValueError:
    """The ValueError for a forward pass that refused the profiling input, naming the argument that set it."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if given_inputs:
        argument = f"inputs of shape {tuple(x.shape)} ({x.dtype}, {x.device})"
    else:
        argument = f"input_size={input_size!r} (a batch of shape {tuple(x.shape)})"
    return ValueError(
        f"profile: {type(model).__name__} cannot run on {argument}{where} (torch: {reason}); "
        "check the channel count, image size, dtype and device it expects"
    )


def _conv_dense_macs(module: nn.Module, output_shape: tuple[int, ...] | None) -> int | None:
    """MACs per image of the standard conv with ``module``'s geometry at its output size."""
    try:
        kh, kw = module.kernel_size
        per_position = module.out_channels * (module.in_channels // module.groups) * kh * kw
    except (AttributeError, TypeError, ValueError):
        return None
    if output_shape is None or len(output_shape) < 2:
        return None
    return per_position * output_shape[-2] * output_shape[-1]


class _CountingRun:
    """One eval forward pass under the flop counter with per-layer hooks."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.records = [_LayerRecord(name, module) for name, module in _layers(model)]
        self.counter = FlopCounterMode(display=False, custom_mapping=_flop_mapping())
        self._next_order = 0

    def _pre(self, record: _LayerRecord) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            record.start_flops.append(self.counter.get_total_flops())

        return hook

    def _post(self, record: _LayerRecord) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            record.counted_flops += self.counter.get_total_flops() - record.start_flops.pop()
            record.calls += 1
            if record.order < 0:
                record.order = self._next_order
                self._next_order += 1
            if record.output_shape is None and isinstance(output, Tensor):
                record.output_shape = tuple(output.shape)
            formula = getattr(module, "convzoo_macs", None)
            if callable(formula):
                first = args[0] if args else None
                record.own_macs = (record.own_macs or 0) + int(formula(first, output))

        return hook

    def run(self, x: Tensor) -> int:
        handles = []
        for record in self.records:
            handles.append(record.module.register_forward_pre_hook(self._pre(record)))
            handles.append(record.module.register_forward_hook(self._post(record)))
        try:
            with self.counter:
                self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        return self.counter.get_total_flops()


class _PeakMemory(TorchDispatchMode):
    """Tracks bytes of live storages created by ops inside the mode; ``peak`` is the maximum."""

    def __init__(self, excluded: set[tuple[torch.device, int]]) -> None:
        super().__init__()
        self.excluded = excluded
        self.storages: dict[tuple[torch.device, int], list[int]] = {}  # key -> [nbytes, live tensors]
        self.live = 0
        self.peak = 0

    def _release(self, key: tuple[torch.device, int]) -> None:
        entry = self.storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[key]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, Tensor) or id(tensor) in inputs:
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() == 0:
                continue
            key = (tensor.device, storage.data_ptr())
            if key in self.excluded:
                continue
            entry = self.storages.get(key)
            if entry is None:
                entry = self.storages[key] = [storage.nbytes(), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def _storage_keys(tensors: Iterator[Tensor]) -> set[tuple[torch.device, int]]:
    return {(t.device, t.untyped_storage().data_ptr()) for t in tensors}


def _peak_activation_bytes(model: nn.Module, x: Tensor) -> int:
    excluded = _storage_keys(model.parameters()) | _storage_keys(model.buffers()) | _storage_keys(iter([x]))
    mode = _PeakMemory(excluded)
    with mode:
        out = model(x)
    del out
    return mode.peak


def _cac_summary(records: list[_LayerRecord], macs: int, batch_size: int) -> CACSummary | None:
    try:
        from convzoo.ops.cac import CACStatsMixin
    except ImportError:  # CAC not available
        return None
    cac = [r for r in records if isinstance(r.module, CACStatsMixin) and r.calls]
    if not cac:
        return None
    baseline = macs
    ratios = []
    for record in cac:
        dense = _conv_dense_macs(record.module, record.output_shape)
        if dense is None:
            return None
        own = record.own_macs if record.own_macs is not None else record.counted_flops // 2
        baseline += dense * record.calls - own // batch_size
        with contextlib.suppress(AttributeError, RuntimeError):  # a CAC layer without recorded masks
            ratios.append(float(record.module.last_rho().mean()))
    sharp_ratio = sum(ratios) / len(ratios) if ratios else None
    return CACSummary(len(cac), macs, baseline, sharp_ratio)


@torch.no_grad()
def profile_model(
    model: nn.Module,
    input_size: tuple[int, ...] = (3, 32, 32),
    *,
    batch_size: int = 1,
    inputs: Tensor | None = None,
    name: str | None = None,
    memory: bool = True,
) -> ProfileReport:
    """Profile one eval-mode forward pass of ``model``.

    Args:
        model: any module; it runs in eval mode without autograd, and its mode is restored.
        input_size: (C, H, W) of one image, three positive ints; ignored when ``inputs`` is given.
        batch_size: images of the random input (seeded, standard normal, in the dtype of the
            model's first parameter, on its device).
        inputs: a real floating-point batch (B, C, H, W), B >= 1, to profile on instead, e.g. test
            images for CAC, whose effective MACs depend on the content. Used as given (no cast).
        name: display name (default: the model's class name).
        memory: also run a second pass to measure peak activation memory (False: the report's
            ``peak_activation_bytes`` is None and shows as not measured).

    Returns:
        A :class:`ProfileReport`; MACs are per image (totals divided by the batch size).

    Raises:
        TypeError: ``model`` is not a module, ``memory`` not a bool, ``input_size`` not a tuple,
            ``inputs`` not a floating-point tensor.
        ValueError: ``input_size`` not 3 positive ints, ``inputs`` not a non-empty 4-D batch, a bad
            ``batch_size``, the forward pass refuses the input (wrong channel count, size, dtype or
            device: the torch error is chained), or CAC layers on the meta device (their effective
            MACs need real data).
    """
    check_module(model)
    check_bool(memory, "memory")
    if inputs is None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        input_size = _check_input_size(input_size)
        x = _example_input(model, input_size, batch_size)
    else:
        x = _check_inputs(inputs)
    _check_cac_on_real_data(model, x)
    batch = x.shape[0]
    training = model.training
    model.eval()
    run = _CountingRun(model)
    try:
        try:
            total_flops = run.run(x)
            peak = _peak_activation_bytes(model, x) if memory else None
        except (torch.OutOfMemoryError, NotImplementedError):
            raise  # not the input's shape or type: let it through as it is
        except RuntimeError as error:  # the forward pass refused the input (channels, size, dtype, device)
            raise _refused_input(model, x, input_size, inputs is not None, _pending_layer(run), error) from error
    finally:
        model.train(training)

    records = sorted((r for r in run.records if r.calls), key=lambda r: r.order)
    layers, listed_flops, override_delta = [], 0, 0
    for record in records:
        listed_flops += record.counted_flops
        if record.own_macs is not None:
            macs_total, source = record.own_macs, "convzoo_macs"
            override_delta += record.own_macs - record.counted_flops // 2
        else:
            macs_total, source = record.counted_flops // 2, "flop_counter"
        layers.append(
            LayerProfile(
                name=record.name,
                type=type(record.module).__name__,
                kind=operator_kind(record.module),
                calls=record.calls,
                output_shape=record.output_shape,
                parameters=count_parameters(record.module),
                macs=macs_total // batch,
                macs_source=source,
            )
        )
    _warn_zero_macs(layers)
    flop_counter_macs = total_flops // 2 // batch
    macs = (total_flops // 2 + override_delta) // batch
    report = ProfileReport(
        model=name or type(model).__name__,
        input_size=tuple(x.shape[1:]),
        batch_size=batch,
        parameters=count_parameters(model),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        macs=macs,
        flop_counter_macs=flop_counter_macs,
        peak_activation_bytes=peak,
        layers=layers,
        other_macs=(total_flops - listed_flops) // 2 // batch,
    )
    report.cac = _cac_summary(records, macs, batch)
    return report


def _warn_zero_macs(layers: list[LayerProfile]) -> None:
    zero = [
        f"{row.name or '(model)'} ({row.type})"
        for row in layers
        if row.macs == 0 and (row.kind is not None or row.type in ("Conv2d", "Linear", "Conv1d", "Conv3d"))
    ]
    if zero:
        warnings.warn(
            f"profile: {len(zero)} layer(s) counted 0 MACs: {', '.join(zero[:5])}"
            f"{' ...' if len(zero) > 5 else ''}; define convzoo_macs(input, output) on the module or "
            "register_op_macs() for its custom op",
            UserWarning,
            stacklevel=3,
        )


def count_macs(model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32), *, batch_size: int = 1) -> int:
    """Multiply-accumulates of one eval-mode forward pass per image (``profile_model(...).macs``).

    Args:
        model: any module; it is run once in eval mode and its mode is restored.
        input_size: (C, H, W) of one image.
        batch_size: images in the forward pass; the total is divided by it.
    """
    return profile_model(model, input_size, batch_size=batch_size, memory=False).macs
