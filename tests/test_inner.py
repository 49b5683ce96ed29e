"""inner_update / adapt invariants."""

from __future__ import annotations

import metafn  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, strategies as st

from helpers import MSE_MLP, assert_trees_close, random_episodes, small_mlp
from metafn.inner import adapt, inner_update
from metafn.tree import tree_map, tree_sub, tree_scale


@given(seed=st.integers(0, 10_000), lr=st.floats(0.0, 1.0))
def test_inner_update_is_sgd_step(seed, lr):
    params, grads = small_mlp(seed), small_mlp(seed + 1)
    assert_trees_close(inner_update(params, grads, lr), tree_sub(params, tree_scale(grads, lr)))


@given(seed=st.integers(0, 10_000), lr=st.floats(0.001, 1.0))
def test_constant_rate_tree_equals_scalar_rate(seed, lr):
    params, grads = small_mlp(seed), small_mlp(seed + 1)
    rates = tree_map(lambda p: mx.full(p.shape, lr), params)
    assert_trees_close(inner_update(params, grads, rates), inner_update(params, grads, lr))


def test_zero_rate_and_zero_steps_are_identity():
    params = small_mlp(2)
    eps = random_episodes(3, tasks=1)
    assert_trees_close(inner_update(params, small_mlp(4), 0.0), params, rtol=0, atol=0)
    assert_trees_close(adapt(MSE_MLP, params, eps.support_x[0], eps.support_y[0], 0, 0.1), params, rtol=0, atol=0)


def test_adapt_decreases_support_loss():
    params = small_mlp(5)
    eps = random_episodes(6, tasks=1)
    x, y = eps.support_x[0], eps.support_y[0]
    before = MSE_MLP(params, x, y).item()
    after = MSE_MLP(adapt(MSE_MLP, params, x, y, 10, 0.05), x, y).item()
    assert after < before


def test_adapt_steps_compose():
    params = small_mlp(7)
    eps = random_episodes(8, tasks=1)
    x, y = eps.support_x[0], eps.support_y[0]
    twice = adapt(MSE_MLP, adapt(MSE_MLP, params, x, y, 2, 0.05), x, y, 3, 0.05)
    assert_trees_close(twice, adapt(MSE_MLP, params, x, y, 5, 0.05), rtol=1e-5, atol=1e-6)


def test_bad_learning_rates_are_named():
    params = small_mlp(0)
    with pytest.raises(ValueError, match="lr: expected a finite"):
        inner_update(params, params, float("nan"))
    with pytest.raises(ValueError, match="lr: a per-parameter"):
        inner_update(params, params, [{"w": mx.zeros((1, 8))}])
    with pytest.raises(ValueError, match="lr: expected a scalar array"):
        inner_update(params, params, mx.ones((3,)))
    with pytest.raises(ValueError, match="steps"):
        eps = random_episodes(1, tasks=1)
        adapt(MSE_MLP, params, eps.support_x[0], eps.support_y[0], -2, 0.1)
