"""The inner loop: gradient steps on one task's support set.

``inner_update(theta, g, alpha) = theta - alpha * g`` where ``alpha`` is a scalar or a pytree of
per-parameter rates with the structure of ``theta`` (Meta-SGD, Li et al. 2017).
``adapt`` applies ``steps`` such updates with ``g = grad_theta L_support(theta)``; it is
differentiable end to end, so ``mx.grad`` through it gives MAML's second-order meta-gradient.

Other inner rules (:class:`InnerRule`): ``inner_init(rule, params) -> state`` and
``inner_step(rule, params, grads, state, lr) -> (params, state)`` are pure, the state a pytree
started afresh for every task. ``sgd`` is the step above with an empty state; ``adam`` is Adam
(Kingma & Ba 2015) with bias correction, the inner optimizer of Nichol et al.'s (2018) Reptile
experiments (``beta1 = 0``)::

    m_t = b1 m + (1-b1) g;  v_t = b2 v + (1-b2) g^2
    theta_t = theta - lr * (m_t / (1-b1^t)) / (sqrt(v_t / (1-b2^t)) + eps)

With ``b1 = 0`` the first step is ``theta - lr * g / (|g| + eps)`` (a sign step of size ``lr``)
and step ``t`` divides ``g_t`` by the root of a ``b2``-weighted mean of ``g_1^2..g_t^2``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import mlx.core as mx

from metafn.losses import LossFn
from metafn.optim import ScaleByAdamState, adam_direction
from metafn.tree import PyTree, tree_flatten, tree_map, tree_structure_equal

__all__ = ["inner_update", "adapt", "check_lr", "LearningRate", "INNER_OPTIMIZERS", "InnerRule",
           "InnerAdamState", "check_inner_rule", "inner_init", "inner_step"]

INNER_OPTIMIZERS = ("sgd", "adam")

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


class InnerRule(NamedTuple):
    """Which update the inner loop takes: ``name`` in :data:`INNER_OPTIMIZERS`, and Adam's
    ``b1``, ``b2``, ``eps`` (read only by ``adam``). A record of constants, not an optimizer
    object: the state lives in the pytree :func:`inner_init` returns."""

    name: str = "sgd"
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


SGD_RULE = InnerRule()


InnerAdamState = ScaleByAdamState
"""The inner Adam state of one task (or of ``T`` tasks, a leading task axis on ``mu``/``nu``):
steps taken so far (shared, a scalar) and the first / second moment estimates; the same record
as the outer :func:`metafn.optim.adam`'s state."""


def check_inner_rule(rule: InnerRule) -> None:
    """Raise a clear error naming the field if ``rule`` is not a valid :class:`InnerRule`."""
    if not isinstance(rule, InnerRule):
        raise TypeError(f"rule: expected an InnerRule, got {type(rule).__name__}")
    if rule.name not in INNER_OPTIMIZERS:
        raise ValueError(f"rule.name: expected one of {list(INNER_OPTIMIZERS)}, got {rule.name!r}")
    for name in ("b1", "b2"):
        b = getattr(rule, name)
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"rule.{name}: expected a number in [0, 1), got {b!r}")
    if isinstance(rule.eps, bool) or not isinstance(rule.eps, (int, float)) or not (
            math.isfinite(rule.eps) and rule.eps > 0):
        raise ValueError(f"rule.eps: expected a finite number > 0, got {rule.eps!r}")


def inner_init(rule: InnerRule, params: PyTree) -> PyTree:
    """A fresh inner-optimizer state for ``params``: ``()`` for sgd, zero moments for adam."""
    check_inner_rule(rule)
    if rule.name == "sgd":
        return ()
    zeros = tree_map(mx.zeros_like, params)
    return InnerAdamState(mx.array(0, dtype=mx.int32), zeros, tree_map(mx.zeros_like, params))


def inner_step(
    rule: InnerRule, params: PyTree, grads: PyTree, state: PyTree, lr: LearningRate
) -> tuple[PyTree, PyTree]:
    """One inner step of ``rule``: ``(params, state) -> (params', state')``.

    ``lr`` is a scalar or a per-parameter tree shaped like ``params`` (as :func:`inner_update`).
    sgd: ``theta - lr * g``, state unchanged. adam: see the module docstring.
    """
    check_inner_rule(rule)
    if rule.name == "sgd":
        return inner_update(params, grads, lr), state
    check_lr(lr, params)
    if not isinstance(state, InnerAdamState):
        raise TypeError(f"state: expected the InnerAdamState of inner_init(rule, params), "
                        f"got {type(state).__name__}")
    direction, state = adam_direction(grads, state, float(rule.b1), float(rule.b2), float(rule.eps))
    return inner_update(params, direction, lr), state
