"""Pure optimizers against hand-written references."""

from __future__ import annotations

import metafn  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, strategies as st

from helpers import assert_trees_close, small_mlp
from metafn.optim import (
    adam, apply_updates, chain, clip_by_global_norm, cosine_decay_schedule, sgd,
    warmup_cosine_schedule,
)
from metafn.tree import tree_leaves, tree_map, tree_norm


def test_adam_matches_numpy_reference():
    params = small_mlp(0)
    opt = adam(0.01, b1=0.9, b2=0.99, eps=1e-8)
    state = opt.init(params)
    p_np = [np.array(x, dtype=np.float64) for x in tree_leaves(params)]
    m = [np.zeros_like(x) for x in p_np]
    v = [np.zeros_like(x) for x in p_np]
    for t in range(1, 6):
        grads = small_mlp(t)
        updates, state = opt.update(grads, state, params)
        params = apply_updates(params, updates)
        for i, g in enumerate(tree_leaves(grads)):
            g = np.array(g, dtype=np.float64)
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.99 * v[i] + 0.01 * g * g
            p_np[i] -= 0.01 * (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.99**t)) + 1e-8)
    for a, b in zip(tree_leaves(params), p_np):
        np.testing.assert_allclose(np.array(a), b, rtol=1e-4, atol=1e-6)
    assert int(state.count.item()) == 5


@given(lr=st.floats(0.0, 1.0), momentum=st.floats(0.0, 0.95))
def test_sgd_momentum(lr, momentum):
    params = small_mlp(1)
    g1, g2 = small_mlp(2), small_mlp(3)
    opt = sgd(lr, momentum)
    state = opt.init(params)
    u1, state = opt.update(g1, state, params)
    u2, state = opt.update(g2, state, params)
    expected = tree_map(lambda a, b: -lr * (momentum * a + b), g1, g2)
    assert_trees_close(u1, tree_map(lambda a: -lr * a, g1))
    assert_trees_close(u2, expected, rtol=1e-5, atol=1e-6)


@given(max_norm=st.floats(0.01, 100.0))
def test_clip_by_global_norm_bounds_norm_and_keeps_direction(max_norm):
    grads = small_mlp(4)
    clipped, _ = clip_by_global_norm(max_norm).update(grads, (), None)
    n = tree_norm(grads).item()
    assert tree_norm(clipped).item() <= max_norm * (1 + 1e-5)
    scale = min(1.0, max_norm / n)
    assert_trees_close(clipped, tree_map(lambda g: g * scale, grads), rtol=1e-5, atol=1e-7)


def test_chain_applies_in_order():
    params = small_mlp(5)
    grads = tree_map(lambda x: 100 * x, small_mlp(6))
    opt = chain(clip_by_global_norm(1.0), sgd(0.5))
    updates, _ = opt.update(grads, opt.init(params), params)
    assert abs(tree_norm(updates).item() - 0.5) < 1e-5


def test_schedules():
    cos = cosine_decay_schedule(1.0, 10)
    assert abs(cos(mx.array(0)).item() - 1.0) < 1e-6 and abs(cos(mx.array(10)).item()) < 1e-6
    assert abs(cos(mx.array(20)).item()) < 1e-6
    w = warmup_cosine_schedule(2.0, 4, 10)
    assert abs(w(mx.array(2)).item() - 1.0) < 1e-6 and abs(w(mx.array(4)).item() - 2.0) < 1e-6


def test_bad_optimizer_arguments():
    with pytest.raises(ValueError, match="learning_rate"):
        adam(float("nan"))
    with pytest.raises(ValueError, match="momentum"):
        sgd(0.1, momentum=1.5)
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_global_norm(0.0)
