"""Pytree arithmetic over MLX parameter trees (nested dicts / lists / tuples of ``mx.array``).

All functions are pure: they return new trees and never mutate their arguments. Two trees given
to a binary function must have the same structure.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_unflatten

PyTree = Any

__all__ = [
    "PyTree", "tree_map", "tree_flatten", "tree_unflatten", "tree_leaves", "tree_add", "tree_sub",
    "tree_scale", "tree_lerp", "tree_dot", "tree_norm", "tree_count", "tree_zeros_like",
    "tree_broadcast", "tree_mean_axis0", "tree_index", "tree_stack", "tree_all_finite",
    "tree_structure_equal",
]


def tree_leaves(tree: PyTree) -> list[mx.array]:
    """The arrays of ``tree`` in flattening order."""
    return [leaf for _, leaf in tree_flatten(tree)]


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    """``a + b`` leaf by leaf."""
    return tree_map(lambda x, y: x + y, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    """``a - b`` leaf by leaf."""
    return tree_map(lambda x, y: x - y, a, b)


def tree_scale(tree: PyTree, s: float | mx.array) -> PyTree:
    """``s * tree`` for a scalar ``s``."""
    return tree_map(lambda x: s * x, tree)


def tree_lerp(a: PyTree, b: PyTree, t: float | mx.array) -> PyTree:
    """``a + t (b - a)``: the point at fraction ``t`` of the segment from ``a`` to ``b``."""
    return tree_map(lambda x, y: x + t * (y - x), a, b)


def tree_dot(a: PyTree, b: PyTree) -> mx.array:
    """Inner product ``sum_i <a_i, b_i>`` over all leaves (a scalar array)."""
    terms = [mx.sum(x * y) for x, y in zip(tree_leaves(a), tree_leaves(b))]
    return sum(terms[1:], terms[0]) if terms else mx.array(0.0)


def tree_norm(tree: PyTree) -> mx.array:
    """Global Euclidean norm ``sqrt(sum_i ||t_i||^2)`` (a scalar array)."""
    return mx.sqrt(tree_dot(tree, tree))


def tree_count(tree: PyTree) -> int:
    """Total number of scalar entries in ``tree``."""
    return sum(leaf.size for leaf in tree_leaves(tree))


def tree_zeros_like(tree: PyTree) -> PyTree:
    """A tree of zeros with the shapes and dtypes of ``tree``."""
    return tree_map(mx.zeros_like, tree)


def tree_broadcast(tree: PyTree, n: int) -> PyTree:
    """Give every leaf a new leading axis of size ``n``: shape ``s -> (n, *s)``."""
    return tree_map(lambda x: mx.broadcast_to(x, (n, *x.shape)), tree)


def tree_mean_axis0(tree: PyTree) -> PyTree:
    """Mean over the leading (task) axis of every leaf: ``(n, *s) -> s``."""
    return tree_map(lambda x: mx.mean(x, axis=0), tree)


def tree_index(tree: PyTree, i: int) -> PyTree:
    """Leaf-wise ``x[i]``: one slice of a tree with a leading batch axis."""
    return tree_map(lambda x: x[i], tree)


def tree_stack(trees: list[PyTree]) -> PyTree:
    """Stack same-structure trees along a new leading axis."""
    return tree_map(lambda *xs: mx.stack(xs), *trees)


def tree_all_finite(tree: PyTree) -> bool:
    """True when no leaf holds a NaN or infinity."""
    return all(bool(mx.all(mx.isfinite(x)).item()) for x in tree_leaves(tree))


def tree_structure_equal(a: PyTree, b: PyTree) -> bool:
    """True when ``a`` and ``b`` have the same keys, nesting and leaf shapes."""
    fa, fb = tree_flatten(a), tree_flatten(b)
    return [(k, v.shape) for k, v in fa] == [(k, v.shape) for k, v in fb]


