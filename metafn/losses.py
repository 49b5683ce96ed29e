"""Losses over predictions and targets; each returns a scalar ``mx.array``.

``mse_loss(apply_fn)`` and ``cross_entropy_loss(apply_fn)`` turn a model's apply function into
the ``loss_fn(params, x, y) -> scalar`` that :mod:`metafn.inner` and :mod:`metafn.outer` take.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from metafn.tree import PyTree

LossFn = Callable[[PyTree, mx.array, mx.array], mx.array]

__all__ = ["mse", "cross_entropy", "accuracy", "mse_loss", "cross_entropy_loss", "LossFn"]


def mse(pred: mx.array, target: mx.array) -> mx.array:
    """Mean squared error ``mean((pred - target)^2)`` over all entries; shapes must match."""
    if pred.shape != target.shape:
        raise ValueError(f"target: expected shape {pred.shape} (as pred), got {target.shape}")
    return mx.mean(mx.square(pred - target))


def cross_entropy(logits: mx.array, labels: mx.array) -> mx.array:
    """Mean softmax cross-entropy ``mean_i(logsumexp(z_i) - z_i[y_i])``.

    logits: ``(..., C)`` floats; labels: ``(...)`` integer class indices in ``[0, C)``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels: expected shape {logits.shape[:-1]} (logits without the class axis), "
            f"got {labels.shape}"
        )
    if mx.issubdtype(labels.dtype, mx.floating):
        raise TypeError(f"labels: expected an integer dtype, got {labels.dtype}")
    picked = mx.take_along_axis(logits, labels[..., None].astype(mx.int32), axis=-1)[..., 0]
    return mx.mean(mx.logsumexp(logits, axis=-1) - picked)


def accuracy(logits: mx.array, labels: mx.array) -> mx.array:
    """Fraction of rows whose arg-max class equals the label."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels: expected shape {logits.shape[:-1]}, got {labels.shape}")
    return mx.mean((mx.argmax(logits, axis=-1) == labels).astype(mx.float32))


def mse_loss(apply_fn: Callable[[PyTree, mx.array], mx.array]) -> LossFn:
    """``(params, x, y) -> mse(apply_fn(params, x), y)``."""

    def loss_fn(params: PyTree, x: mx.array, y: mx.array) -> mx.array:
        return mse(apply_fn(params, x), y)

    return loss_fn


def cross_entropy_loss(apply_fn: Callable[[PyTree, mx.array], mx.array]) -> LossFn:
    """``(params, x, y) -> cross_entropy(apply_fn(params, x), y)``."""

    def loss_fn(params: PyTree, x: mx.array, y: mx.array) -> mx.array:
        return cross_entropy(apply_fn(params, x), y)

    return loss_fn
