"""TrainConfig and recipes: every bundled recipe loads; unknown keys and bad values are errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from convzoo.train.config import TrainConfig, list_recipes, load_recipe, make_config


def test_every_bundled_recipe_is_valid() -> None:
    names = list_recipes()
    assert {"doconv-cifar", "cpwc-cifar100", "multiception-cifar", "cac-cifar", "cac-robustness"} <= set(names)
    for name in names:
        config = make_config(name)
        assert config.description, name


def test_paper_schedules() -> None:
    doconv = make_config("doconv-cifar")
    assert (doconv.epochs, doconv.milestones, doconv.weight_decay, doconv.scheduler) == (
        164,
        [82, 123],
        1e-4,
        "multistep",
    )
    multiception = make_config("multiception-cifar")
    assert (multiception.min_lr, multiception.weight_decay, multiception.nesterov) == (5e-5, 2e-4, True)
    cpwc = make_config("cpwc-cifar100")
    assert (cpwc.scheduler, cpwc.step_size, cpwc.gamma, cpwc.epochs) == ("step", 50, 0.2, 250)
    cac = make_config("cac-cifar")
    assert (cac.epochs, cac.milestones, cac.cac_lambda) == (400, [160, 240], 0.3)


def test_flags_override_recipe() -> None:
    config = make_config("doconv-cifar", epochs=3, lr=0.05, milestones=[1, 2], image_size=None)
    assert (config.epochs, config.lr, config.milestones, config.weight_decay) == (3, 0.05, [1, 2], 1e-4)


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        load_recipe(str(recipe))
    recipe.write_text("epochs: 3\nlr: 0.1\n")
    assert load_recipe(str(recipe)) == {"epochs": 3, "lr": 0.1}


def test_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        make_config("nope")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(ValueError, match="config key 'epochs' must be int"):
        make_config(epochs="ten")
    with pytest.raises(ValueError, match="multistep' needs milestones"):
        TrainConfig(scheduler="multistep")
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(epochs=2, warmup_epochs=2)
    with pytest.raises(ValueError, match="amp must be one of"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="ema must be a decay"):
        TrainConfig(ema=1.5)
    assert TrainConfig(amp=True).amp == "auto" and TrainConfig(ema=True).ema == 0.9998


def test_output_dir_template() -> None:
    config = TrainConfig(model="tv:resnet18", conv="doconv", data="fake", seed=3)
    assert config.output_dir() == Path("runs/tv_resnet18-doconv-fake-s3")
    with pytest.raises(ValueError, match="may only use the placeholders"):
        TrainConfig(output="runs/{nope}").output_dir()
