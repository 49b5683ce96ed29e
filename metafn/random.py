"""Explicit PRNG keys (MLX keys are ``uint32`` arrays of shape ``(2,)``).

Every random function in metafn takes a key and is deterministic in it. ``fold_in`` derives an
independent key from an integer (a step, a task index, a split id), which is how a training run
gets the same key for step ``t`` whether or not it was interrupted and resumed.
"""

from __future__ import annotations

import mlx.core as mx

__all__ = ["key", "split", "fold_in", "named_keys"]


def key(seed: int) -> mx.array:
    """A fresh key from an integer seed."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    return mx.random.key(seed)


def split(k: mx.array, num: int = 2) -> mx.array:
    """``num`` independent keys from ``k``; shape ``(num, 2)``."""
    return mx.random.split(k, num)


def fold_in(k: mx.array, data: int) -> mx.array:
    """A new key that depends on ``k`` and the integer ``data`` (like ``jax.random.fold_in``).

    ``k + (0, data)`` (uint32, wrapping) followed by one threefry split, so nearby integers give
    unrelated keys. (Addition, not XOR: MLX 0.32's bitwise ops are wrong under ``mx.vmap`` when
    only one operand is batched.)
    """
    if data < 0 or data >= 2**32:
        raise ValueError(f"data: expected an integer in [0, 2**32), got {data}")
    mixed = k + mx.array([0, data], dtype=mx.uint32)
    return mx.random.split(mixed, 2)[1]


def named_keys(k: mx.array, names: tuple[str, ...] | list[str]) -> dict[str, mx.array]:
    """Split ``k`` into one key per name, e.g. ``named_keys(k, ("init", "data"))``."""
    ks = mx.random.split(k, len(names))
    return {name: ks[i] for i, name in enumerate(names)}
