import dataclasses

import pytest

from ucpjax.config import ConfigError, describe, override
from ucpjax.rules import DEFAULT_RULES, LayerRule
from ucpjax.train import TrainConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outer:
    name: str = "a"
    stages: tuple[str, ...] = ("x", "y")
    rules: tuple[LayerRule, ...] = DEFAULT_RULES
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


def test_override_nested_field_and_int_to_float():
    cfg = override(Outer(), ["train.learning_rate=1", "name=b"])
    assert cfg.train.learning_rate == 1.0 and cfg.name == "b"


def test_fraction_for_a_float_field_holding_an_int():
    cfg = override(Outer(train=TrainConfig(epochs=2)), ["train.epochs=2.5"])
    assert cfg.train.epochs == 2.5


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="train.learnig_rate"):
        override(Outer(), ["train.learnig_rate=0.1"])


def test_invalid_value_names_the_field():
    with pytest.raises(ConfigError, match=r"train.epochs=-1.0: must be > 0"):
        override(Outer(), ["train.epochs=-1"])


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="train.batch_size='big'"):
        override(Outer(), ["train.batch_size=big"])


@pytest.mark.parametrize("raw", ["[b, a]", "(b,a)", "b,a", "('b', 'a')", "['b', 'a']"])
def test_a_tuple_of_strings_takes_bare_words(raw):
    assert override(Outer(), [f"stages={raw}"]).stages == ("b", "a")


def test_a_tuple_of_rules_takes_dicts():
    raw = '[{"pattern": "Dense_0/kernel", "clusters": 64}, {"pattern": "kernel$"}]'
    assert override(Outer(), [f"rules={raw}"]).rules == (
        LayerRule(pattern="Dense_0/kernel", clusters=64), LayerRule(pattern="kernel$"))


@pytest.mark.parametrize("raw, named", [
    ('[{"pattern": "x", "clusers": 4}]', r"rules: unknown field 'clusers'; LayerRule has"),
    ('[{"clusters": 4}]', r"rules: .*missing .* 'pattern'"),
    ('[{"pattern": "x", "clusters": 1}]', r"rules: LayerRule\('x'\).clusters=1: must be"),
])
def test_a_bad_rule_is_refused_naming_it(raw, named):
    with pytest.raises(ConfigError, match=named):
        override(Outer(), [f"rules={raw}"])


def test_describe_lists_every_leaf():
    lines = list(describe(Outer()))
    assert "train.epochs = 10" in lines and "name = 'a'" in lines
