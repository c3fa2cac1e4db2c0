"""Models written as users write them (``scripts/check_user_models.py``) pass the
checks before compression: none is refused by mistake, and exactly those with
int8 arithmetic QAT does not model are sent to the int8 preflight, and those that
cannot be compressed as written are refused in one line."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from ucpjax import from_nnx
from ucpjax.config import ConfigError
from ucpjax.model import Model, check_model, check_quantizable, with_train_argument

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE = (28, 28, 1)
# The models whose every operation on activations QAT reproduces.
MODELED = {"BiasConvAvg", "SeqNet", "DepthMult", "GlobalMax", "Concat", "ResBlock",
           "DilatedConv", "PointwiseDense", "SetupBlocks", "GroupedConv", "DropoutMlp",
           "Bf16Params", "TrainingKwarg", "DeterministicKwarg", "PlainCall", "NnxDepthwise",
           "NnxDepthwiseGap"}
# The models refused before any work, and what their one line says.
REFUSED = {"BareResidual": "bare mean", "AvgPoolGap": "whole-map pool",
           "Bf16Compute": "computes in bfloat16",
           "TupleOut": "returns a tuple of 2 outputs", "NnxDepthwiseMean": "bare mean",
           "NnxHandParam": "parameter 'w' is outside the layers"}


def _zoo():
    spec = importlib.util.spec_from_file_location("check_user_models",
                                                  ROOT / "scripts" / "check_user_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its Flax modules are dataclasses, which look it up
    spec.loader.exec_module(module)
    return module.MODELS


ZOO = _zoo()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_a_users_model_passes_the_checks_and_is_sent_to_the_preflight_if_needed(name):
    sample = np.random.default_rng(0).random((4, *SHAPE), np.float32)
    if name in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[name]) as refusal:
            model = _as_compress_takes_it(ZOO[name], sample)
            check_model(model, SHAPE, 10, sample=sample)
            check_quantizable(model, SHAPE)
        assert "\n" not in str(refusal.value)
        return
    model = _as_compress_takes_it(ZOO[name], sample)
    check_model(model, SHAPE, 10, sample=sample)
    unmodeled = check_quantizable(model, SHAPE)
    assert (unmodeled == []) == (name in MODELED), unmodeled


def _as_compress_takes_it(cls, sample) -> Model:
    """A linen module adapted to ``(x, train)``, an nnx model lifted to linen."""
    if issubclass(cls, nnx.Module):
        return Model(*from_nnx.lift(cls(nnx.Rngs(0))))
    module = with_train_argument(cls())[0]
    return Model(module, dict(module.init(jax.random.key(0), sample[:1])))


@pytest.mark.parametrize("name", ["TrainingKwarg", "DeterministicKwarg", "PlainCall"])
def test_a_module_with_another_train_switch_is_adapted_with_the_same_variables(name):
    module = ZOO[name]()
    x = np.random.default_rng(0).random((8, *SHAPE), np.float32)
    variables = module.init(jax.random.key(0), x[:1])
    adapted, switch = with_train_argument(module)
    assert switch == {"TrainingKwarg": "training", "DeterministicKwarg": "deterministic",
                      "PlainCall": None}[name]
    assert jax.tree.structure(adapted.init(jax.random.key(0), x[:1])) == \
        jax.tree.structure(variables)
    np.testing.assert_array_equal(adapted.apply(variables, x, train=False),
                                  module.apply(variables, x))
    trained = adapted.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    # The switch reaches Dropout: in training some units drop, so the logits move.
    assert (switch is None) == np.array_equal(trained, module.apply(variables, x))
