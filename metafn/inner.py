"""The inner loop: gradient steps on one task's support set.

``inner_update(theta, g, alpha) = theta - alpha * g`` where ``alpha`` is a scalar or a pytree of
per-parameter rates with the structure of ``theta`` (Meta-SGD, Li et al. 2017).
``adapt`` applies ``steps`` such updates with ``g = grad_theta L_support(theta)``; it is
differentiable end to end, so ``mx.grad`` through it gives MAML's second-order meta-gradient.
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx

from metafn.losses import LossFn
from metafn.tree import PyTree, tree_flatten, tree_map, tree_structure_equal

__all__ = ["inner_update", "adapt", "check_lr", "LearningRate"]

LearningRate = float | mx.array | PyTree


def check_lr(lr: LearningRate, params: PyTree, name: str = "lr") -> None:
    """Raise a clear error if ``lr`` is not a finite scalar or a tree shaped like ``params``.

    Arrays inside a trace (vmap, grad, compile) cannot be inspected; only Python numbers and
    tree structure are checked there.
    """
    if isinstance(lr, bool):
        raise TypeError(f"{name}: expected a number or a pytree of arrays, got bool")
    if isinstance(lr, (int, float)):
        if not math.isfinite(lr):
            raise ValueError(f"{name}: expected a finite learning rate, got {lr}")
        return
    if isinstance(lr, mx.array):
        if lr.ndim != 0:
            raise ValueError(f"{name}: expected a scalar array, got shape {lr.shape}")
        return
    if not isinstance(lr, (dict, list, tuple)):
        raise TypeError(f"{name}: expected a number or a pytree of arrays, got {type(lr).__name__}")
    if not tree_structure_equal(lr, params):
        lr_keys = [k for k, _ in tree_flatten(lr)]
        p_keys = [k for k, _ in tree_flatten(params)]
        raise ValueError(
            f"{name}: a per-parameter learning-rate tree must match params leaf for leaf "
            f"(keys and shapes); got keys {lr_keys[:6]}... for params keys {p_keys[:6]}..."
        )


def inner_update(params: PyTree, grads: PyTree, lr: LearningRate) -> PyTree:
    """One SGD step ``theta - lr * g``; ``lr`` a scalar or a per-parameter tree (Meta-SGD)."""
    check_lr(lr, params)
    if isinstance(lr, (int, float, mx.array)):
        return tree_map(lambda p, g: p - lr * g, params, grads)
    return tree_map(lambda p, g, a: p - a * g, params, grads, lr)


def adapt(
    loss_fn: LossFn,
    params: PyTree,
    x: mx.array,
    y: mx.array,
    steps: int,
    lr: LearningRate,
    first_order: bool = False,
) -> PyTree:
    """``steps`` inner updates of ``params`` on ``loss_fn(params, x, y)``.

    theta_0 = params;  theta_{k+1} = theta_k - lr * grad L(theta_k; x, y).
    With ``first_order=True`` the inner gradients are treated as constants
    (``stop_gradient``), which turns MAML's meta-gradient into FOMAML's.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps: expected a non-negative int, got {steps!r}")
    check_lr(lr, params)
    grad_fn: Callable[..., PyTree] = mx.grad(loss_fn)
    for _ in range(steps):
        g = grad_fn(params, x, y)
        if first_order:
            g = tree_map(mx.stop_gradient, g)
        params = inner_update(params, g, lr)
    return params
