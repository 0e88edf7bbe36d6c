"""``TrainConfig``: every setting of a run, from a YAML recipe overridden by flags.

Recipes are flat YAML mappings in ``convzoo/train/recipes/<name>.yaml`` whose keys are
field names of ``TrainConfig``; an unknown key is an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "multistep", "step", "onecycle", "constant")
AMP_MODES = ("off", "bf16", "fp16", "auto")


def _interval(minimum: float | None, maximum: float | None, above: float | None, below: float | None) -> str:
    low = f"[{minimum:g}" if minimum is not None else f"({above:g}" if above is not None else None
    high = f"{maximum:g}]" if maximum is not None else f"{below:g})" if below is not None else None
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f">= {minimum:g}" if minimum is not None else f"> {above:g}"
    return f"<= {maximum:g}" if maximum is not None else f"< {below:g}"


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    integer: bool = False,
    what: str | None = None,
) -> None:
    """Raise ValueError unless ``value`` is a finite number (an int if ``integer``) in the given range.

    ``minimum``/``maximum`` are inclusive bounds, ``above``/``below`` exclusive ones. NaN and
    infinities are always refused (``nan < 0`` is False, so a bare comparison lets NaN through).
    """
    kind = "an int" if integer else "a finite number"
    bounds = (minimum, maximum, above, below)
    allowed = what or (f"{kind} {_interval(*bounds)}" if any(b is not None for b in bounds) else kind)
    numeric = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric) or not math.isfinite(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if (
        (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
        or (above is not None and value <= above)
        or (below is not None and value >= below)
    ):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_milestones(milestones: Any) -> None:
    """Raise ValueError unless ``milestones`` is a list of strictly increasing epochs >= 1."""
    allowed = "a list of strictly increasing epochs >= 1, e.g. [82, 123]"
    if not isinstance(milestones, list | tuple) or not all(
        isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in milestones
    ):
        raise ValueError(f"milestones must be {allowed}, got {milestones!r}")
    if any(a >= b for a, b in itertools.pairwise(milestones)):
        raise ValueError(f"milestones must be {allowed}, got {list(milestones)}")


@dataclass
class TrainConfig:
    """One training run. Recipe keys come first; the rest are run options (also settable in YAML)."""

    description: str = ""
    model: str = "cifar_resnet20"
    conv: str = "standard"
    data: str = "digits"
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    scheduler: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    step_size: int = 30
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    image_size: int | None = None
    augment: str = "crop_flip"
    ema: float = 0.0
    amp: str = "off"
    channels_last: bool = False
    num_classes: int | None = None
    # ---- run options
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None
    cache_dir: str | None = None
    download: bool = False
    output: str = "runs/{model}-{conv}-{data}-s{seed}"
    compile: bool = False
    deterministic: bool = False
    sync_bn: bool = False
    checkpoint_every: int = 0
    eval_every: int = 1
    cac_lambda: float = 0.3
    train_subset: int = 0
    test_subset: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is not allowed."""
        choices = {"optimizer": OPTIMIZERS, "scheduler": SCHEDULERS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.amp is True:
            self.amp = "auto"
        elif self.amp is False or self.amp is None:
            self.amp = "off"
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)} (or true/false), got {self.amp!r}")
        if self.ema is True:
            self.ema = 0.9998
        elif self.ema is False or self.ema is None:
            self.ema = 0.0
        from convzoo.data.augment import parse_augment

        self.augment = parse_augment(self.augment)
        for name in ("epochs", "batch_size", "eval_every"):
            check_number(name, getattr(self, name), minimum=1, integer=True)
        for name in ("checkpoint_every", "train_subset", "test_subset"):
            check_number(name, getattr(self, name), minimum=0, integer=True)
        for name, default in (("image_size", "size"), ("num_classes", "class count")):
            if getattr(self, name) is not None:  # None: the data's own
                what = f"an int >= 1 (or null/none for the data's own {default})"
                check_number(name, getattr(self, name), minimum=1, integer=True, what=what)
        for name in ("lr", "weight_decay", "warmup_epochs", "min_lr", "cac_lambda"):
            check_number(name, getattr(self, name), minimum=0)
        check_number("label_smoothing", self.label_smoothing, minimum=0, below=1)
        check_number("momentum", self.momentum, minimum=0, below=1)
        # gamma multiplies the rate at each milestone / step: > 0 (else the rate turns negative, i.e.
        # gradient ascent) and <= 1 (the schedules are decays; 10 is likely meant as "divide by 10").
        check_number("gamma", self.gamma, above=0, maximum=1)
        check_number("ema", self.ema, minimum=0, below=1, what="a decay in [0, 1) (0 = off)")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0, got momentum=0; pass --nesterov false for plain SGD")
        if self.scheduler == "cosine" and self.min_lr > self.lr:
            raise ValueError(
                f"min_lr ({self.min_lr}) must be <= lr ({self.lr}): cosine would raise the rate towards min_lr"
            )
        if self.warmup_epochs >= self.epochs and self.scheduler != "constant":
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be < epochs ({self.epochs}); pass a smaller --warmup-epochs"
            )
        check_milestones(self.milestones)
        if self.scheduler == "multistep" and not self.milestones:
            raise ValueError("scheduler 'multistep' needs milestones (epochs), e.g. milestones: [82, 123]")
        if self.scheduler == "step":
            check_number("step_size", self.step_size, minimum=1, integer=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_RecipeDumper, sort_keys=False)

    def output_dir(self) -> Path:
        """``output`` with ``{model}``, ``{conv}``, ``{data}``, ``{seed}`` filled in."""
        fields = {k: str(v).replace(":", "_") for k, v in self.to_dict().items()}
        try:
            return Path(self.output.format(**fields))
        except (KeyError, IndexError, ValueError):
            raise ValueError(
                f"output {self.output!r} may only use the placeholders {{model}}, {{conv}}, {{data}}, {{seed}} "
                "(or any other config key)"
            ) from None


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def field_type(name: str) -> tuple[type, bool]:
    """(base type, optional) of a field, e.g. ``image_size`` -> (int, True), ``milestones`` -> (list, False)."""
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    if optional:
        hint = args[0]
    origin = typing.get_origin(hint)
    return (origin or hint), optional


def coerce(name: str, value: Any) -> Any:
    """Check/convert one value to the type of field ``name`` (ints accepted for floats)."""
    if name not in FIELDS:
        raise ValueError(f"unknown config key {name!r}; allowed keys: {', '.join(FIELDS)}")
    base, optional = field_type(name)
    if value is None and optional:
        return None
    if name in ("amp", "augment", "ema") and isinstance(value, bool):
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, float) and value.is_integer():  # 1e2 (a float in YAML) is exactly 100
        return int(value)
    if base is list:  # milestones: a list of ints (checked further by TrainConfig.validate)
        if isinstance(value, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise ValueError(f"config key {name!r} must be a list of ints, e.g. [82, 123], got {value!r}")
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise ValueError(f"config key {name!r} must be {base.__name__}{' or null' if optional else ''}, got {value!r}")


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads YAML 1.2 floats without a dot, such as ``1e-3`` or ``5E-4`` (YAML 1.1,
    PyYAML's default, reads them as strings)."""


class _RecipeDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that knows ``_RecipeLoader``'s floats, so it quotes a string such as ``'1e3'`` (an
    ``--output`` or ``--description``) and the ``config.yaml`` it writes reads back as written."""


for _resolver_class in (_RecipeLoader, _RecipeDumper):
    _resolver_class.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )


def list_recipes() -> list[str]:
    """Names of the bundled recipes (``--recipe NAME``)."""
    folder = resources.files("convzoo.train") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """The mapping of a bundled recipe name or a YAML file path, keys checked and values coerced."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ValueError(f"recipe file {name_or_path!r} does not exist (or is not a file)")
        text = path.read_text()
    else:
        bundled = resources.files("convzoo.train") / "recipes" / f"{name_or_path}.yaml"
        if not bundled.is_file():
            raise ValueError(f"unknown recipe {name_or_path!r}; bundled recipes: {', '.join(list_recipes())}")
        text = bundled.read_text()
    try:
        mapping = yaml.load(text, Loader=_RecipeLoader) or {}  # a SafeLoader: plain data only
    except yaml.YAMLError as error:
        raise ValueError(f"recipe {name_or_path!r} is not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(mapping, dict):
        raise ValueError(f"recipe {name_or_path!r} must be a YAML mapping, got {type(mapping).__name__}")
    return {key: coerce(key, value) for key, value in mapping.items()}


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: YAML's problem and where (1-based line and column)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark, context = error.problem_mark, error.context_mark
        text = f"{error.problem} at line {mark.line + 1}, column {mark.column + 1}"
        if error.context and context is not None:
            text += f" ({error.context} started at line {context.line + 1}, column {context.column + 1})"
        return text
    return " ".join(str(error).split())


def make_config(recipe: str | None = None, **overrides: Any) -> TrainConfig:
    """A ``TrainConfig`` from defaults, then ``recipe``, then ``overrides`` (None values are ignored).

    Warns (UserWarning) when multistep milestones are not all before ``epochs``: those decays never
    happen in this run. That is not an error, since a short run of a paper recipe (``--epochs 2``)
    may later be resumed with more epochs, where they apply.
    """
    values = load_recipe(recipe) if recipe else {}
    values.update({key: coerce(key, value) for key, value in overrides.items() if value is not None})
    config = TrainConfig(**values)
    late = [m for m in config.milestones if m >= config.epochs]
    if config.scheduler == "multistep" and late:
        warnings.warn(
            f"milestones {late} are not before epochs ({config.epochs}), so the rate is not decayed there in this "
            "run (they apply if it is resumed with more epochs); pass --milestones to decay within it",
            UserWarning,
            stacklevel=2,
        )
    return config


def config_from_json(text: str) -> TrainConfig:
    """Rebuild a config saved with ``json.dumps(config.to_dict())`` (checkpoints store it this way)."""
    values = json.loads(text)
    return TrainConfig(**{key: value for key, value in values.items() if key in FIELDS})
