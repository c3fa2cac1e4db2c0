"""k-means weight sharing: initialisations, Lloyd's invariants, the cluster stage, plots."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ucpjax import cluster, constraints, data, models, plots
from ucpjax import train as train_lib
from ucpjax.config import ConfigError
from ucpjax.rules import DEFAULT_RULES, LayerRule

K = 4


def _ramp():
    """-20..20 without 0, with zeros interleaved (zeros must be ignored)."""
    ramp = np.arange(-20, 21, dtype=np.float32)
    ramp = ramp[ramp != 0]
    values = np.zeros(2 * ramp.size, np.float32)
    values[::2] = ramp
    return jnp.asarray(values), jnp.asarray(values != 0), ramp


def test_linear_init_is_evenly_spaced_between_min_and_max():
    values, mask, ramp = _ramp()
    c = cluster.initial_centroids(values, mask, k=K, init="linear", key=jax.random.key(0))
    np.testing.assert_allclose(c, np.linspace(ramp.min(), ramp.max(), K), rtol=1e-6)


def test_density_init_gives_quantiles_of_nonzero_weights():
    values, mask, ramp = _ramp()
    c = cluster.initial_centroids(values, mask, k=K, init="density", key=jax.random.key(0))
    np.testing.assert_allclose(c, np.quantile(ramp, (np.arange(K) + 0.5) / K), rtol=1e-6)


@pytest.mark.parametrize("init", ["forgy", "kmeans++"])
def test_random_inits_pick_distinct_nonzero_values_present(init):
    values, mask, ramp = _ramp()
    for seed in range(3):
        c = np.asarray(cluster.initial_centroids(values, mask, k=K, init=init,
                                                 key=jax.random.key(seed)))
        assert set(c.tolist()) <= set(ramp.tolist()), c
        assert len(set(c.tolist())) == K, c


def test_kmeans_plus_plus_spreads_out():
    # K far-apart tight groups: D^2 sampling must take one centroid from each.
    groups = np.arange(1, K + 1)[:, None] * 100 + np.linspace(0, 0.01, 20)[None]
    values = jnp.asarray(groups.ravel(), jnp.float32)
    for seed in range(5):
        c = cluster.initial_centroids(values, values != 0, k=K, init="kmeans++",
                                      key=jax.random.key(seed))
        assert np.array_equal(np.sort(np.asarray(c)) // 100, np.arange(1, K + 1))


def _pruned_normal(n=3000, seed=0):
    w = np.random.default_rng(seed).normal(0, 0.05, n).astype(np.float32)
    w[np.abs(w) < np.quantile(np.abs(w), 0.6)] = 0
    return w


def _numpy_lloyd(x, centroids, iterations, weights=None):
    """Float64 reference: (centroids, (weighted) WCSS of each iteration's clusters about
    their new means)."""
    weights = np.ones_like(x) if weights is None else weights
    c, history = np.asarray(centroids, np.float64), []
    for _ in range(iterations):
        c = np.sort(c)
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, x)
        c = np.array([np.average(x[idx == j], weights=weights[idx == j])
                      if np.any(idx == j) else cj for j, cj in enumerate(c)])
        history.append(sum((weights[idx == j] * (x[idx == j] - cj) ** 2).sum()
                           for j, cj in enumerate(c)))
    return np.sort(c), np.array(history)


@pytest.mark.parametrize("init", ["linear", "forgy"])
def test_kmeans_matches_float64_lloyd_and_objective_never_increases(init):
    w = _pruned_normal()
    values, mask = jnp.asarray(w), jnp.asarray(w != 0)
    key = jax.random.key(1)
    centroids, assignment, history = cluster.kmeans(values, mask, k=8, init=init, key=key,
                                                    iterations=20)
    history = np.asarray(history)
    assert np.all(np.diff(history) <= 1e-6 * history[0]), history
    assert history[-1] < history[0]  # it did improve
    start = cluster.initial_centroids(values, mask, k=8, init=init, key=key)
    ref_c, ref_h = _numpy_lloyd(w[w != 0].astype(np.float64), start, 20)
    np.testing.assert_allclose(centroids, ref_c, atol=1e-6)
    np.testing.assert_allclose(history, ref_h, rtol=1e-5)
    # Zeros get the zero slot k; every other value its nearest centroid.
    assignment = np.asarray(assignment)
    assert assignment.dtype == np.int32
    assert np.all((assignment == 8) == (w == 0))
    nz = w != 0
    nearest = np.abs(w[nz, None] - np.asarray(centroids)[None]).min(1)
    np.testing.assert_allclose(np.abs(w[nz] - np.asarray(centroids)[assignment[nz]]), nearest,
                               atol=1e-7)


def test_weighted_kmeans_matches_float64_and_unit_weights_change_nothing():
    w = _pruned_normal()
    values, mask = jnp.asarray(w), jnp.asarray(w != 0)
    importance = np.random.default_rng(2).exponential(1.0, w.shape).astype(np.float32)
    kwargs = {"k": 8, "init": "linear", "key": jax.random.key(1), "iterations": 20}
    centroids, assignment, history = cluster.kmeans(values, mask, **kwargs,
                                                    importance=jnp.asarray(importance))
    start = cluster.initial_centroids(values, mask, k=8, init="linear", key=kwargs["key"])
    nz = w != 0
    ref_c, ref_h = _numpy_lloyd(w[nz].astype(np.float64), start, 20,
                                importance[nz].astype(np.float64))
    np.testing.assert_allclose(centroids, ref_c, atol=1e-6)
    np.testing.assert_allclose(history, ref_h, rtol=1e-5)
    assert not np.allclose(centroids, cluster.kmeans(values, mask, **kwargs)[0], atol=1e-4)
    ones = cluster.kmeans(values, mask, **kwargs, importance=jnp.ones_like(values))
    for got, plain in zip(ones, cluster.kmeans(values, mask, **kwargs), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(plain))


def test_second_call_with_same_shapes_does_not_recompile():
    kwargs = {"k": 8, "init": "linear", "iterations": 20, "key": jax.random.key(0)}
    w = _pruned_normal()
    cluster.kmeans(jnp.asarray(w), jnp.asarray(w != 0), **kwargs)
    before = cluster.kmeans._cache_size()
    w2 = _pruned_normal(seed=3)
    cluster.kmeans(jnp.asarray(w2), jnp.asarray(w2 != 0), **{**kwargs, "key": jax.random.key(5)})
    assert cluster.kmeans._cache_size() == before


def test_centroid_gradient_is_sum_of_member_gradients():
    rng = np.random.default_rng(0)
    w = _pruned_normal().reshape(750, 4)  # the shapes of the tests above: no new compile
    flat = jnp.asarray(w.ravel())
    centroids, assignment, _ = cluster.kmeans(flat, flat != 0, k=8, init="linear",
                                              key=jax.random.key(0), iterations=20)
    shared = np.append(np.asarray(centroids), 0)[np.asarray(assignment)].reshape(w.shape)
    params = {"Dense_0": {"kernel": jnp.asarray(shared), "bias": jnp.ones(4)}}
    x = jnp.asarray(rng.normal(size=(5, 750)), jnp.float32)

    def loss(p):
        return jnp.sum(jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]) ** 2)

    trainable, materialize = constraints.factor(params)
    k = len(np.unique(shared[shared != 0]))  # linear init may leave a cluster empty
    assert trainable["Dense_0"]["kernel"].shape == (k,) and k >= 2
    g_centroids = jax.jit(jax.grad(lambda t: loss(materialize(t))))(trainable)
    g_full = np.asarray(jax.jit(jax.grad(loss))(params)["Dense_0"]["kernel"])
    index = np.asarray(constraints.codebook(shared).index)
    expected = [g_full[index == j].sum() for j in range(k)]
    np.testing.assert_allclose(g_centroids["Dense_0"]["kernel"], expected, rtol=1e-5, atol=1e-6)


def test_weight_decay_on_kernels_decays_a_shared_kernels_centroids():
    shared = jnp.asarray(np.tile([0.0, 0.5, -0.25], (4, 2)), jnp.float32)  # (4, 6), 2 values
    params = {"Dense_0": {"kernel": shared, "bias": jnp.ones(6)}}
    trainable, _ = constraints.factor(params)
    assert trainable["Dense_0"]["kernel"].ndim == 1  # centroids: a vector
    mask = constraints.kernel_mask(params, trainable)
    assert mask == {"Dense_0": {"kernel": True, "bias": False}}
    cfg = train_lib.TrainConfig(optimizer="sgd", learning_rate=1.0, weight_decay=0.1,
                                weight_decay_on="kernels", schedule="constant")
    opt = train_lib.make_optimizer(cfg, 10, kernels=mask)
    zero = jax.tree.map(jnp.zeros_like, trainable)
    updates, _ = opt.update(zero, opt.init(trainable), trainable)
    assert np.all(np.asarray(updates["Dense_0"]["kernel"]) != 0)
    assert np.all(np.asarray(updates["Dense_0"]["bias"]) == 0)


@pytest.fixture(scope="module")
def lenet_setup():
    dataset = data.load("mnist").take(1024, 256)
    model = models.create("lenet300")
    params = models.init(model, dataset.input_shape)["params"]
    # Prune half of every kernel; make Dense_2 already shared (3 values) to be kept as is.
    params = jax.tree.map(np.asarray, params)
    for name in ("Dense_0", "Dense_1"):
        w = params[name]["kernel"]
        params[name]["kernel"] = np.where(np.abs(w) < np.median(np.abs(w)), 0, w)
    d2 = params["Dense_2"]["kernel"]
    params["Dense_2"]["kernel"] = np.choose(np.arange(d2.size).reshape(d2.shape) % 4,
                                            [0.0, 0.1, -0.2, 0.3]).astype(np.float32)
    params = jax.tree.map(jnp.asarray, params)
    return dataset, train_lib.inference_fn(model, {}), params


def _partition(w):
    """Frozen sets of flat indices sharing a value (non-zero values only)."""
    w = np.asarray(w).ravel()
    return {frozenset(np.flatnonzero(w == v)) for v in np.unique(w[w != 0])}


def test_cluster_stage_keeps_zeros_and_at_most_k_values(lenet_setup):
    dataset, apply_fn, params = lenet_setup
    # Density init: on pruned (bimodal) weights, linear init leaves centroids in the empty
    # gap around zero, so fewer than k values get used; density uses all k.
    config = cluster.ClusterConfig(
        num_clusters=8, init="density", iterations=10,
        fine_tune=train_lib.TrainConfig(epochs=0.25, batch_size=128, learning_rate=1e-3))
    per_layer = (LayerRule(pattern="Dense_1/kernel", clusters=4), *DEFAULT_RULES)
    shared, rep0 = cluster.cluster(params, dataclasses.replace(config, fine_tune=None),
                                   apply_fn=apply_fn, data=dataset, seed=0, rules=per_layer)
    tuned, rep = cluster.cluster(params, config, apply_fn=apply_fn, data=dataset, seed=0,
                                 rules=per_layer)
    ks = {"Dense_0": 8, "Dense_1": 4}
    for name, k in ks.items():
        before, mid, after = (np.asarray(p[name]["kernel"]) for p in (params, shared, tuned))
        for w in (mid, after):
            assert np.array_equal(w == 0, before == 0), name  # zeros kept, none added
            assert len(np.unique(w[w != 0])) <= k
        assert len(np.unique(mid[mid != 0])) == k
        # Fine-tuning moved the centroids but kept the assignment.
        assert not np.array_equal(mid, after)
        assert _partition(mid) == _partition(after)
        assert rep[f"cluster/{name}/kernel/k"] == k
        assert rep[f"cluster/{name}/kernel/distinct"] == len(np.unique(after[after != 0]))
        assert rep[f"cluster/{name}/kernel/bits_per_index"] == int(np.ceil(np.log2(k + 1)))
        assert rep[f"cluster/{name}/kernel/kept"] == 0
        # The reported WCSS is that of the shared weights.
        nz = before != 0
        assert rep0[f"cluster/{name}/kernel/wcss"] == pytest.approx(
            float(((before - mid)[nz].astype(np.float64) ** 2).sum()), rel=1e-5)
    # Already shared with 3 <= 8 values: left as it was, and still 3 values after fine-tuning.
    assert np.array_equal(shared["Dense_2"]["kernel"], params["Dense_2"]["kernel"])
    assert rep["cluster/Dense_2/kernel/kept"] == 1 and rep["cluster/Dense_2/kernel/k"] == 3
    assert rep["cluster/Dense_2/kernel/distinct"] <= 3
    assert np.array_equal(np.asarray(tuned["Dense_2"]["kernel"]) == 0,
                          np.asarray(params["Dense_2"]["kernel"]) == 0)
    assert 0.0 <= rep["cluster/val_accuracy"] <= 1.0
    assert all("bias" not in key for key in rep)


def test_a_teacher_guides_the_centroid_fine_tuning(lenet_setup):
    dataset, apply_fn, params = lenet_setup
    # A teacher that answers otherwise than the labels: another random init.
    teacher_params = models.init(models.create("lenet300"), (28, 28, 1), seed=7)["params"]
    teacher_answers = np.asarray(train_lib.predict(apply_fn, teacher_params, dataset.x_val))
    agreement = {}
    for alpha in (0.0, 1.0):
        config = cluster.ClusterConfig(
            num_clusters=8, init="density", iterations=10, teacher_alpha=alpha,
            fine_tune=train_lib.TrainConfig(epochs=1, batch_size=64, learning_rate=1e-2))
        tuned, _ = cluster.cluster(params, config, apply_fn=apply_fn, data=dataset, seed=0,
                                   teacher=(apply_fn, teacher_params))
        for name in ("Dense_0", "Dense_1"):  # still k shared values on the same zeros
            w = np.asarray(tuned[name]["kernel"])
            assert len(np.unique(w[w != 0])) <= 8
        answers = np.asarray(train_lib.predict(apply_fn, tuned, dataset.x_val))
        agreement[alpha] = np.mean(answers.argmax(-1) == teacher_answers.argmax(-1))
    assert agreement[1.0] > agreement[0.0] + 0.1, agreement
    with pytest.raises(ValueError, match="cluster.teacher_alpha > 0 needs a teacher"):
        cluster.cluster(params, config, apply_fn=apply_fn, data=dataset, seed=0)


@pytest.mark.parametrize("field, kwargs, message", [
    ("num_clusters", {"num_clusters": 1}, "fewer than 2 clusters"),
    ("num_clusters", {"num_clusters": 1000}, "<= 256"),
    ("init", {"init": "random"}, "must be one of"),
    ("iterations", {"iterations": 0}, ">= 1"),
    ("teacher_alpha", {"teacher_alpha": 1.5}, "[0, 1]"),
    ("teacher_temperature", {"teacher_temperature": 0}, "> 0"),
    ("criterion", {"criterion": "hessian"}, "one of"),
])
def test_bad_configs_name_the_field(field, kwargs, message):
    with pytest.raises(ConfigError, match=field) as err:
        cluster.ClusterConfig(**kwargs)
    assert message in str(err.value)


def test_plots_write_png_files_atomically(tmp_path):
    w = _pruned_normal(80).reshape(8, 10)  # the ramp's shape and K: compiled already
    params = {"Dense_0": {"kernel": jnp.asarray(w)}}
    by_init = cluster.centroids_by_init(w, K, jax.random.key(0), iterations=0)
    assert set(by_init) == set(cluster.INITS)
    hist = plots.weight_histograms(params, {"Dense_0/kernel": by_init}, tmp_path / "h.png")
    rows = [{"stage": "dense", "accuracy": 0.98, "bytes": 1_000_000},
            {"stage": "cluster", "accuracy": 0.97, "bytes": 30_000}]
    size = plots.accuracy_vs_size(rows, tmp_path / "a.png")
    for path in (hist, size):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "h.png"]


@pytest.mark.parametrize("init", ["linear", "density"])
def test_padding_leaves_share_one_length_without_changing_linear_or_density(init):
    # cluster() pads every leaf to the largest non-zero count so that k-means compiles
    # once per k; for these starts the padding must not change a single weight.
    small, large = _pruned_normal(300, seed=1), _pruned_normal(3000, seed=2)
    size = cluster.common_padded_size([small, large])
    assert size == np.count_nonzero(large) > np.count_nonzero(small)
    shapes = {cluster._padded(w[w != 0], size)[0].shape for w in (small, large)}
    assert len(shapes) == 1  # one shape, so one compile
    config = cluster.ClusterConfig(num_clusters=K, init=init, fine_tune=None)
    alone, _ = cluster.share_leaf(small, K, config, jax.random.key(0))
    padded, _ = cluster.share_leaf(small, K, config, jax.random.key(0), size)
    np.testing.assert_array_equal(padded, alone)
    assert len(np.unique(padded[padded != 0])) == K
