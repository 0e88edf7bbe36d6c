"""``convzoo compare``: train one model with several operators and print a paper-style table."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from convzoo.commands.train import HELP, add_config_flags

    parser = subparsers.add_parser(
        "compare",
        help="train a model with several conv kinds over seeds; Markdown/CSV table and accuracy-vs-MACs PNG",
    )
    parser.add_argument("--convs", required=True, help="comma-separated kinds, e.g. standard,doconv,cpwc")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per kind (0..N-1); top-1 is mean ± std")
    parser.add_argument("--recipe", default=None, help=HELP["recipe"])
    add_config_flags(parser, skip=("conv", "seed", "output"))
    parser.add_argument(
        "--output", default=None, help="folder for the runs and tables (default runs/compare-{model}-{data})"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from convzoo.commands.train import check_model, config_overrides
    from convzoo.train.compare import compare, markdown, write_outputs
    from convzoo.train.distributed import check_device

    overrides = config_overrides(args)
    overrides.pop("output", None)
    model = overrides.pop("model", None)
    data = overrides.pop("data", None)
    convs = [c.strip() for c in args.convs.split(",") if c.strip()]
    recipe = {}
    if args.recipe:
        from convzoo.train.config import load_recipe

        recipe = load_recipe(args.recipe)
        model, data = model or recipe.get("model"), data or recipe.get("data")
    model, data = model or "cifar_resnet20", data or "digits"
    check_model(model)  # before any training: a bad name is not one conv kind's fault
    check_device(overrides.get("device") or recipe.get("device") or "auto")
    output = args.output or f"runs/compare-{model.replace(':', '_')}-{data}"
    comparison = compare(model, convs, data=data, seeds=args.seeds, recipe=args.recipe, output=output, **overrides)
    if not comparison.rows:
        raise ValueError(f"none of the convs {convs} could be trained on {model}")
    title = f"{model} on {data}"
    paths = write_outputs(comparison, title)
    print()
    print(markdown(comparison, title))
    print(f"wrote {paths['md']}, {paths['csv']} and {paths['png']}")
    return 0
