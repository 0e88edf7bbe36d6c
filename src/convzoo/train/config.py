"""``TrainConfig``: every setting of a run, from a YAML recipe overridden by flags.

Recipes are flat YAML mappings in ``convzoo/train/recipes/<name>.yaml`` whose keys are
field names of ``TrainConfig``; an unknown key is an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "multistep", "step", "onecycle", "constant")
AMP_MODES = ("off", "bf16", "fp16", "auto")


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
        positive = ("epochs", "batch_size", "eval_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        nonnegative = (
            "lr",
            "weight_decay",
            "warmup_epochs",
            "min_lr",
            "label_smoothing",
            "checkpoint_every",
            "cac_lambda",
            "train_subset",
            "test_subset",
            "momentum",
        )
        for name in nonnegative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be a decay in [0, 1) (0 = off), got {self.ema}")
        if self.label_smoothing >= 1.0:
            raise ValueError(f"label_smoothing must be < 1, got {self.label_smoothing}")
        if self.warmup_epochs >= self.epochs and self.scheduler != "constant":
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be < epochs ({self.epochs}); pass a smaller --warmup-epochs"
            )
        if self.scheduler == "multistep" and not self.milestones:
            raise ValueError("scheduler 'multistep' needs milestones (epochs), e.g. milestones: [82, 123]")
        if sorted(self.milestones) != list(self.milestones):
            raise ValueError(f"milestones must be increasing, got {self.milestones}")
        if self.scheduler == "step" and self.step_size < 1:
            raise ValueError(f"step_size must be >= 1, got {self.step_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

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
    if base is list and isinstance(value, list | tuple) and all(isinstance(v, int) for v in value):
        return list(value)
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise ValueError(f"config key {name!r} must be {base.__name__}{' or null' if optional else ''}, got {value!r}")


def list_recipes() -> list[str]:
    """Names of the bundled recipes (``--recipe NAME``)."""
    folder = resources.files("convzoo.train") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """The mapping of a bundled recipe name or a YAML file path, keys checked and values coerced."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text()
    else:
        bundled = resources.files("convzoo.train") / "recipes" / f"{name_or_path}.yaml"
        if not bundled.is_file():
            raise ValueError(f"unknown recipe {name_or_path!r}; bundled recipes: {', '.join(list_recipes())}")
        text = bundled.read_text()
    mapping = yaml.safe_load(text) or {}
    if not isinstance(mapping, dict):
        raise ValueError(f"recipe {name_or_path!r} must be a YAML mapping, got {type(mapping).__name__}")
    return {key: coerce(key, value) for key, value in mapping.items()}


def make_config(recipe: str | None = None, **overrides: Any) -> TrainConfig:
    """A ``TrainConfig`` from defaults, then ``recipe``, then ``overrides`` (None values are ignored)."""
    values = load_recipe(recipe) if recipe else {}
    values.update({key: coerce(key, value) for key, value in overrides.items() if value is not None})
    return TrainConfig(**values)


def config_from_json(text: str) -> TrainConfig:
    """Rebuild a config saved with ``json.dumps(config.to_dict())`` (checkpoints store it this way)."""
    values = json.loads(text)
    return TrainConfig(**{key: value for key, value in values.items() if key in FIELDS})
