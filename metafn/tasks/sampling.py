"""Episode sampling for the toy families, with disjoint train / val / test task streams.

Key relations (all derivations use ``mx.random.split``, never bitwise ops, so they hold under
``mx.vmap`` and ``mx.compile``)::

    s            = mx.random.split(key, 3)[SPLITS.index(split)]     # the split's stream
    k_task, k_pts = mx.random.split(s, 2)
    task         = draw_task(k_task, family, N)                     # pool_size is None
                 = pool[randint(k_task, 0, pool_size)]              # finite pool
    episode      = points(k_pts, task, k_shot, n_query)

    sample_episodes(key, family, T, ...)[t] == sample_episode(mx.random.split(key, T)[t], ...)

(field by field: ``sample_episodes`` is ``mx.vmap`` of ``sample_episode`` over those keys.)

Why the splits are disjoint
---------------------------
*Unlimited tasks* (``pool_size=None``, the default; Finn et al.'s protocol of a fresh task per
episode): the task parameters are continuous and each split draws them from its own
sub-stream of the key. The same key therefore gives unrelated train, val and test tasks (passing
the training key to evaluation by mistake still evaluates on unseen tasks), and a test task
equals a training task with probability 0.

*Finite pools* (``pool_size=P``): each split has a fixed table of ``P`` tasks drawn once from
``pool_seed`` (``split(split(key(pool_seed), 2)[1], 3)[split_id]``), independent of the episode
keys; an episode picks one row of its split's table. Pools make disjointness checkable (compare
the tables, :func:`task_pool`), give the same meta-test set in every run, and model a finite
meta-training set (to study meta-overfitting). A pool is regenerated from its seed on each call
(``O(P)`` cheap draws); keep ``P`` below ~1e5.

Pooled baseline
---------------
:func:`sample_pooled` draws the training set of the "pre-train on all tasks pooled, then fine
tune" baseline: ``n_per_task`` examples (per class) from each of ``n_tasks`` tasks, concatenated.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import mlx.core as mx

from metafn.tasks.episode import Episode
from metafn.tasks.synthetic import (
    FAMILY_NAMES, Family, SineFamily, Task, Toy2DFamily, circles, draw_task, family_n_way, linear2d,
    sine, sine_points, spirals, toy2d_points, xor,
)

__all__ = [
    "SPLITS", "sample_episode", "sample_episodes", "sample_task", "task_pool", "sample_pooled",
    "family_from_name", "FAMILIES",
]

SPLITS = ("train", "val", "test")

FAMILIES: dict[str, Callable[..., Family]] = {
    "sine": sine, "linear2d": linear2d, "xor": xor, "circles": circles, "spirals": spirals,
}
assert tuple(FAMILIES) == FAMILY_NAMES


# ----------------------------------------------------------------------------- validation


def _check_key(key: object) -> None:
    if not isinstance(key, mx.array):
        raise TypeError(f"key: expected an mx.array PRNG key (mx.random.key(seed)), got {type(key).__name__}")
    if key.shape != (2,) or key.dtype != mx.uint32:
        raise ValueError(f"key: expected a uint32 key of shape (2,), got {key.dtype} {key.shape}")


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _split_id(split: object) -> int:
    if not isinstance(split, str):
        raise TypeError(f"split: expected one of {list(SPLITS)}, got {type(split).__name__}")
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    return SPLITS.index(split)


def _check_family(family: object) -> None:
    if not isinstance(family, (SineFamily, Toy2DFamily)):
        raise TypeError(
            f"family: expected a family spec such as metafn.tasks.sine() or "
            f"family_from_name({FAMILY_NAMES[1]!r}), got {type(family).__name__}"
        )


# ----------------------------------------------------------------------------- tasks


def _pool(family: Family, split_id: int, n_way: int) -> Task:
    """The finite task table of one split: every field has a leading axis ``pool_size``."""
    root = mx.random.split(mx.random.key(family.pool_seed), 2)[1]
    pool_key = mx.random.split(root, len(SPLITS))[split_id]
    assert family.pool_size is not None
    return draw_task(pool_key, family, n_way, (family.pool_size,))


def _task_of(k_task: mx.array, family: Family, n_way: int, pool: Task | None) -> Task:
    if pool is None:
        return draw_task(k_task, family, n_way)
    index = mx.random.randint(0, family.pool_size, (), key=k_task)
    return type(pool)(*(field[index] for field in pool))


def _streams(key: mx.array, split_id: int) -> tuple[mx.array, mx.array]:
    stream = mx.random.split(key, len(SPLITS))[split_id]
    k_task, k_pts = mx.random.split(stream, 2)
    return k_task, k_pts


def _episode(
    key: mx.array, family: Family, k_shot: int, n_query: int, n_way: int, split_id: int,
    pool: Task | None,
) -> Episode:
    k_task, k_pts = _streams(key, split_id)
    task = _task_of(k_task, family, n_way, pool)
    if isinstance(family, SineFamily):
        x, y = sine_points(k_pts, family, task, k_shot + n_query)
        return Episode(x[:k_shot], y[:k_shot], x[k_shot:], y[k_shot:])
    return Episode(*toy2d_points(k_pts, family, task, n_way, k_shot, n_query))


def _prepare(
    key: object, family: object, k_shot: object, n_query: object, n_way: object, split: object,
) -> tuple[int, int, Task | None]:
    _check_key(key)
    _check_family(family)
    _check_count("k_shot", k_shot)
    _check_count("n_query", n_query)
    split_id = _split_id(split)
    n = family_n_way(family, n_way)  # type: ignore[arg-type]
    pool = None if family.pool_size is None else _pool(family, split_id, n)  # type: ignore[union-attr]
    return n, split_id, pool


def sample_task(key: mx.array, family: Family, n_way: int | None = None, split: str = "train") -> Task:
    """The task parameters behind ``sample_episode(key, family, ..., n_way, split)``.

    Returns :class:`SineTask` ``(amplitude, phase)`` or :class:`Toy2DTask`
    ``(rotation, scale, translation, classes)``, scalars per field (``classes`` is ``(N,)``).
    """
    n, split_id, pool = _prepare(key, family, 1, 1, n_way, split)
    return _task_of(_streams(key, split_id)[0], family, n, pool)


def task_pool(family: Family, split: str = "train", n_way: int | None = None) -> Task:
    """The finite task table of ``split`` (requires ``family.pool_size``); every field has a
    leading axis of size ``pool_size``. Tables of different splits are independent draws."""
    _check_family(family)
    split_id = _split_id(split)
    if family.pool_size is None:
        raise ValueError(
            f"family: {family.name} has pool_size=None (unlimited tasks); pass pool_size=P to "
            f"its constructor to get finite per-split task pools"
        )
    return _pool(family, split_id, family_n_way(family, n_way))


def sample_episode(
    key: mx.array,
    family: Family,
    k_shot: int,
    n_query: int,
    n_way: int | None = None,
    split: str = "train",
) -> Episode:
    """One episode of one task of ``family`` from ``split``'s task stream.

    Regression (sine): ``support_x, support_y (K, 1)``, ``query_x, query_y (Q, 1)`` float32, all
    points of the same function. Classification: ``N = n_way`` (default ``family.n_way``) classes
    with exactly ``K`` support and ``Q`` query examples each: ``support_x (N K, 2)`` float32,
    ``support_y (N K,)`` int32 in ``0..N-1`` (label-major order), ``query_x (N Q, 2)``,
    ``query_y (N Q,)``; support and query points are distinct.

    Deterministic in ``key``; see the module docstring for how ``key`` and ``split`` are used.
    """
    n, split_id, pool = _prepare(key, family, k_shot, n_query, n_way, split)
    return _episode(key, family, k_shot, n_query, n, split_id, pool)


def sample_episodes(
    key: mx.array,
    family: Family,
    n_tasks: int,
    k_shot: int,
    n_query: int,
    n_way: int | None = None,
    split: str = "train",
) -> Episode:
    """A batch of ``n_tasks`` episodes: the fields of :func:`sample_episode` with a leading task
    axis ``T = n_tasks``. Episode ``t`` is ``sample_episode(mx.random.split(key, T)[t], ...)``,
    computed for all tasks at once with ``mx.vmap`` (usable inside ``mx.compile``)."""
    _check_count("n_tasks", n_tasks)
    n, split_id, pool = _prepare(key, family, k_shot, n_query, n_way, split)
    keys = mx.random.split(key, n_tasks)
    one = lambda k: tuple(_episode(k, family, k_shot, n_query, n, split_id, pool))  # noqa: E731
    return Episode(*mx.vmap(one)(keys))


def sample_pooled(
    key: mx.array,
    family: Family,
    n_tasks: int,
    n_per_task: int,
    n_way: int | None = None,
    split: str = "train",
) -> tuple[mx.array, mx.array]:
    """Training data for the "pre-train on all tasks pooled" baseline.

    ``n_per_task`` examples (per class, for classification) from each of ``n_tasks`` tasks,
    concatenated task by task: ``x (n_tasks * n_per_task [* N], d)``, ``y`` as in an episode.
    Block ``t`` comes from the task ``sample_task(mx.random.split(key, n_tasks)[t], ...)``.
    Classification labels follow each task's own labelling, so pooling tasks with
    ``shuffle_labels`` mixes conflicting labels (which is what that baseline has to live with).
    """
    _check_count("n_tasks", n_tasks)
    _check_count("n_per_task", n_per_task)
    n, split_id, pool = _prepare(key, family, n_per_task, 1, n_way, split)
    keys = mx.random.split(key, n_tasks)
    one = lambda k: _episode(k, family, n_per_task, 0, n, split_id, pool)[:2]  # noqa: E731
    x, y = mx.vmap(one)(keys)
    return x.reshape(-1, *x.shape[2:]), y.reshape(-1, *y.shape[2:])


# ----------------------------------------------------------------------------- names


def family_from_name(name: str, **kwargs: Any) -> Family:
    """The family spec called ``name`` (one of ``FAMILIES``) with constructor options ``kwargs``,
    e.g. ``family_from_name("spirals", noise=0.2, n_way=3)``."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a family name (one of {list(FAMILIES)}), got {type(name).__name__}")
    if name not in FAMILIES:
        raise ValueError(f"name: unknown task family {name!r}; valid names are {list(FAMILIES)}")
    ctor = FAMILIES[name]
    valid = list(inspect.signature(ctor).parameters)
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise TypeError(f"{unknown[0]}: not an option of the {name} family; valid options are {valid}")
    return ctor(**kwargs)
