"""ucpjax.pooling.max_pool: nn.max_pool's values and, bit for bit, its gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ucpjax.pooling import max_pool


@pytest.mark.parametrize(("shape", "size"), [((2, 8, 8, 3), 2), ((3, 9, 7, 2), 2),
                                             ((2, 10, 11, 4), 3)])
def test_matches_flax_max_pool_with_ties_and_ragged_edges(shape, size):
    # Small integers make ties within a window common; odd sizes leave ragged edges.
    x = jax.random.randint(jax.random.key(0), shape, 0, 3).astype(jnp.float32)
    weights = jax.random.normal(jax.random.key(1), (shape[1] // size, shape[2] // size, 1))
    reference = lambda x: nn.max_pool(x, (size, size), (size, size))
    loss = lambda pool: lambda x: jnp.sum(jnp.sin(pool(x)) * weights)

    np.testing.assert_array_equal(max_pool(x, size), reference(x))
    ours = jax.jit(jax.grad(loss(lambda x: max_pool(x, size))))(x)
    np.testing.assert_array_equal(ours, jax.grad(loss(reference))(x))
    # One gradient entry per window: the tie-break picks a single maximum.
    assert int(jnp.sum(ours != 0)) <= (shape[1] // size) * (shape[2] // size) * shape[0] * shape[3]
