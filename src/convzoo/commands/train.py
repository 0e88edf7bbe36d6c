"""``convzoo train``: train one model with a recipe, every recipe value overridable by a flag."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from convzoo.train.config import FIELDS, field_type

# Flags whose help text says more than the field name.
HELP = {
    "recipe": "bundled recipe name (see --list-recipes) or a YAML file",
    "conv": "'standard' or an operator kind (convzoo convs)",
    "data": "cifar10, cifar100, stl10, imagefolder, imagenet32, digits or fake",
    "data_dir": "data folder (ImageFolder root with train/ and test/, or torchvision's layout)",
    "output": "run folder; {model} {conv} {data} {seed} are filled in",
    "augment": "crop_flip (pad-4 crop + flip), crop, flip or none",
    "amp": "off, bf16 (CPU or CUDA), fp16 (CUDA, with GradScaler) or auto",
    "ema": "EMA decay of the weights (0 = off)",
    "milestones": "epochs at which multistep divides the rate, e.g. 82,123",
    "checkpoint_every": "also checkpoint every N steps within an epoch (0 = at epoch ends only)",
    "train_subset": "use only the first N training images of each class (0 = all)",
    "test_subset": "use only the first N test images of each class (0 = all)",
    "cac_lambda": "lambda of CAC's cost-aware loss (used when the model has CAC layers)",
    "num_classes": "classifier size, >= 1 (default, or 'none': the data's class count)",
    "image_size": "resize images to N x N, >= 1 (default, or 'none': the data's own size)",
    "device": "auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps",
    "gamma": "rate factor at each milestone (multistep) or step_size (step), in (0, 1]",
    "min_lr": "floor of the cosine schedule, in [0, lr]",
    "momentum": "SGD momentum (max momentum of onecycle), in [0, 1)",
}


# argparse names a converter by its __name__ when it raises ValueError ("invalid int value: 'x'"); these raise
# ArgumentTypeError with a message of their own, and carry readable names in case one is ever shown.


def _milestones(text: str) -> list[int]:
    if not text.strip():  # --milestones '': no milestones
        return []
    items = [item.strip() for item in text.split(",")]
    try:
        if "" in items:
            raise ValueError
        return [int(item) for item in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints such as 82,123, got {text!r}") from None


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional_int(text: str) -> int | None:
    if text.lower() in ("none", "null", ""):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or none, got {text!r}") from None


def _float_or_bool(text: str) -> float | bool:
    if text.lower() in ("true", "false", "on", "off", "yes", "no"):
        return _bool(text)
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, true or false, got {text!r}") from None


_milestones.__name__ = "comma-separated ints"
_bool.__name__ = "true/false"
_optional_int.__name__ = "int or none"
_float_or_bool.__name__ = "number or true/false"


def add_config_flags(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per ``TrainConfig`` field, default None (= keep the recipe's value)."""
    for name in FIELDS:
        if name in skip:
            continue
        base, optional = field_type(name)
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"default": None, "help": HELP.get(name, name.replace("_", " "))}
        if name == "ema":
            kwargs["type"] = _float_or_bool
        elif base is bool:
            kwargs.update(nargs="?", const=True, type=_bool, metavar="BOOL")
        elif base is list:
            kwargs["type"] = _milestones
        elif base is int:
            kwargs["type"] = _optional_int if optional else int
        elif base is float:
            kwargs["type"] = float
        parser.add_argument(flag, dest=name, **kwargs)


def check_model(name: str) -> None:
    """ValueError up front for a model name that neither the zoo nor torchvision/timm (tv:/timm:) knows."""
    from convzoo.models.registry import get_model_entry

    source, _, external = name.partition(":")
    if source == "tv" and external:
        import torchvision

        if external not in torchvision.models.list_models():
            raise ValueError(f"unknown torchvision model {external!r}; see torchvision.models.list_models()")
    elif source == "timm" and external:
        import timm

        if not timm.is_model(external):
            raise ValueError(f"unknown timm model {external!r}; see timm.list_models()")
    else:
        try:
            get_model_entry(name)
        except ValueError as error:
            raise ValueError(f"{error}; 'convzoo models' lists the zoo's models") from None


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line."""
    return {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model (recipes: --list-recipes); runs under torchrun too",
        description="Train a model. Values come from the defaults, then --recipe, then the flags.",
    )
    parser.add_argument("--recipe", default=None, help=HELP["recipe"])
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="PATH",
        help="continue the run in --output (or the checkpoint/run folder PATH)",
    )
    parser.add_argument("--list-recipes", action="store_true", help="list bundled recipes and exit")
    add_config_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from convzoo.train import distributed
    from convzoo.train.config import list_recipes, load_recipe, make_config
    from convzoo.train.engine import CHECKPOINT_NAME, TrainingDivergedError, train

    if args.list_recipes:
        for name in list_recipes():
            print(f"{name:<26} {load_recipe(name).get('description', '')}")
        return 0
    config = None
    try:
        config = make_config(args.recipe, **config_overrides(args))
        check_model(config.model)
        distributed.check_device(config.device)
        result = train(config, resume=args.resume)
    except TrainingDivergedError as error:
        print(f"convzoo train: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        run_dir = None
        with contextlib.suppress(ValueError):  # a bad output template: no run folder either
            run_dir = config.output_dir() if config is not None else None
        if run_dir is None or not ((run_dir / CHECKPOINT_NAME).exists() or (run_dir / "config.yaml").exists()):
            # stopped before the run folder was written (loading data, say): --resume would find no run there
            args.interrupt_hint = "; nothing was trained yet: rerun the same command to start over"
        raise
    finally:
        distributed.cleanup()
    if result.is_main and result.final is not None:
        print(
            f"top-1 {result.final.top1:.4f}  top-5 {result.final.top5:.4f}  "
            f"({result.images_per_second:,.0f} images/s); run folder {result.run_dir}"
        )
    return 0
