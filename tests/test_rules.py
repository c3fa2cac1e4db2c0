"""Tests of ucpjax.rules (one rule type for per-layer settings) and of the layering."""

import subprocess
import sys

import jax.numpy as jnp
import pytest

from ucpjax import cluster, prune, quantize, rules
from ucpjax.rules import LayerRule

PARAMS = {"Conv_0": {"kernel": jnp.ones((3, 3, 1, 4)), "bias": jnp.ones((4,))},
          "Dense_0": {"kernel": jnp.ones((36, 10)), "bias": jnp.ones((10,))}}


def test_first_matching_rule_wins_and_unmatched_leaves_are_left_alone():
    chosen = (LayerRule(pattern="Conv_0/kernel", sparsity=0.5, clusters=8, bits=8),
              LayerRule(pattern="kernel$", sparsity=0.9))
    assert rules.rule_for("Conv_0/kernel", chosen) is chosen[0]
    assert rules.rule_for("Dense_0/kernel", chosen) is chosen[1]
    assert rules.rule_for("Dense_0/bias", chosen) is None
    assert list(rules.matched(PARAMS, chosen)) == ["Conv_0/kernel", "Dense_0/kernel"]
    assert rules.selected(PARAMS, chosen) == {"Conv_0": {"kernel": True, "bias": False},
                                              "Dense_0": {"kernel": True, "bias": False}}


def test_every_stage_reads_the_same_rules():
    chosen = (LayerRule(pattern="Conv_0", sparsity=0.0, clusters=0, bits=8),
              LayerRule(pattern="kernel$", clusters=4))
    targets = prune.leaf_targets(PARAMS, prune.PruneConfig(target_sparsity=0.8), chosen)
    assert targets["Conv_0"]["kernel"] is None  # sparsity 0: left dense
    assert targets["Dense_0"]["kernel"] == 0.8 and targets["Dense_0"]["bias"] is None
    config = cluster.ClusterConfig(num_clusters=16)
    assert cluster.layer_k("Conv_0/kernel", config, chosen) == 0
    assert cluster.layer_k("Dense_0/kernel", config, chosen) == 4
    assert cluster.layer_k("Dense_0/bias", config, chosen) == 0
    bits = quantize.weight_bits(PARAMS, quantize.QuantizeConfig(weight_bits=6), chosen)
    assert bits["Conv_0"]["kernel"] == 8 and bits["Dense_0"]["kernel"] == 6


@pytest.mark.parametrize("kwargs, field", [
    ({"pattern": "Dense_["}, "pattern"),
    ({"pattern": "x", "sparsity": 1.0}, "sparsity"),
    ({"pattern": "x", "sparsity": "0.5"}, "sparsity"),
    ({"pattern": "x", "clusters": 1}, "clusters"),
    ({"pattern": "x", "clusters": 300}, "clusters"),
    ({"pattern": "x", "bits": 9}, "bits"),
    ({"pattern": "x", "bits": True}, "bits"),
])
def test_bad_rules_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"\.{field}=") as err:
        LayerRule(**kwargs)
    assert "\n" not in str(err.value)


def test_repeated_calls_have_one_spelling():
    assert [rules.call_name("Dense_0", i) for i in range(3)] == [
        "Dense_0", "Dense_0#2", "Dense_0#3"]


def test_jax_side_never_imports_tensorflow():
    modules = ["ucpjax.pipeline", "ucpjax.experiment", "ucpjax.study", "ucpjax.cli",
               "ucpjax.prune", "ucpjax.distill", "ucpjax.cluster", "ucpjax.quantize",
               "ucpjax.export", "ucpjax.measure", "ucpjax.packing"]
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_weight_matrices_no_rule_selects_are_named():
    params = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)},
              "w": jnp.ones((5, 2)), "BatchNorm_0": {"scale": jnp.ones(3)}}
    assert rules.unselected_matrices(params, rules.DEFAULT_RULES) == {"w": 10}
    assert rules.unselected_matrices(params, (LayerRule(pattern=r"kernel$|^w$"),)) == {}
