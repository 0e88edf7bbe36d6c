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


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (
            {"scheduler": "multistep", "milestones": [1], "gamma": -1.0},
            r"gamma must be a finite number in \(0, 1\], got -1.0",
        ),
        ({"scheduler": "step", "gamma": -0.5}, r"gamma must be .* got -0.5"),
        ({"gamma": 0.0}, r"gamma must be a finite number in \(0, 1\], got 0.0"),
        ({"gamma": 10.0}, r"gamma must be a finite number in \(0, 1\], got 10.0"),
        ({"gamma": NAN}, r"gamma must be .* got nan"),
        ({"min_lr": 5.0, "lr": 0.1}, r"min_lr \(5.0\) must be <= lr \(0.1\)"),
        ({"min_lr": -1.0}, r"min_lr must be a finite number >= 0, got -1.0"),
        ({"momentum": 1.5}, r"momentum must be a finite number in \[0, 1\), got 1.5"),
        ({"momentum": 1.0}, r"momentum must be .* got 1.0"),
        ({"momentum": 0.0}, r"nesterov=True needs momentum > 0.*--nesterov false"),
        ({"lr": NAN}, r"lr must be a finite number >= 0, got nan"),
        ({"lr": INF}, r"lr must be a finite number >= 0, got inf"),
        ({"weight_decay": NAN}, r"weight_decay must be .* got nan"),
        ({"momentum": NAN}, r"momentum must be .* got nan"),
        ({"cac_lambda": NAN}, r"cac_lambda must be .* got nan"),
        ({"warmup_epochs": NAN}, r"warmup_epochs must be .* got nan"),
        ({"label_smoothing": NAN}, r"label_smoothing must be .* got nan"),
        ({"label_smoothing": 1.0}, r"label_smoothing must be a finite number in \[0, 1\), got 1.0"),
        ({"ema": NAN}, r"ema must be a decay in \[0, 1\) \(0 = off\), got nan"),
        ({"num_classes": 0}, r"num_classes must be an int >= 1 \(or null/none for the data's own class count\), got 0"),
        ({"num_classes": -5}, r"num_classes must be an int >= 1 .* got -5"),
        ({"image_size": 0}, r"image_size must be an int >= 1 .* got 0"),
        ({"epochs": 0}, r"epochs must be an int >= 1, got 0"),
        ({"train_subset": -1}, r"train_subset must be an int >= 0, got -1"),
        ({"scheduler": "step", "step_size": 0}, r"step_size must be an int >= 1, got 0"),
        ({"milestones": [0.5]}, r"config key 'milestones' must be a list of ints, e.g. \[82, 123\], got \[0.5\]"),
        ({"milestones": ["a", "b"]}, r"config key 'milestones' must be a list of ints.*got \['a', 'b'\]"),
        ({"milestones": [0, 2]}, r"milestones must be a list of strictly increasing epochs >= 1.*got \[0, 2\]"),
        ({"milestones": [3, 2]}, r"milestones must be a list of strictly increasing epochs >= 1.*got \[3, 2\]"),
        ({"milestones": [2, 2]}, r"milestones must be a list of strictly increasing epochs >= 1.*got \[2, 2\]"),
    ],
)
def test_bad_numbers_name_the_setting_and_what_is_allowed(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_config(**changes)


def test_numbers_that_stay_allowed() -> None:
    assert make_config(gamma=1.0, min_lr=0.1, lr=0.1, momentum=0.0, nesterov=False).gamma == 1.0
    assert make_config(optimizer="adamw", momentum=0.0).momentum == 0.0  # AdamW does not use momentum
    assert make_config(scheduler="step", min_lr=5.0, lr=0.1).min_lr == 5.0  # min_lr only floors cosine
    assert make_config(num_classes=None).num_classes is None  # None: the data's class count
    assert TrainConfig(milestones=[1, 2], epochs=3, scheduler="multistep").milestones == [1, 2]


def test_milestones_the_run_never_reaches_warn(recwarn: pytest.WarningsRecorder) -> None:
    with pytest.warns(UserWarning, match=r"milestones \[82, 123\] are not before epochs \(2\)"):
        make_config("doconv-cifar", epochs=2)  # a short run of the paper schedule, perhaps resumed later
    with pytest.warns(UserWarning, match=r"milestones \[3\] are not before epochs \(3\)"):
        make_config(scheduler="multistep", milestones=[1, 3], epochs=3)
    recwarn.clear()
    make_config(scheduler="multistep", milestones=[1, 2], epochs=3)
    make_config(scheduler="cosine", milestones=[5], epochs=3)  # unused by cosine
    assert not [w for w in recwarn if "milestones" in str(w.message)]


def test_recipe_file_errors(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("epochs: [1\n")
    with pytest.raises(
        ValueError, match=r"recipe '.*bad.yaml' is not valid YAML: expected ',' or '\]'.* at line 2, column 1"
    ):
        load_recipe(str(recipe))
    recipe.write_text("milestones: [a, b]\nscheduler: multistep\n")
    with pytest.raises(ValueError, match=r"config key 'milestones' must be a list of ints"):
        load_recipe(str(recipe))
    recipe.write_text("milestones: [0.5]\n")
    with pytest.raises(ValueError, match=r"config key 'milestones' must be a list of ints"):
        load_recipe(str(recipe))
    with pytest.raises(ValueError, match=r"recipe file '.*missing.yaml' does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_recipe_floats_without_a_dot_are_floats(tmp_path: Path) -> None:
    """YAML 1.1 (PyYAML's default) reads 1e-3 as a string; recipes read it as YAML 1.2 does, as a float."""
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("lr: 1e-3\nweight_decay: 5E-4\nmin_lr: +2e-6\nwarmup_epochs: 1e0\nbatch_size: 1e2\nepochs: 3\n")
    assert load_recipe(str(recipe)) == {
        "lr": 0.001,
        "weight_decay": 0.0005,
        "min_lr": 2e-6,
        "warmup_epochs": 1.0,
        "batch_size": 100,  # an int field takes a float only when it is a whole number
        "epochs": 3,
    }
    config = make_config(str(recipe))
    assert (config.lr, config.batch_size) == (0.001, 100) and isinstance(config.batch_size, int)
    recipe.write_text("epochs: 2.5e0\n")
    with pytest.raises(ValueError, match=r"config key 'epochs' must be int, got 2.5"):
        load_recipe(str(recipe))
    recipe.write_text("description: 1e\n")  # not a number: stays a string
    assert load_recipe(str(recipe)) == {"description": "1e"}


def test_config_yaml_with_number_like_strings_reads_back_as_written(tmp_path: Path) -> None:
    """--output 1e3 / --description 2e5 were written unquoted and read back as floats by the recipe loader, so
    resuming from the run's own config.yaml failed ("config key 'description' must be str")."""
    config = TrainConfig(model="cifar_resnet20", data="digits", output="1e3", description="2e5")
    saved = tmp_path / "config.yaml"
    saved.write_text(config.to_yaml())
    assert "output: '1e3'" in saved.read_text()
    assert make_config(str(saved)) == config
