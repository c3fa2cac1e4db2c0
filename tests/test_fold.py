import jax
import jax.numpy as jnp
import numpy as np

from ucpjax import fold, models


def _random_batchnorm(variables, key):
    k1, k2 = jax.random.split(key)
    stats = jax.tree.map(lambda a: jax.random.uniform(k1, a.shape, minval=0.5, maxval=1.5),
                         variables["batch_stats"])
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(k2, a.shape), variables["params"])
    return {"params": params, "batch_stats": stats}


def test_folding_keeps_the_function_and_makes_batchnorm_identity():
    model = models.create("cifar_cnn")
    variables = _random_batchnorm(models.init(model, (32, 32, 3)), jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    folded, frozen = fold.fold_batchnorm(model, variables, (32, 32, 3))
    assert len(frozen) == len(variables["batch_stats"]) >= 1
    assert all(path[-1] == "scale" for path in frozen)
    np.testing.assert_allclose(model.apply(folded, x), model.apply(variables, x),
                               rtol=1e-4, atol=1e-5)
    for bn in folded["batch_stats"].values():
        assert float(jnp.max(jnp.abs(bn["mean"]))) == 0.0
        one = bn["var"] + np.float32(1e-5)
        assert np.all(np.asarray(one, np.float32) == np.float32(1.0))
    again, _ = fold.fold_batchnorm(model, folded, (32, 32, 3))
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(folded), strict=True):
        np.testing.assert_array_equal(a, b)
    kernel_before = variables["params"]["Conv_0"]["kernel"]
    assert not np.allclose(folded["params"]["Conv_0"]["kernel"], kernel_before)


def test_model_without_batchnorm_is_unchanged():
    model = models.create("lenet300")
    variables = models.init(model, (28, 28, 1))
    folded, frozen = fold.fold_batchnorm(model, variables, (28, 28, 1))
    assert frozen == () and folded is variables
