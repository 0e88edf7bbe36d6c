"""Model surgery: ``convert()`` swaps convs for an operator kind, ``deploy()`` folds for inference.

Nothing here knows a particular operator: kinds come from ``convzoo.ops.registry``
and deploy forms from each module's ``fuse()`` / ``reparameterize()`` methods, the
protocol that ``timm.utils.reparameterize_model`` also follows.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from convzoo.ops.conv_spec import check_bool, conv_signature
from convzoo.ops.registry import (
    FOLD_METHODS,
    ConvNotReplaceableError,
    check_callable,
    check_module,
    fold_method,
    get_conv_kind,
    has_method,
    operator_kind,
)

LayerOptions = Callable[[str, nn.Conv2d], "dict[str, Any] | None"]


@dataclass
class ConversionReport:
    """What ``convert()`` did: layers replaced, layers skipped with the reason, unmatched patterns."""

    kind: str
    replaced: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unmatched_patterns: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"convert(kind={self.kind!r}): {len(self.replaced)} replaced, {len(self.skipped)} skipped"]
        lines += [f"  replaced  {name:<40} {desc}" for name, desc in self.replaced]
        lines += [f"  skipped   {name:<40} {reason}" for name, reason in self.skipped]
        lines += [f"  pattern {pattern!r} matched no conv" for pattern in self.unmatched_patterns]
        return "\n".join(lines)


def conversion_report(model: nn.Module) -> ConversionReport | None:
    """The report of the last ``convert()`` that returned ``model`` (None if never converted)."""
    return getattr(model, "convzoo_report", None)


def _patterns(value: str | Iterable[str] | None, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    patterns = list(value) if isinstance(value, Iterable) else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{name} must be a glob string or a list of glob strings, got {value!r}")
    return patterns


def convert(
    model: nn.Module,
    kind: str,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    inplace: bool = False,
    strict: bool = False,
    layer_options: LayerOptions | None = None,
    **options: Any,
) -> nn.Module:
    """Replace every ``nn.Conv2d`` in ``model`` that ``kind`` replaces.

    Args:
        model: any module (a bare ``nn.Conv2d`` too).
        kind: an operator kind key, see ``convzoo.list_convs()``.
        include: glob(s) over qualified module names; only matching convs are considered.
        exclude: glob(s); matching convs are left alone.
        inplace: modify ``model`` rather than a deep copy of it.
        strict: raise ``ValueError`` when a pattern matches no conv or nothing is replaced,
            instead of warning.
        layer_options: ``(name, conv) -> dict`` of extra per-layer options (e.g. kernels
            per stage); merged over ``options``.
        **options: passed to the kind's ``from_conv`` for every replaced layer.

    Raises:
        TypeError: ``model`` is not a module, ``inplace`` / ``strict`` not a bool, a pattern not a
            glob string, ``layer_options`` not callable or returning neither a dict nor None.
        ValueError: an unknown ``kind``; with ``strict``, an unmatched pattern or nothing replaced.

    Returns:
        The converted model (a new module if ``model`` itself was a replaced conv). Its
        ``convzoo_report`` attribute (also ``conversion_report(model)``) lists which layers were
        replaced and which were skipped, and why. Layers that already are convzoo operators
        are skipped and not entered, so converting twice is idempotent. Training mode, device,
        dtype and the ``requires_grad`` flags of the parameters that hold a conv's kernel and bias
        carry over to its replacement (see ``conv_spec.inherit_requires_grad``).
    """
    check_module(model)
    conv_kind = get_conv_kind(kind)
    includes, excludes = _patterns(include, "include"), _patterns(exclude, "exclude")
    check_bool(inplace, "inplace")
    check_bool(strict, "strict")
    if layer_options is not None:
        check_callable(layer_options, "layer_options")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport(kind)
    used_patterns: set[str] = set()
    built: dict[int, nn.Module] = {}  # preserves sharing when one conv is reached twice

    # convs inside a block that folds its own convs, by id: a conv shared with a slot outside such a block is
    # skipped in every slot (replacing one slot only would split the shared module)
    folded_by = _convs_inside_folding_blocks(model)

    def replacement(name: str, conv: nn.Module) -> nn.Module | None:
        if type(conv) is not nn.Conv2d:
            report.skipped.append((name, f"{type(conv).__name__} is a subclass of nn.Conv2d with its own forward"))
            return None
        if includes:
            hits = [p for p in includes if fnmatch.fnmatchcase(name, p)]
            used_patterns.update(hits)
            if not hits:
                report.skipped.append((name, "not matched by include"))
                return None
        hits = [p for p in excludes if fnmatch.fnmatchcase(name, p)]
        if hits:
            used_patterns.update(hits)
            report.skipped.append((name, f"excluded by {hits[0]!r}"))
            return None
        reason = conv_kind.skip_reason(conv)
        folder = folded_by.get(id(conv))
        if reason is None and folder is not None and not conv_kind.exact_weight:
            reason = f"inside {folder}, which folds its convs from their weight (dropping what {kind!r} adds)"
        if reason is not None:
            report.skipped.append((name, reason))
            return None
        if id(conv) not in built:
            layer_opts = dict(options)
            if layer_options is not None:
                extra = layer_options(name, conv)
                if extra is not None and not (isinstance(extra, Mapping) and all(isinstance(k, str) for k in extra)):
                    raise TypeError(
                        f"layer_options({name!r}, conv) must return a dict of options (str keys) or None, got {extra!r}"
                    )
                layer_opts.update(extra or {})
            try:
                new = conv_kind.from_conv(conv, **layer_opts)
            except ConvNotReplaceableError as error:  # this conv's channels / geometry, with these options
                report.skipped.append((name, str(error)))
                return None
            except (TypeError, ValueError) as error:
                raise type(error)(f"cannot convert {name!r} to {kind!r}: {error}") from error
            new.train(conv.training)
            carry_hooks(conv, new)
            built[id(conv)] = new
        report.replaced.append((name, conv_signature(conv)))
        return built[id(conv)]

    def visit(parent: nn.Module, prefix: str) -> None:
        # _modules, not named_children(): the latter hides a shared module's second slot
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            name = prefix + child_name
            existing = operator_kind(child)
            if existing is not None:
                report.skipped.append((name, f"already a convzoo {existing!r} operator"))
                continue
            if isinstance(child, nn.Conv2d):
                new = replacement(name, child)
                if new is not None:
                    setattr(parent, child_name, new)
                continue
            visit(child, name + ".")

    if operator_kind(model) is not None:
        report.skipped.append(("", f"already a convzoo {operator_kind(model)!r} operator"))
    elif isinstance(model, nn.Conv2d):
        model = replacement("", model) or model
    else:
        visit(model, "")

    report.unmatched_patterns = [p for p in includes + excludes if p not in used_patterns]
    problems = [f"pattern {p!r} matched no conv" for p in report.unmatched_patterns]
    if not report.replaced:
        problems.append(f"no layer was replaced by {kind!r}")
    if problems:
        message = f"convert(kind={kind!r}): " + "; ".join(problems)
        if strict:
            raise ValueError(message + "\n" + str(report))
        warnings.warn(message + " (see convzoo.conversion_report(model))", UserWarning, stacklevel=2)
    object.__setattr__(model, "convzoo_report", report)
    return model


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the forward, forward-pre and backward hooks registered on ``old``, the module it replaces.

    ``convert()`` and ``deploy()`` call it for every module they swap, so activation capture (timm's
    ``FeatureHooks``, torchvision's feature extraction by hooks, profilers) keeps firing, as torch.ao's
    ``swap_module`` does. Hooks are keyed by handle id, so carrying twice adds nothing. The user's
    ``RemovableHandle`` still refers to ``old``: remove a carried hook with ``new._forward_hooks.pop(handle.id)``.
    """
    if new is old:
        return
    for attribute in _HOOK_DICTS:
        hooks = getattr(old, attribute, None)
        if hooks:
            getattr(new, attribute).update(hooks)
    if old._backward_hooks and getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook


@contextlib.contextmanager
def _hooks_set_aside(model: nn.Module) -> Iterator[None]:
    """Every module's hooks emptied for the duration (a trace runs them on proxies), then put back."""
    saved = [
        (module, attribute, dict(hooks))
        for module in model.modules()
        for attribute in _HOOK_DICTS
        if (hooks := getattr(module, attribute, None))
    ]
    for module, attribute, _ in saved:
        getattr(module, attribute).clear()
    try:
        yield
    finally:
        for module, attribute, hooks in saved:
            getattr(module, attribute).update(hooks)


def _convs_inside_folding_blocks(model: nn.Module) -> dict[int, str]:
    """id of every conv below a block that folds its own convs (``fold_method``) -> that block, described as
    in conversion reports (the innermost block; the model itself counts)."""
    inside: dict[int, str] = {}

    def walk(module: nn.Module, name: str, folder: str | None) -> None:
        folder = _folder_description(module, name) or folder
        for child_name, child in module._modules.items():
            if child is None or operator_kind(child) is not None:
                continue
            if isinstance(child, nn.Conv2d):
                if folder is not None:
                    inside.setdefault(id(child), folder)
                continue
            walk(child, f"{name}.{child_name}" if name else child_name, folder)

    if not isinstance(model, nn.Conv2d):
        walk(model, "", None)
    return inside


def _folder_description(module: nn.Module, name: str) -> str | None:
    """'the model (YOLO) ... fuse()' style words for a block that folds its own convs, or None."""
    method = fold_method(module)
    if method is None:
        return None
    where = f"{name!r}" if name else "the model"
    return f"{where} ({type(module).__name__}, {method}())"


# -------------------------------------------------------------------- deploy
def reparameterize(model: nn.Module) -> nn.Module:
    """Fold every module that offers a deploy form, like ``timm.utils.reparameterize_model``.

    A module with ``fuse()`` is replaced by what it returns (a ``fuse()`` returning the module itself
    counts as folding in place); one with ``reparameterize()`` (or ``switch_to_deploy()``) is changed
    in place. Works in place; returns the new root.

    Raises:
        TypeError: ``model`` is not a module, or a ``fuse()`` returned something other than a module.
    """
    return _reparameterize(check_module(model), "")


def _reparameterize(module: nn.Module, name: str) -> nn.Module:
    if has_method(module, "fuse"):
        if operator_kind(module) is None:
            _check_folds_exactly(module, name, "fuse")
            _fold_operators_inside(module, name)
        fused = module.fuse()
        if not isinstance(fused, nn.Module):
            where = f"module {name!r}" if name else "the root module"
            raise TypeError(
                f"deploy: fuse() of {where} ({type(module).__name__}) returned {fused!r}, "
                "expected the nn.Module that replaces it"
            )
        if fused is not module:  # a fuse() that folds in place and returns self: go on into its children
            carry_hooks(module, fused)
            return _reparameterize(fused, name)
    else:
        for method in FOLD_METHODS[1:]:
            if has_method(module, method):
                _check_folds_exactly(module, name, method)
                _fold_operators_inside(module, name)
                getattr(module, method)()
                break
    for child_name, child in list(module.named_children()):
        new = _reparameterize(child, f"{name}.{child_name}" if name else child_name)
        if new is not child:
            setattr(module, child_name, new)
    return module


def _fold_operators_inside(block: nn.Module, name: str) -> None:
    """Fold the convzoo operators inside a block that folds its own convs, before it does.

    ``_check_folds_exactly`` lets only operators whose ``weight`` is their whole function (DO-Conv) stay in
    such a block; folded first, they are the plain ``nn.Conv2d`` the block expects (timm's RepGhost asserts
    ``isinstance(conv, nn.Conv2d)``; others read ``conv.bias`` or copy the module), with the same weight.
    """
    for child_name, child in list(block.named_children()):
        path = f"{name}.{child_name}" if name else child_name
        if operator_kind(child) is not None:
            new = _reparameterize(child, path)
            if new is not child:
                setattr(block, child_name, new)
        else:
            _fold_operators_inside(child, path)


def _check_folds_exactly(block: nn.Module, name: str, method: str) -> None:
    """Refuse to let a block that folds its own convs (timm's RepVGG ``reparameterize()``, ...) fold a
    convzoo operator whose function is more than its ``weight``: the block would fold it as a plain conv."""
    for inner_name, inner in block.named_modules():
        kind = operator_kind(inner)
        if kind is not None and inner is not block and not get_conv_kind(kind).exact_weight:
            where = f"module {name!r}" if name else "the root module"
            inner_path = f"{name}.{inner_name}" if name else inner_name
            raise ValueError(
                f"deploy: {where} ({type(block).__name__}) folds its own convs with {method}() from their weight, "
                f"which would drop what the convzoo {kind!r} operator at {inner_path!r} computes beyond it "
                f"(wrong outputs); convert() skips convs inside such blocks: convert the original model again, or "
                f"exclude that block"
            )


_FOLDABLE_BN = (nn.BatchNorm2d, nn.SyncBatchNorm)  # SyncBatchNorm: what --sync-bn CUDA training holds


def _bn_replacement(bn: nn.Module) -> nn.Module | None:
    """What stands in for a BN once folded: Identity, or timm's BatchNormAct2d's drop + act."""
    if type(bn) in _FOLDABLE_BN:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "act") and hasattr(bn, "drop"):
        return nn.Sequential(bn.drop, bn.act)
    return None


def _foldable(bn: nn.Module) -> bool:
    return (
        isinstance(bn, _FOLDABLE_BN)
        and _bn_replacement(bn) is not None
        and bn.running_mean is not None
        and bn.running_var is not None
    )


class _PairTracer(fx.Tracer):
    """Traces module-level dataflow; convs, BNs and convzoo operators stay leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Conv2d, *_FOLDABLE_BN)) or operator_kind(m) is not None or _accepts_bn(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module names where the BN takes the conv's output and nothing else does.

    "conv" is a plain ``nn.Conv2d`` or a module with a ``fuse_batchnorm(bn)`` method.

    Uses an ``torch.fx`` trace of the module graph; if the model cannot be traced,
    falls back to adjacent (conv, BN) pairs inside ``nn.Sequential`` containers, which
    are exact by construction.
    """
    check_module(model)
    modules = dict(model.named_modules())
    try:
        with _hooks_set_aside(model):  # user hooks must not see fx proxies (nor fail the trace on them)
            graph = _PairTracer().trace(model)
    except Exception as error:  # any untraceable forward: use the structural fallback
        warnings.warn(
            f"deploy: could not fx-trace {type(model).__name__} ({type(error).__name__}); "
            "folding BatchNorm only inside nn.Sequential",
            UserWarning,
            stacklevel=3,
        )
        return _sequential_pairs(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _foldable(modules[node.target]) or len(node.args) != 1:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        if not _accepts_bn(modules[source.target]) or len(source.users) != 1:
            continue
        if calls[source.target] == 1 and calls[node.target] == 1:
            pairs.append((source.target, node.target))
    return pairs


def _accepts_bn(module: nn.Module) -> bool:
    """A plain nn.Conv2d, or any module offering ``fuse_batchnorm(bn) -> module`` (e.g. CAC's sparse form)."""
    return type(module) is nn.Conv2d or callable(getattr(module, "fuse_batchnorm", None))


def _fuse_pair(source: nn.Module, bn: nn.BatchNorm2d) -> nn.Module:
    if type(source) is nn.Conv2d:
        return fuse_conv_bn_eval(source, bn)
    return source.fuse_batchnorm(bn)


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (conv_name, conv), (bn_name, bn) in itertools.pairwise(children):
            if _accepts_bn(conv) and _foldable(bn):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + conv_name, prefix + bn_name))
    return pairs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child_name, module)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm into the conv that alone feeds it, in place.

    A plain ``nn.Conv2d`` is fused with ``torch.nn.utils.fusion.fuse_conv_bn_eval``; any other
    module that offers ``fuse_batchnorm(bn)`` (an exact fold of its own) is replaced by what that
    returns. The BN becomes ``nn.Identity``. Returns ``model``.
    """
    check_module(model)
    model.eval()
    for conv_name, bn_name in find_conv_bn_pairs(model):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        fused, stand_in = _fuse_pair(conv, bn), _bn_replacement(bn)
        carry_hooks(conv, fused)
        carry_hooks(bn, stand_in)  # what stands in for the BN outputs what the BN output: the fused conv's output
        _set_submodule(model, conv_name, fused)
        _set_submodule(model, bn_name, stand_in)
    return model


def deploy(model: nn.Module, *, inplace: bool = False, fold_bn: bool = True) -> nn.Module:
    """The inference form of ``model``, in eval mode, made of plain torch modules where possible.

    Every operator with a deploy form is folded (``fuse()`` / ``reparameterize()``), then
    each BatchNorm that follows a conv is folded into it. The result computes what
    ``model.eval()`` computes and can be exported with ``torch.export`` or ONNX.

    Raises:
        TypeError: ``model`` is not a module, ``inplace`` / ``fold_bn`` not a bool, or a module's
            ``fuse()`` returned something other than a module.
    """
    check_module(model)
    check_bool(inplace, "inplace")
    check_bool(fold_bn, "fold_bn")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    model = reparameterize(model)
    model.eval()
    if fold_bn:
        model = fold_batchnorm(model)
    return model
