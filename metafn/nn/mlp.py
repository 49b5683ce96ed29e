"""Dense layers and multilayer perceptrons as pure ``(init, apply)`` pairs.

Parameters of a dense layer are ``{"w": (d_in, d_out), "b": (d_out,)}``; an MLP is a list of them.
Initialization follows PyTorch's ``nn.Linear``: ``w, b ~ U(-1/sqrt(d_in), 1/sqrt(d_in))``, so
peer implementations in the benchmarks can reproduce it exactly from the same arrays.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import mlx.core as mx

from metafn.tree import PyTree

__all__ = ["dense_init", "dense_apply", "mlp_init", "mlp_apply", "ACTIVATIONS"]

ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "relu": lambda x: mx.maximum(x, 0.0),
    "tanh": mx.tanh,
    "gelu": lambda x: 0.5 * x * (1.0 + mx.erf(x / math.sqrt(2.0))),
}


def dense_init(key: mx.array, d_in: int, d_out: int) -> dict[str, mx.array]:
    """One dense layer ``{"w": (d_in, d_out), "b": (d_out,)}`` with uniform fan-in init."""
    if d_in < 1 or d_out < 1:
        raise ValueError(f"d_in, d_out: expected positive sizes, got {d_in}, {d_out}")
    bound = 1.0 / math.sqrt(d_in)
    kw, kb = mx.random.split(key, 2)
    return {
        "w": mx.random.uniform(-bound, bound, (d_in, d_out), key=kw),
        "b": mx.random.uniform(-bound, bound, (d_out,), key=kb),
    }


def dense_apply(params: dict[str, mx.array], x: mx.array) -> mx.array:
    """``x @ w + b`` for ``x`` of shape ``(..., d_in)``; returns ``(..., d_out)``."""
    return x @ params["w"] + params["b"]


def mlp_init(key: mx.array, sizes: Sequence[int]) -> list[dict[str, mx.array]]:
    """An MLP with layer widths ``sizes = [d_in, h_1, ..., d_out]`` (at least two entries)."""
    sizes = list(sizes)
    if len(sizes) < 2 or any((not isinstance(s, int)) or s < 1 for s in sizes):
        raise ValueError(f"sizes: expected >= 2 positive ints [d_in, ..., d_out], got {sizes}")
    keys = mx.random.split(key, len(sizes) - 1)
    return [dense_init(keys[i], a, b) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]


def mlp_apply(params: PyTree, x: mx.array, activation: str = "relu") -> mx.array:
    """``x -> W_L act(... act(x W_1 + b_1) ...) + b_L``; ``x`` is ``(..., d_in)``."""
    act = ACTIVATIONS[activation]
    for layer in params[:-1]:
        x = act(dense_apply(layer, x))
    return dense_apply(params[-1], x)
