"""Gradual magnitude pruning: schedule, mask transform under jit, the prune stage."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ucpjax import constraints, data, models, prune, rules, train
from ucpjax.config import ConfigError
from ucpjax.recipe import STAGES, Recipe, StageInputs
from ucpjax.train import TrainConfig

TINY = TrainConfig(epochs=1, batch_size=128, learning_rate=1e-3)


@pytest.fixture(scope="module")
def mnist():
    return data.load("mnist").take(1024, 256)


@pytest.fixture(scope="module")
def lenet():
    model = models.create("lenet300")
    params = models.init(model, (28, 28, 1))["params"]
    return params, train.inference_fn(model, {})


def _zeros(w):
    return int(np.sum(np.asarray(w) == 0))


# --- schedule -------------------------------------------------------------------------

@pytest.mark.parametrize("step, expected", [
    (0, 0.2), (10, 0.2), (60, 0.9 - 0.7 * 0.5 ** 3), (35, 0.9 - 0.7 * 0.75 ** 3),
    (110, 0.9), (1000, 0.9)])
def test_polynomial_sparsity_known_values(step, expected):
    schedule = jax.jit(lambda t: prune.polynomial_sparsity(
        t, initial=0.2, target=0.9, begin_step=10, end_step=110))
    assert float(schedule(step)) == pytest.approx(expected, abs=1e-6)
    assert float(prune.polynomial_sparsity(step, initial=0.2, target=0.9, begin_step=10,
                                           end_step=110)) == pytest.approx(expected, abs=1e-6)


def test_polynomial_sparsity_power_and_degenerate_ramp():
    linear = prune.polynomial_sparsity(5, initial=0.0, target=0.5, begin_step=0, end_step=10,
                                       power=1)
    assert float(linear) == pytest.approx(0.25)
    # begin == end: a step to the target, not a division by zero.
    assert float(prune.polynomial_sparsity(4, initial=0.0, target=0.5, begin_step=5,
                                           end_step=5)) == 0.0
    assert float(prune.polynomial_sparsity(5, initial=0.0, target=0.5, begin_step=5,
                                           end_step=5)) == 0.5


# --- the mask transform ----------------------------------------------------------------

def _tiny_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"a": {"kernel": jax.random.normal(k1, (8, 8)), "bias": jnp.ones((8,))},
            "b": {"kernel": 0.1 * jax.random.normal(k2, (4, 8))}}


def _targets(params, target):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: target if rules.path_name(path).endswith("kernel") else None,
        params)


def test_keep_largest_is_a_stable_argsort_cut():
    """The bisection threshold prunes exactly what a stable sort's first k would,
    ties (masked -1, equal magnitudes, +-0, protected inf) by position."""
    def by_sort(scores, k):
        ranks = np.empty(scores.size, int)
        ranks[np.argsort(scores, kind="stable")] = np.arange(scores.size)
        return ranks >= k
    keep = jax.jit(prune._keep_largest)
    rng = np.random.default_rng(0)
    for size in (1, 7, 1000, 50_000):
        x = np.abs(rng.normal(size=size)).astype(np.float32)
        for value, share in ((-1.0, 0.4), (0.25, 0.1), (np.inf, 0.05), (0.0, 0.05), (-0.0, 0.05)):
            x[rng.random(size) < share] = value
        for k in sorted({0, 1, size // 3, size // 2, size - 1, size}):
            np.testing.assert_array_equal(np.asarray(keep(x, k)), by_sort(x, k), f"{size}, {k}")


def test_mask_transform_exact_zeros_every_step_without_recompiling():
    params = _tiny_params()
    begin, end, freq = 1, 7, 2
    tx = optax.chain(optax.sgd(0.05), prune.magnitude_pruning(
        _targets(params, 0.75), begin_step=begin, end_step=end, frequency=freq))
    traces = []

    @jax.jit
    def step(params, opt_state, grads):
        traces.append(1)  # runs only while tracing
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    pruned_before = {"a": np.zeros((8, 8), bool), "b": np.zeros((4, 8), bool)}
    for t in range(10):
        key = jax.random.key(t)
        grads = jax.tree.map(lambda p, k=key: jax.random.normal(k, p.shape), params)
        expected_next = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
        params, opt_state = step(params, opt_state, grads)
        masks = opt_state[-1].masks
        s = float(prune.polynomial_sparsity(t, initial=0.0, target=0.75, begin_step=begin,
                                            end_step=end))
        due = begin <= t <= end and ((t - begin) % freq == 0 or t == end)
        for name, size in (("a", 64), ("b", 32)):
            w, m = np.asarray(params[name]["kernel"]), np.asarray(masks[name]["kernel"])
            assert np.all(w[~m] == 0.0)  # exactly zero, not just small
            assert np.all(~m[pruned_before[name]])  # once pruned, always pruned
            if due:
                assert (~m).sum() == round(s * size)
                # The pruned entries are the smallest magnitudes after this update.
                cand = np.abs(np.asarray(expected_next[name]["kernel"]))
                cand[pruned_before[name]] = -1
                if (~m).any() and m.any():
                    assert cand[~m].max() <= cand[m].min()
            pruned_before[name] = ~m
        assert np.all(np.asarray(params["a"]["bias"]) != 0)  # untargeted leaf untouched
    assert _zeros(params["a"]["kernel"]) == 48 and _zeros(params["b"]["kernel"]) == 24
    assert len(traces) == 1


def test_existing_zeros_count_as_pruned():
    params = _tiny_params()
    w = np.asarray(params["a"]["kernel"]).copy()
    w[:, :5] = 0.0  # 40 of 64 already zero, above the 25% target
    params["a"]["kernel"] = jnp.asarray(w)
    tx = prune.magnitude_pruning(_targets(params, 0.25), begin_step=0, end_step=0)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params),
                                        params)
    new = optax.apply_updates(params, updates)
    assert np.all(np.asarray(new["a"]["kernel"])[:, :5] == 0.0)
    assert _zeros(new["a"]["kernel"]) == 40
    assert _zeros(new["b"]["kernel"]) == 8


def test_global_scope_one_threshold_layer_scope_each_leaf():
    params = _tiny_params()  # "b" has 10x smaller weights than "a"
    targets = _targets(params, 0.5)
    zero_updates = jax.tree.map(jnp.zeros_like, params)
    both = jax.tree.map(lambda t: t is not None, targets, is_leaf=lambda x: x is None)
    results = {}
    for scope, group in (("layer", None), ("global", both)):
        tx = prune.magnitude_pruning(targets, begin_step=0, end_step=0, global_leaves=group)
        updates, _ = jax.jit(tx.update)(zero_updates, tx.init(params), params)
        results[scope] = optax.apply_updates(params, updates)
    layer, glob = results["layer"], results["global"]
    assert _zeros(layer["a"]["kernel"]) == 32 and _zeros(layer["b"]["kernel"]) == 16
    assert _zeros(glob["a"]["kernel"]) + _zeros(glob["b"]["kernel"]) == 48
    assert _zeros(glob["b"]["kernel"]) > 16  # the small-magnitude leaf is pruned harder
    kept = np.concatenate([np.abs(np.asarray(glob[n]["kernel"])).ravel() for n in "ab"])
    pruned = np.concatenate([np.abs(np.asarray(params[n]["kernel"]))[
        np.asarray(glob[n]["kernel"]) == 0] for n in "ab"])
    assert pruned.max() <= kept[kept > 0].min()


# --- the stage ---------------------------------------------------------------------------

def _kernel_sizes(params):
    return {name: layer["kernel"].size for name, layer in params.items()}


def _cluster_like(w, k):
    """Snaps ``w`` to ``k`` evenly spaced values, as a clustering stage would leave it."""
    w = np.asarray(w)
    centroids = np.linspace(w.min(), w.max(), k).astype(np.float32)
    return jnp.asarray(centroids[np.abs(w[..., None] - centroids).argmin(-1)])


def test_prune_stage_exact_sparsity_keeps_clusters_and_survives_training(mnist, lenet):
    params, apply_fn = lenet
    k = 8  # Dense_1 arrives weight-shared (clustered before pruning)
    params = {**params, "Dense_1": {**params["Dense_1"],
                                    "kernel": _cluster_like(params["Dense_1"]["kernel"], k)}}
    assert constraints.codebook(params["Dense_1"]["kernel"]) is not None
    config = prune.PruneConfig(
        target_sparsity=0.8, scope="layer", min_per_channel=0, frequency=3, end=0.6,
        train=TINY, fine_tune=dataclasses.replace(TINY, epochs=0.5))
    per_layer = (rules.LayerRule(pattern=r"Dense_2/kernel", sparsity=0.5),
                 *rules.DEFAULT_RULES)
    pruned, report = prune.prune(params, config, apply_fn=apply_fn, data=mnist, seed=0,
                                 rules=per_layer)
    expected = {"Dense_0": round(0.8 * 784 * 300), "Dense_1": round(0.8 * 300 * 100),
                "Dense_2": round(0.5 * 100 * 10)}
    for name, n in expected.items():
        assert _zeros(pruned[name]["kernel"]) == n
        assert _zeros(pruned[name]["bias"]) < pruned[name]["bias"].size  # biases trained
        assert report[f"prune/{name}/kernel/sparsity"] == n / pruned[name]["kernel"].size
    shared = np.asarray(pruned["Dense_1"]["kernel"])
    assert len(np.unique(shared[shared != 0])) <= k
    total = sum(_kernel_sizes(pruned).values())
    assert report["prune/nonzero"] == total - sum(expected.values())
    assert report["prune/sparsity"] == pytest.approx(sum(expected.values()) / total)
    assert 0.0 <= report["prune/val_accuracy"] <= 1.0

    # Another stage's training keeps every zero in place.
    def make_loss(materialize):
        def loss_fn(trainable, extra, x, y, key):
            logits = apply_fn(materialize(trainable), x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (extra, {"loss": loss})
        return loss_fn
    after, _, _ = constraints.fit_preserving(
        pruned, make_loss, x=mnist.x_train, y=mnist.y_train,
        config=dataclasses.replace(TINY, epochs=0.5), seed=1)
    for name in expected:
        before_zero = np.asarray(pruned[name]["kernel"]) == 0
        assert np.array_equal(np.asarray(after[name]["kernel"]) == 0, before_zero)
        assert not np.array_equal(np.asarray(after[name]["kernel"]),
                                  np.asarray(pruned[name]["kernel"]))  # it did train


def test_prune_stage_global_scope_hits_overall_target(mnist, lenet):
    params, apply_fn = lenet
    config = prune.PruneConfig(target_sparsity=0.9, scope="global", frequency=5, train=TINY,
                               fine_tune=None)
    pruned, report = prune.prune(params, config, apply_fn=apply_fn, data=mnist, seed=0)
    total = sum(_kernel_sizes(pruned).values())
    zeros = sum(_zeros(layer["kernel"]) for layer in pruned.values())
    assert zeros == round(0.9 * total)
    assert report["prune/sparsity"] == zeros / total
    per_layer = [report[f"prune/Dense_{i}/kernel/sparsity"] for i in range(3)]
    assert max(per_layer) - min(per_layer) > 0.01  # one threshold, not one target per layer


def test_a_teacher_guides_the_pruned_net_towards_its_own_answers(mnist, lenet):
    params, apply_fn = lenet
    # A teacher that answers otherwise than the labels: another random init.
    teacher_params = models.init(models.create("lenet300"), (28, 28, 1), seed=7)["params"]
    teacher_answers = np.asarray(train.predict(apply_fn, teacher_params, mnist.x_val))
    agreement = {}
    for alpha in (0.0, 1.0):
        config = prune.PruneConfig(target_sparsity=0.8, frequency=3, teacher_alpha=alpha,
                                   train=TINY, fine_tune=None)
        pruned, report = prune.prune(params, config, apply_fn=apply_fn, data=mnist, seed=0,
                                     teacher=(apply_fn, teacher_params))
        assert report["prune/sparsity"] == pytest.approx(0.8, abs=1e-3)
        answers = np.asarray(train.predict(apply_fn, pruned, mnist.x_val))
        agreement[alpha] = np.mean(answers.argmax(-1) == teacher_answers.argmax(-1))
    assert agreement[1.0] > agreement[0.0] + 0.3, agreement
    with pytest.raises(ValueError, match="teacher_alpha > 0 needs a teacher"):
        prune.prune(params, config, apply_fn=apply_fn, data=mnist, seed=0)


# --- config ------------------------------------------------------------------------------

@pytest.mark.parametrize("field, kwargs", [
    ("target_sparsity", {"target_sparsity": 1.0}),
    ("target_sparsity", {"target_sparsity": -0.1}),
    ("initial_sparsity", {"initial_sparsity": 0.95}),
    ("frequency", {"frequency": 0}),
    ("begin", {"begin": -0.1}),
    ("end", {"begin": 0.5, "end": 0.5}),
    ("end", {"end": 1.5}),
    ("scope", {"scope": "channel"}),
    ("power", {"power": 0}),
    ("teacher_alpha", {"teacher_alpha": 1.5}),
    ("teacher_temperature", {"teacher_temperature": 0}),
    ("criterion", {"criterion": "gradient"}),
])
def test_invalid_config_names_field(field, kwargs):
    with pytest.raises(ConfigError, match=rf"^{field}="):
        prune.PruneConfig(**kwargs)


def test_every_output_channel_keeps_its_floor():
    # A depthwise 3x3 kernel: 9 weights per channel; 90% would leave most channels none.
    w = jax.random.normal(jax.random.key(3), (3, 3, 1, 16))
    w = w * jnp.linspace(0.01, 1.0, 16)  # channels of very different magnitudes
    plain = np.asarray(prune.prune_once(w, 0.9))
    floored = np.asarray(prune.prune_once(w, 0.9, min_per_channel=3))
    per_channel = lambda a: (a != 0).reshape(-1, a.shape[-1]).sum(0)  # noqa: E731
    assert per_channel(plain).min() == 0
    assert per_channel(floored).min() == 3
    # The floor wins over the target; the rest is still pruned by magnitude.
    assert _zeros(floored) == w.size - max(round(0.1 * w.size), 3 * 16)
    kept = floored != 0
    assert np.array_equal(floored[kept], np.asarray(w)[kept])
    # A floor that does not bind changes nothing.
    unscaled = jax.random.normal(jax.random.key(3), (3, 3, 1, 16))
    plain = np.asarray(prune.prune_once(unscaled, 0.5))
    assert per_channel(plain).min() >= 2
    np.testing.assert_array_equal(
        np.asarray(prune.prune_once(unscaled, 0.5, min_per_channel=2)), plain)


def test_the_pruning_transform_keeps_the_floor_in_both_scopes():
    params = {"dw": {"kernel": jax.random.normal(jax.random.key(4), (3, 3, 1, 8))
                     * jnp.linspace(0.01, 1.0, 8)},
              "fc": {"kernel": jax.random.normal(jax.random.key(5), (72, 10))}}
    targets = _targets(params, 0.95)
    for group in (None, jax.tree.map(lambda _: True, params)):
        tx = prune.magnitude_pruning(targets, begin_step=0, end_step=0, global_leaves=group,
                                     min_per_channel=2)
        state = tx.init(params)
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
        pruned = optax.apply_updates(params, updates)
        for layer in pruned.values():
            w = np.asarray(layer["kernel"])
            assert (w != 0).reshape(-1, w.shape[-1]).sum(0).min() >= 2


def test_erk_keeps_small_layers_denser_and_meets_the_overall_target():
    # The depthwise net of the conv-nets issue: first conv, depthwise, 1x1, dense, last dense.
    shapes = [(3, 3, 1, 32), (3, 3, 1, 32), (1, 1, 32, 64), (64, 64), (64, 10)]
    sparsities = prune.erk_sparsities(shapes, 0.75)
    sizes = np.array([np.prod(s) for s in shapes])
    assert np.dot(1 - np.array(sparsities), sizes) == pytest.approx(0.25 * sizes.sum())
    first, depthwise, pointwise, dense, last = sparsities
    assert first == depthwise < last < pointwise < dense
    assert depthwise < 0.4  # of 9 weights per channel, more than 5 stay
    # A layer whose share would pass density 1 stays dense; the rest share the budget.
    tiny_and_big = prune.erk_sparsities([(2, 2), (1000, 1000)], 0.5)
    assert tiny_and_big[0] == 0.0
    assert tiny_and_big[1] == pytest.approx(1 - (0.5 * 1_000_004 - 4) / 1_000_000)


def test_erk_scope_gives_leaf_targets_and_keeps_own_rules(lenet):
    params, _ = lenet
    own = (rules.LayerRule(pattern=r"Dense_2/kernel", sparsity=0.3), *rules.DEFAULT_RULES)
    targets = prune.leaf_targets(params, prune.PruneConfig(target_sparsity=0.9), own)
    assert targets["Dense_2"]["kernel"] == 0.3 and targets["Dense_0"]["bias"] is None
    sizes = {name: params[name]["kernel"].size for name in ("Dense_0", "Dense_1")}
    kept = sum((1 - targets[name]["kernel"]) * n for name, n in sizes.items())
    assert kept == pytest.approx(0.1 * sum(sizes.values()))
    assert targets["Dense_1"]["kernel"] < targets["Dense_0"]["kernel"]


# --- sensitivity scope ---------------------------------------------------------------

def test_sensitivity_sparsities_put_zeros_where_they_cost_least():
    flat_big = {0.5: 0.0, 0.9: 0.2, 0.98: 1.0}  # a robust 64x64 dense
    steep_small = {0.5: 3.0, 0.9: 40.0, 0.98: 60.0}  # a depthwise kernel
    noisy = {0.5: 2.0, 0.7: 1.0, 0.9: 9.0, 0.98: 20.0}  # a dip at 0.7 is read as 2.0
    sizes = [4096, 288, 640]
    shares = prune.sensitivity_sparsities([flat_big, steep_small, noisy], sizes, 0.8)
    zeros = sum(s * n for s, n in zip(shares, sizes, strict=True))
    assert zeros == pytest.approx(0.8 * sum(sizes), abs=0.5)
    assert shares[1] < shares[2] < shares[0] <= 0.98
    assert shares[1] == 0.0  # cheaper zeros exist everywhere else
    # Out of reach: every layer ends at its curve's last point.
    assert prune.sensitivity_sparsities([flat_big, steep_small], [100, 100], 0.99) == [0.98, 0.98]


def test_sensitivity_scope_needs_curves_and_uses_them(lenet):
    params, _ = lenet
    config = prune.PruneConfig(target_sparsity=0.9, scope="sensitivity")
    with pytest.raises(ConfigError, match="scope"):
        prune.leaf_targets(params, config)
    curves = {"Dense_0/kernel": {0.5: 0.0, 0.98: 0.5}, "Dense_1/kernel": {0.5: 1.0, 0.98: 9.0},
              "Dense_2/kernel": {0.5: 5.0, 0.98: 50.0}}
    targets = prune.leaf_targets(params, config, curves=curves)
    layers = [name.split("/")[0] for name in curves]
    sizes = {layer: params[layer]["kernel"].size for layer in layers}
    kept = sum((1 - targets[layer]["kernel"]) * sizes[layer] for layer in layers)
    assert kept == pytest.approx(0.1 * sum(sizes.values()), abs=1)
    assert targets["Dense_0"]["kernel"] > targets["Dense_1"]["kernel"] > targets["Dense_2"][
        "kernel"]


def test_sensitivity_scope_through_the_prune_stage(mnist, lenet):
    params, apply_fn = lenet
    recipe = Recipe(prune=prune.PruneConfig(target_sparsity=0.8, scope="sensitivity",
                                            train=TINY, fine_tune=None))
    shared = StageInputs(apply_fn, mnist, seed=0, rules=recipe.rules, teacher=None)
    _, report = STAGES["prune"](params, recipe, shared)
    assert report["prune/sparsity"] == pytest.approx(0.8, abs=1e-3)
    layers = [report[f"prune/Dense_{i}/kernel/sparsity"] for i in range(3)]
    assert layers[0] > layers[2]  # the 784x300 kernel takes more zeros than the last
