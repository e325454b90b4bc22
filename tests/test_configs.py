"""Every config group composes and instantiates; bad choices and values are named with what is accepted."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException, MissingConfigException
from hydra.utils import instantiate

from heistlab import loggers
from heistlab.attacks import Attack
from heistlab.compose import build_defense, build_model_from, build_splits, defender_data, train_config_from
from heistlab.defenses import Defense
from heistlab.experiment import build_attack

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# Defense configs whose factory trains models (EDM's ensemble, the misinformation model): instantiating them
# takes seconds.
TRAINS_MODELS = {"edm", "adaptive_misinformation"}
# The shipped EDM ensemble (five 256-256 MLPs, 50 epochs) trains for seconds: its configuration is composed
# and built here, not its size (tests/test_defense_contract.py shrinks it the same way).
SMALLER = {"edm": ["defense.hidden=[8]", "defense.epochs=2"]}


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIGS / group).glob("*.yaml"))


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.slow) if name in TRAINS_MODELS else name
        for name in options("defense")
    ],
)
def test_every_defense_config_instantiates(name, digits_splits):
    cfg = composed(f"defense={name}", *SMALLER.get(name, ()))
    defense = build_defense(cfg.defense, defender_data(cfg, digits_splits))
    assert isinstance(defense, Defense)


@pytest.mark.parametrize("name", options("attack"))
def test_every_attack_config_instantiates_and_sets_the_api_budget(name):
    budget = 1234  # above every attack's minimum (maze: one generator and one clone step, 192)
    cfg = composed(f"attack={name}", f"attack.budget={budget}")
    attack, allow_mismatched_victim = build_attack(cfg.attack)
    assert isinstance(attack, Attack) and attack.budget == budget and cfg.api.budget == budget
    assert allow_mismatched_victim is False


@pytest.mark.slow
@pytest.mark.parametrize("group", ["victim", "surrogate"])
def test_every_model_config_builds(group):
    for name in set(options(group)) - {"onnx", "callable"}:  # loaded whole, never built: tested apart
        spec = composed(f"{group}={name}")[group]
        assert build_model_from(spec, 10).num_classes == 10
        assert train_config_from(spec.train).validated().epochs >= 1


@pytest.mark.parametrize("name", options("data"))
def test_every_data_config_composes_and_embedded_ones_load(name):
    cfg = composed(f"data={name}")
    assert cfg.data.name == name
    if name in ("digits", "synthetic", "synthetic_cifar"):
        splits = build_splits(cfg)
        assert len(splits.pool) > 0 and len(splits.test.y) > 0


def test_every_logger_config_instantiates(tmp_path):
    assert options("logger") == ["jsonl", "wandb"]
    jsonl = instantiate(composed("logger=jsonl").logger, output_dir=tmp_path)
    assert isinstance(jsonl, loggers.JsonlLogger)
    assert composed("logger=wandb").logger._target_ == "heistlab.loggers.WandbLogger"


def test_unknown_defense_names_the_available_ones():
    with pytest.raises(MissingConfigException) as error:
        composed("defense=firewall")
    message = str(error.value)
    assert "firewall" in message and "rounding" in message and "reverse_sigmoid" in message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("defense.decimals=-1", "decimals"),
        ("defense.decimals=abc", "decimals"),
    ],
)
def test_bad_defense_value_is_named(override, message):
    cfg = composed("defense=rounding", override)
    with pytest.raises(InstantiationException, match=message):
        instantiate(cfg.defense)


def test_bad_attack_value_is_named():
    with pytest.raises(InstantiationException, match="knockoff: budget must be an integer >= 1, got -5"):
        instantiate(composed("attack.budget=-5").attack)


def test_unknown_pool_source_is_named():
    with pytest.raises(ValueError, match="data.pool must be one of in_distribution, uniform, digits"):
        build_splits(composed("data.pool=imagenet"))
