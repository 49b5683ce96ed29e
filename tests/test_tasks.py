"""Toy task families and episode sampling (metafn.tasks.synthetic, metafn.tasks.sampling)."""

from __future__ import annotations

import math

import metafn  # noqa: F401  (before mlx)
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typeguard import TypeCheckError

from metafn.tasks import (
    FAMILIES, SPLITS, Episode, SineFamily, SineTask, Toy2DFamily, Toy2DTask, check_episode_batch,
    circles, family_from_name, linear2d, sample_episode, sample_episodes, sample_pooled,
    sample_task, sine, spirals, task_pool, xor,
)

TOY = ("linear2d", "xor", "circles", "spirals")
ALL = ("sine", *TOY)
BadType = (TypeError, TypeCheckError)  # typeguard (active in tests) may answer before our checks

seeds = st.integers(0, 2**31 - 1)


def key(seed: int) -> mx.array:
    return mx.random.key(seed)


def np_ep(ep: Episode) -> list[np.ndarray]:
    return [np.array(a) for a in ep]


def task_rows(task: SineTask | Toy2DTask) -> list[tuple[float, ...]]:
    """A table of tasks (leading axis) as one tuple of all parameters per task."""
    cols = [np.array(f).astype(np.float64).reshape(np.array(f).shape[0], -1) for f in task]
    return [tuple(r) for r in np.concatenate(cols, axis=1).tolist()]


def task_row(task: SineTask | Toy2DTask) -> tuple[float, ...]:
    """One task's parameters as a tuple."""
    return task_rows(type(task)(*(f[None] for f in task)))[0]


def ep_equal(a: Episode, b: Episode) -> bool:
    return all(x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)
               for x, y in zip(np_ep(a), np_ep(b)))


# ----------------------------------------------------------------------------- determinism


@given(seed=seeds, name=st.sampled_from(ALL), split=st.sampled_from(SPLITS))
def test_same_key_same_episode(seed: int, name: str, split: str) -> None:
    fam = family_from_name(name)
    a = sample_episode(key(seed), fam, 3, 4, split=split)
    b = sample_episode(key(seed), fam, 3, 4, split=split)
    assert ep_equal(a, b)
    ba = sample_episodes(key(seed), fam, 3, 2, 2, split=split)
    bb = sample_episodes(key(seed), fam, 3, 2, 2, split=split)
    assert ep_equal(ba, bb)


@pytest.mark.parametrize("name", ALL)
def test_different_keys_different_episodes(name: str) -> None:
    fam = family_from_name(name)
    xs = [np.array(sample_episode(key(s), fam, 2, 2).support_x).ravel() for s in range(20)]
    for i in range(len(xs)):
        for j in range(i):
            assert not np.array_equal(xs[i], xs[j])
    assert len({task_row(sample_task(key(s), fam)) for s in range(20)}) == 20


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("pool", [None, 7])
def test_batched_equals_stacked_singles(name: str, pool: int | None) -> None:
    """sample_episodes(key, T)[t] == sample_episode(mx.random.split(key, T)[t]) exactly."""
    fam = family_from_name(name, pool_size=pool)
    n_way = None if name == "sine" else 3
    batch = sample_episodes(key(5), fam, 4, 2, 3, n_way=n_way, split="val")
    keys = mx.random.split(key(5), 4)
    singles = [sample_episode(keys[t], fam, 2, 3, n_way=n_way, split="val") for t in range(4)]
    stacked = Episode(*(mx.stack([s[f] for s in singles]) for f in range(4)))
    assert ep_equal(batch, stacked)


def test_sampling_inside_vmap_matches_python_loop() -> None:
    fam = spirals(n_way=3)
    keys = mx.random.split(key(11), 3)
    f = lambda k: tuple(sample_episode(k, fam, 2, 2))  # noqa: E731
    vm = mx.vmap(f)(keys)
    for t in range(3):
        for a, b in zip(vm, f(keys[t])):
            assert np.array_equal(np.array(a[t]), np.array(b))


# ----------------------------------------------------------------------------- shapes and labels


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_dtypes(name: str) -> None:
    fam = family_from_name(name)
    ep = sample_episode(key(0), fam, 5, 7)
    if name == "sine":
        assert [a.shape for a in ep] == [(5, 1), (5, 1), (7, 1), (7, 1)]
        assert all(a.dtype == mx.float32 for a in ep)
    else:
        assert [a.shape for a in ep] == [(10, 2), (10,), (14, 2), (14,)]
        assert [a.dtype for a in ep] == [mx.float32, mx.int32, mx.float32, mx.int32]
    batch = sample_episodes(key(0), fam, 6, 5, 7)
    assert check_episode_batch(batch) == 6
    assert [a.shape for a in batch] == [(6, *a.shape) for a in ep]
    assert [a.dtype for a in batch] == [a.dtype for a in ep]
    assert all(np.isfinite(np.array(a)).all() for a in batch if a.dtype == mx.float32)


@given(seed=seeds, name=st.sampled_from(TOY), n_way=st.integers(2, 5), k=st.integers(1, 5),
       q=st.integers(1, 5), noise=st.sampled_from([0.0, 0.1, 0.5]))
def test_exactly_k_per_class_and_labels(seed: int, name: str, n_way: int, k: int, q: int,
                                        noise: float) -> None:
    fam = family_from_name(name, noise=noise)
    ep = sample_episode(key(seed), fam, k, q, n_way=n_way)
    sy, qy = np.array(ep.support_y), np.array(ep.query_y)
    assert np.array_equal(np.bincount(sy, minlength=n_way), np.full(n_way, k))
    assert np.array_equal(np.bincount(qy, minlength=n_way), np.full(n_way, q))
    assert set(sy.tolist()) == set(range(n_way)) == set(qy.tolist())
    # documented layout: label-major
    assert np.array_equal(sy, np.repeat(np.arange(n_way), k))
    assert np.array_equal(qy, np.repeat(np.arange(n_way), q))


@given(seed=seeds, name=st.sampled_from(ALL), k=st.integers(1, 10), q=st.integers(1, 10),
       noise=st.sampled_from([0.0, 0.1]))
def test_support_and_query_disjoint(seed: int, name: str, k: int, q: int, noise: float) -> None:
    fam = sine() if name == "sine" else family_from_name(name, noise=noise)
    ep = sample_episode(key(seed), fam, k, q)
    sx, qx = np.array(ep.support_x), np.array(ep.query_x)
    both = np.concatenate([sx, qx])
    assert len(np.unique(both, axis=0)) == len(both)  # all points distinct


def test_family_default_n_way_and_override() -> None:
    assert sample_episode(key(0), circles(n_way=4), 2, 1).support_y.shape == (8,)
    assert sample_episode(key(0), circles(n_way=4), 2, 1, n_way=3).support_y.shape == (6,)
    assert sample_episode(key(0), sine(), 2, 1, n_way=1).support_y.shape == (2, 1)


# ----------------------------------------------------------------------------- semantics


@given(seed=seeds, split=st.sampled_from(SPLITS))
def test_sine_task_recoverable_and_in_range(seed: int, split: str) -> None:
    fam = sine()
    ep = sample_episode(key(seed), fam, 5, 5, split=split)
    task = sample_task(key(seed), fam, split=split)
    a, phi = task.amplitude.item(), task.phase.item()
    assert 0.1 <= a <= 5.0 and 0.0 <= phi <= math.pi
    for x, y in ((ep.support_x, ep.support_y), (ep.query_x, ep.query_y)):
        x, y = np.array(x), np.array(y)
        assert ((x >= -5.0) & (x <= 5.0)).all()
        assert (np.abs(y) <= a + 1e-5).all()
        np.testing.assert_allclose(y, a * np.sin(x - phi), atol=1e-5)


def test_sine_parameter_ranges_over_many_tasks() -> None:
    fam = sine(amp_range=(1.0, 2.0), phase_range=(0.5, 1.0), x_range=(0.0, 3.0))
    keys = mx.random.split(key(3), 400)
    params = [sample_task(keys[i], fam) for i in range(0, 400, 4)]
    amps = np.array([p.amplitude.item() for p in params])
    phases = np.array([p.phase.item() for p in params])
    assert amps.min() >= 1.0 and amps.max() <= 2.0 and amps.max() - amps.min() > 0.7
    assert phases.min() >= 0.5 and phases.max() <= 1.0
    batch = sample_episodes(key(3), fam, 200, 5, 5)
    x = np.array(batch.support_x)
    assert x.min() >= 0.0 and x.max() <= 3.0 and x.max() - x.min() > 2.5
    # y = A sin(x - phi) with A in [1, 2]: |y| <= 2 everywhere, and the per-task amplitude
    # read off the data never exceeds the range
    amp_seen = np.abs(np.array(batch.query_y)).max(axis=(1, 2))
    assert (amp_seen <= 2.0 + 1e-5).all()


def _canonical_class(name: str, p: np.ndarray, n_way: int, turns: float) -> np.ndarray:
    """Which canonical class a noise-free canonical point belongs to (numpy reference)."""
    w = 2.0 / n_way
    if name == "linear2d":
        return np.floor((p[:, 0] + 1) / w).astype(int)
    if name == "xor":
        i, j = np.floor((p[:, 0] + 1) / w), np.floor((p[:, 1] + 1) / w)
        return ((i + j) % n_way).astype(int)
    r = np.linalg.norm(p, axis=1)
    if name == "circles":
        return np.rint(r * n_way - 1).astype(int)
    angle = np.arctan2(p[:, 1], p[:, 0]) / (2 * np.pi) - turns * r  # = c / N  (mod 1)
    return np.rint(np.mod(angle, 1.0) * n_way).astype(int) % n_way


@given(seed=seeds, name=st.sampled_from(TOY), n_way=st.integers(2, 4), split=st.sampled_from(SPLITS))
def test_points_lie_in_their_class_region(seed: int, name: str, n_way: int, split: str) -> None:
    """Undo the task's transform (noise = 0): every point is in the region of classes[label]."""
    fam = family_from_name(name, noise=0.0)
    ep = sample_episode(key(seed), fam, 4, 4, n_way=n_way, split=split)
    task = sample_task(key(seed), fam, n_way=n_way, split=split)
    assert isinstance(task, Toy2DTask)
    th, s, t = task.rotation.item(), task.scale.item(), np.array(task.translation)
    classes = np.array(task.classes)
    assert sorted(classes.tolist()) == list(range(n_way))
    assert 0.75 <= s <= 1.25 and 0 <= th <= 2 * np.pi and (np.abs(t) <= 0.25).all()
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    for x, y in ((ep.support_x, ep.support_y), (ep.query_x, ep.query_y)):
        p = (np.array(x) - t) @ rot / s  # R^T (x - t) / s, row-wise
        assert (np.abs(p) <= 1.0 + 1e-4).all()
        got = _canonical_class(name, p.astype(np.float64), n_way, fam.turns)
        assert np.array_equal(got, classes[np.array(y)])


def test_noise_spreads_points() -> None:
    """circles: with noise the ring radius varies; without it it is exact."""
    for noise, lo, hi in ((0.0, 0.0, 1e-4), (0.3, 0.05, 10.0)):
        fam = circles(noise=noise, rotation_range=(0, 0), scale_range=(1, 1), translation_range=(0, 0),
                      shuffle_labels=False)
        ep = sample_episode(key(1), fam, 50, 1)
        r = np.linalg.norm(np.array(ep.support_x[:50]), axis=1)  # label 0 = inner ring, radius 0.5
        assert lo <= r.std() <= hi and abs(np.median(r) - 0.5) < 0.1


def test_tasks_vary_so_meta_learning_is_needed() -> None:
    """Across tasks the same point gets different labels (rotation, translation, labelling), so
    no single classifier solves the family: the 1-NN label of the origin varies from task to task."""
    for name in TOY:
        eps = sample_episodes(key(4), family_from_name(name), 200, 30, 1)
        sx, sy = np.array(eps.support_x), np.array(eps.support_y)
        nearest = np.linalg.norm(sx, axis=-1).argmin(axis=1)
        label_at_origin = sy[np.arange(200), nearest]
        assert 0.25 < label_at_origin.mean() < 0.75, name
        tasks = [sample_task(k, family_from_name(name)) for k in mx.random.split(key(4), 30)]
        assert len({round(t.rotation.item(), 6) for t in tasks}) == 30


def test_nearest_neighbour_solves_clean_tasks() -> None:
    """Classes are well defined: 1-NN on 30 support points per class is accurate at low noise."""
    for name in TOY:
        eps = sample_episodes(key(2), family_from_name(name, noise=0.05), 10, 30, 20)
        sx, sy, qx, qy = np_ep(eps)
        d = ((qx[:, :, None, :] - sx[:, None, :, :]) ** 2).sum(-1)
        pred = np.take_along_axis(sy, d.argmin(-1), axis=1)
        assert (pred == qy).mean() > 0.9, name


# ----------------------------------------------------------------------------- splits and pools


def test_splits_use_independent_streams() -> None:
    """The same key gives unrelated tasks in train, val and test."""
    fam = sine()
    keys = mx.random.split(key(9), 200)
    tasks = {s: [sample_task(keys[i], fam, split=s) for i in range(200)] for s in SPLITS}
    rows = {s: {task_row(t) for t in tasks[s]} for s in SPLITS}
    amps = {s: np.array([t.amplitude.item() for t in tasks[s]]) for s in SPLITS}
    for a in SPLITS:
        assert len(rows[a]) == 200
        for b in SPLITS:
            if a < b:
                assert not rows[a] & rows[b]  # no shared task
                assert abs(np.corrcoef(amps[a], amps[b])[0, 1]) < 0.25  # unrelated for one key


@given(seed=seeds, name=st.sampled_from(ALL))
def test_split_changes_the_task_for_the_same_key(seed: int, name: str) -> None:
    fam = family_from_name(name)
    rows = {task_row(sample_task(key(seed), fam, split=s)) for s in SPLITS}
    assert len(rows) == 3


@pytest.mark.parametrize("name", ALL)
def test_pools_disjoint_and_fixed(name: str) -> None:
    fam = family_from_name(name, pool_size=50)
    tables = {s: task_pool(fam, s) for s in SPLITS}
    rows = {s: set(task_rows(tables[s])) for s in SPLITS}
    for a in SPLITS:
        assert len(rows[a]) == 50  # distinct tasks within a pool
        for b in SPLITS:
            if a < b:
                assert not rows[a] & rows[b]  # pools are disjoint
    # deterministic in the family spec (pool_seed), not in any episode key
    assert set(task_rows(task_pool(family_from_name(name, pool_size=50), "test"))) == rows["test"]
    other = set(task_rows(task_pool(family_from_name(name, pool_size=50, pool_seed=1), "test")))
    assert not other & rows["test"]


@pytest.mark.parametrize("name", ["sine", "xor"])
def test_pool_episodes_come_from_their_split_pool(name: str) -> None:
    fam = family_from_name(name, pool_size=5)
    rows = {s: set(task_rows(task_pool(fam, s))) for s in SPLITS}
    for split in SPLITS:
        seen = {task_row(sample_task(key(i), fam, split=split)) for i in range(40)}
        assert seen <= rows[split]  # only tasks of this split's pool ...
        assert 3 <= len(seen) <= 5  # ... which is reused
    ep = sample_episode(key(3), fam, 4, 4, split="test")
    t = sample_task(key(3), fam, split="test")
    if name == "sine":  # the episode really is the pooled task's function
        np.testing.assert_allclose(np.array(ep.support_y),
                                   t.amplitude.item() * np.sin(np.array(ep.support_x) - t.phase.item()),
                                   atol=1e-5)


def test_task_pool_requires_pool_size() -> None:
    with pytest.raises(ValueError, match="pool_size"):
        task_pool(sine(), "train")


# ----------------------------------------------------------------------------- pooled baseline


@pytest.mark.parametrize("name", ["sine", "circles"])
def test_sample_pooled(name: str) -> None:
    fam = family_from_name(name)
    x, y = sample_pooled(key(6), fam, 8, 3)
    assert x.shape == ((24, 1) if name == "sine" else (48, 2)) and y.shape[0] == x.shape[0]
    assert ep_equal(Episode(x, y, x, y), Episode(*sample_pooled(key(6), fam, 8, 3), x, y))
    if name == "sine":  # block t is task t of split(key, n_tasks)
        keys = mx.random.split(key(6), 8)
        for t in range(8):
            task = sample_task(keys[t], fam)
            xs, ys = np.array(x[3 * t:3 * t + 3]), np.array(y[3 * t:3 * t + 3])
            np.testing.assert_allclose(ys, task.amplitude.item() * np.sin(xs - task.phase.item()),
                                       atol=1e-5)
    else:
        assert np.array_equal(np.bincount(np.array(y)), [24, 24])
    with pytest.raises(ValueError, match="n_per_task"):
        sample_pooled(key(6), fam, 8, 0)


# ----------------------------------------------------------------------------- names and errors


def test_family_from_name() -> None:
    assert FAMILIES.keys() == set(ALL)
    assert family_from_name("sine") == sine()
    assert isinstance(family_from_name("sine"), SineFamily)
    fam = family_from_name("spirals", noise=0.2, n_way=3, turns=1.5)
    assert isinstance(fam, Toy2DFamily) and (fam.noise, fam.n_way, fam.turns, fam.name) == (0.2, 3, 1.5, "spirals")
    assert family_from_name("xor") == xor() and family_from_name("linear2d") == linear2d()
    with pytest.raises(ValueError, match=r"name.*'sine', 'linear2d', 'xor', 'circles', 'spirals'"):
        family_from_name("sinus")
    with pytest.raises(TypeError, match="turns"):
        family_from_name("xor", turns=2.0)
    with pytest.raises(BadType, match="name"):
        family_from_name(3)  # type: ignore[arg-type]


def test_family_specs_are_frozen_and_hashable() -> None:
    fam = sine()
    with pytest.raises(Exception):
        fam.amp_range = (1.0, 2.0)  # type: ignore[misc]
    assert hash(fam) == hash(sine()) and isinstance(sample_task(key(0), fam), SineTask)


@pytest.mark.parametrize(
    "kwargs, exc, arg",
    [
        ({"k_shot": 0}, ValueError, "k_shot"),
        ({"n_query": 0}, ValueError, "n_query"),
        ({"k_shot": 2.5}, BadType, "k_shot"),
        ({"k_shot": True}, BadType, "k_shot"),
        ({"n_query": "3"}, BadType, "n_query"),
        ({"n_way": 1}, ValueError, "n_way"),
        ({"n_way": 1.0}, BadType, "n_way"),
        ({"split": "dev"}, ValueError, "split"),
        ({"split": 0}, BadType, "split"),
    ],
)
def test_bad_episode_arguments(kwargs: dict, exc: type | tuple, arg: str) -> None:
    args = {"k_shot": 2, "n_query": 2, "n_way": None, "split": "train", **kwargs}
    with pytest.raises(exc, match=arg):
        sample_episode(key(0), xor(), **args)
    with pytest.raises(exc, match=arg):
        sample_episodes(key(0), xor(), 2, **args)


def test_bad_arguments_other() -> None:
    with pytest.raises(ValueError, match="n_way.*regression"):
        sample_episode(key(0), sine(), 2, 2, n_way=2)
    with pytest.raises(ValueError, match="n_tasks"):
        sample_episodes(key(0), sine(), 0, 2, 2)
    with pytest.raises(ValueError, match="key"):
        sample_episode(mx.zeros((3,), dtype=mx.uint32), sine(), 2, 2)
    with pytest.raises(BadType, match="key"):
        sample_episode(0, sine(), 2, 2)  # type: ignore[arg-type]
    with pytest.raises(BadType, match="family"):
        sample_episode(key(0), "sine", 2, 2)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "ctor, kwargs, arg",
    [
        (sine, {"amp_range": (5.0, 1.0)}, "amp_range"),
        (sine, {"phase_range": (0.0,)}, "phase_range"),
        (sine, {"x_range": (0.0, float("inf"))}, "x_range"),
        (sine, {"pool_size": 0}, "pool_size"),
        (xor, {"noise": -0.1}, "noise"),
        (xor, {"n_way": 1}, "n_way"),
        (circles, {"scale_range": (0.0, 1.0)}, "scale_range"),
        (spirals, {"turns": 0.0}, "turns"),
        (linear2d, {"pool_seed": -1}, "pool_seed"),
    ],
)
def test_bad_family_options(ctor, kwargs: dict, arg: str) -> None:  # noqa: ANN001
    with pytest.raises((ValueError, *BadType), match=arg):
        ctor(**kwargs)


# ----------------------------------------------------------------------------- learnability


@pytest.mark.slow
@pytest.mark.parametrize("name", ["xor", "spirals"])
def test_meta_learning_pays_off(name: str) -> None:
    """Tasks are learnable from a meta-learned init and not from a random one: a short MAML run
    (200 meta-steps) gives >= 85% 2-way 5-shot accuracy after 3 steps; a random init stays far
    below."""
    from metafn.losses import accuracy, cross_entropy_loss
    from metafn.nn import mlp_apply, mlp_init
    from metafn.optim import adam, apply_updates
    from metafn.outer import batched_adapt, maml_outer
    from metafn.tree import tree_broadcast

    fam = family_from_name(name)
    loss = cross_entropy_loss(mlp_apply)
    params = mlp_init(key(1), [2, 40, 40, 2])
    opt = adam(3e-3)
    state = opt.init(params)
    for i in range(200):
        eps = sample_episodes(key(100 + i), fam, 8, 5, 10)
        _, grads = maml_outer(loss, params, eps, 0.5, 3)
        updates, state = opt.update(grads, state, params)
        params = apply_updates(params, updates)
        mx.eval(params, state)

    test = sample_episodes(key(7), fam, 100, 5, 20, split="test")

    def adapted_accuracy(p: list) -> float:
        a = batched_adapt(loss, tree_broadcast(p, 100), test.support_x, test.support_y, 3, 0.5)
        return accuracy(mx.vmap(mlp_apply)(a, test.query_x), test.query_y).item()

    meta, scratch = adapted_accuracy(params), adapted_accuracy(mlp_init(key(2), [2, 40, 40, 2]))
    assert meta >= 0.85 and meta - scratch >= 0.15, (meta, scratch)
