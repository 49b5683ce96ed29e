"""The ``Episode`` container: one task's support and query sets, or a batch of them.

A single episode has ``support_x (K_s, *x)``, ``support_y (K_s, *y)``, ``query_x (K_q, *x)``,
``query_y (K_q, *y)``. A batch of episodes has the same fields with a leading task axis ``T``.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

__all__ = ["Episode", "check_episode_batch"]


class Episode(NamedTuple):
    """Support and query sets of a task (or of ``T`` tasks, with a leading task axis)."""

    support_x: mx.array
    support_y: mx.array
    query_x: mx.array
    query_y: mx.array


def check_episode_batch(episodes: Episode, name: str = "episodes") -> int:
    """Validate a batch of episodes and return the number of tasks ``T``.

    Every field must be an ``mx.array`` with the same leading task axis (inputs at least 3-D:
    tasks, examples, features; targets at least 2-D); x and y of a set must
    agree on the number of examples; support and query inputs must have the same feature shape.
    """
    if not isinstance(episodes, Episode):
        raise TypeError(f"{name}: expected an Episode, got {type(episodes).__name__}")
    for field, value in zip(Episode._fields, episodes):
        if not isinstance(value, mx.array):
            raise TypeError(f"{name}.{field}: expected an mx.array, got {type(value).__name__}")
        min_ndim = 3 if field.endswith("_x") else 2
        if value.ndim < min_ndim:
            layout = "(tasks, examples, *features)" if min_ndim == 3 else "(tasks, examples, ...)"
            raise ValueError(
                f"{name}.{field}: expected a batch of episodes shaped {layout}, got shape "
                f"{value.shape}; use sample_episodes, or add a task axis to one episode with x[None]"
            )
    sx, sy, qx, qy = episodes
    tasks = sx.shape[0]
    for field, value in zip(Episode._fields, episodes):
        if value.shape[0] != tasks:
            raise ValueError(
                f"{name}.{field}: expected {tasks} tasks on axis 0 (as support_x), got {value.shape[0]}"
            )
    if sy.shape[1] != sx.shape[1] or qy.shape[1] != qx.shape[1]:
        raise ValueError(
            f"{name}: x and y must have the same number of examples per task; got support "
            f"{sx.shape[1]} vs {sy.shape[1]}, query {qx.shape[1]} vs {qy.shape[1]}"
        )
    if sx.shape[2:] != qx.shape[2:]:
        raise ValueError(
            f"{name}: support_x and query_x feature shapes differ: {sx.shape[2:]} vs {qx.shape[2:]}"
        )
    return tasks
