"""Shared helpers for the tests: small models, episodes and tree comparisons."""

from __future__ import annotations

import metafn  # noqa: F401
import mlx.core as mx
import chex
import numpy as np

from metafn.losses import mse_loss
from metafn.nn import mlp_apply, mlp_init
from metafn.tasks import Episode
from metafn.tree import tree_flatten, tree_map


def small_mlp(seed: int = 0, sizes=(1, 8, 8, 1), dtype=mx.float32):
    params = mlp_init(mx.random.key(seed), list(sizes))
    return tree_map(lambda x: x.astype(dtype), params)


def random_episodes(seed: int, tasks: int = 3, k: int = 5, q: int = 6, d_in: int = 1,
                    d_out: int = 1, dtype=mx.float32) -> Episode:
    keys = mx.random.split(mx.random.key(seed), 4)
    shapes = [(tasks, k, d_in), (tasks, k, d_out), (tasks, q, d_in), (tasks, q, d_out)]
    return Episode(*[mx.random.normal(s, key=kk).astype(dtype) for s, kk in zip(shapes, keys)])


MSE_MLP = mse_loss(mlp_apply)


def to_numpy(tree):
    """The same tree with NumPy leaves (for chex's tree assertions)."""
    return tree_map(lambda x: np.array(x), tree)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    """Same structure (chex) and leaves close to tolerance."""
    chex.assert_trees_all_equal_structs(to_numpy(a), to_numpy(b))
    chex.assert_trees_all_close(to_numpy(a), to_numpy(b), rtol=rtol, atol=atol)


def assert_trees_equal(a, b):
    fa, fb = tree_flatten(a), tree_flatten(b)
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (k, x), (_, y) in zip(fa, fb):
        assert x.dtype == y.dtype and x.shape == y.shape, k
        bits = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[x.itemsize]
        np.testing.assert_array_equal(np.array(x.view(bits)), np.array(y.view(bits)), err_msg=k)
