"""Invariants of the outer loops (DESIGN.md section 4) and finite-difference checks."""

from __future__ import annotations

import chex
import metafn  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, strategies as st
from typeguard import TypeCheckError

from helpers import MSE_MLP, assert_trees_close, to_numpy, random_episodes, small_mlp
from metafn.inner import adapt
from metafn.outer import (
    LSLRParams, fomaml_outer, lslr_init, lslr_outer, lslr_rates, lslr_steps, maml_outer, metasgd_init,
    metasgd_outer, protonet_logits, protonet_outer, soft_kmeans_logits, reptile_grad, reptile_outer, task_batched, vmap_tasks,
)
from metafn.tasks import Episode
from metafn.tree import tree_leaves, tree_add, tree_broadcast, tree_dot, tree_map, tree_mean_axis0, tree_scale, tree_stack, tree_sub


def loop_maml_loss(params, eps, lr, steps, first_order=False):
    total = 0.0
    for t in range(eps.support_x.shape[0]):
        adapted = adapt(MSE_MLP, params, eps.support_x[t], eps.support_y[t], steps, lr, first_order)
        total = total + MSE_MLP(adapted, eps.query_x[t], eps.query_y[t])
    return total / eps.support_x.shape[0]


@given(seed=st.integers(0, 10_000), tasks=st.integers(1, 4), steps=st.integers(0, 3))
def test_maml_vmap_equals_loop(seed, tasks, steps):
    params = small_mlp(seed)
    eps = random_episodes(seed + 1, tasks=tasks)
    loss, grads = maml_outer(MSE_MLP, params, eps, 0.05, steps)
    chex.assert_rank(loss, 0)
    chex.assert_trees_all_equal_shapes(to_numpy(grads), to_numpy(params))
    loop_loss, loop_grads = mx.value_and_grad(lambda p: loop_maml_loss(p, eps, 0.05, steps))(params)
    np.testing.assert_allclose(loss.item(), loop_loss.item(), rtol=1e-5)
    assert_trees_close(grads, loop_grads, rtol=2e-4, atol=1e-5)


def test_maml_zero_steps_is_plain_query_gradient():
    params = small_mlp(1)
    eps = random_episodes(2, tasks=3)

    def pooled(p):
        return sum(MSE_MLP(p, eps.query_x[t], eps.query_y[t]) for t in range(3)) / 3

    loss, grads = maml_outer(MSE_MLP, params, eps, 0.1, 0)
    ref_loss, ref_grads = mx.value_and_grad(pooled)(params)
    np.testing.assert_allclose(loss.item(), ref_loss.item(), rtol=1e-6)
    assert_trees_close(grads, ref_grads)


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_meta_gradient_matches_central_finite_differences(steps):
    params = small_mlp(3, sizes=(1, 6, 6, 1), dtype=mx.float64)
    eps = random_episodes(4, tasks=2, dtype=mx.float64)
    lr = 0.1
    objective = lambda p: maml_outer(MSE_MLP, p, eps, lr, steps)[0]  # noqa: E731
    _, grads = maml_outer(MSE_MLP, params, eps, lr, steps)
    rng = np.random.default_rng(0)
    for _ in range(4):
        direction = tree_map(lambda x: mx.array(rng.standard_normal(x.shape), dtype=mx.float64), params)
        eps_fd = 1e-5
        plus = objective(tree_add(params, tree_scale(direction, eps_fd)))
        minus = objective(tree_sub(params, tree_scale(direction, eps_fd)))
        fd = (plus - minus).item() / (2 * eps_fd)
        analytic = tree_dot(grads, direction).item()
        np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-9)


def test_second_order_differs_from_first_order():
    params = small_mlp(5)
    eps = random_episodes(6, tasks=3)
    _, g2 = maml_outer(MSE_MLP, params, eps, 0.3, 2)
    _, g1 = fomaml_outer(MSE_MLP, params, eps, 0.3, 2)
    deltas = [float(mx.abs(x - y).max().item()) for x, y in zip(tree_leaves(g1), tree_leaves(g2))]
    assert max(deltas) > 1e-4


def test_fomaml_is_query_gradient_at_adapted_params():
    params = small_mlp(7)
    eps = random_episodes(8, tasks=3)
    _, grads = fomaml_outer(MSE_MLP, params, eps, 0.1, 2)
    per_task = []
    for t in range(3):
        adapted = adapt(MSE_MLP, params, eps.support_x[t], eps.support_y[t], 2, 0.1)
        per_task.append(mx.grad(MSE_MLP)(adapted, eps.query_x[t], eps.query_y[t]))
    assert_trees_close(grads, tree_mean_axis0(tree_stack(per_task)), rtol=1e-4, atol=1e-6)


@given(seed=st.integers(0, 10_000))
def test_task_order_does_not_matter(seed):
    params = small_mlp(seed)
    eps = random_episodes(seed + 3, tasks=4)
    perm = mx.array(np.random.default_rng(seed).permutation(4))
    shuffled = Episode(*[x[perm] for x in eps])
    l1, g1 = maml_outer(MSE_MLP, params, eps, 0.05, 2)
    l2, g2 = maml_outer(MSE_MLP, params, shuffled, 0.05, 2)
    np.testing.assert_allclose(l1.item(), l2.item(), rtol=1e-5)
    assert_trees_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_compile_equals_eager():
    params = small_mlp(9)
    eps = random_episodes(10, tasks=3)
    fn = lambda p, e: maml_outer(MSE_MLP, p, e, 0.05, 3)  # noqa: E731
    l1, g1 = fn(params, eps)
    l2, g2 = mx.compile(fn)(params, eps)
    np.testing.assert_allclose(l1.item(), l2.item(), rtol=1e-5)
    assert_trees_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_task_batched_loss_is_used_as_given():
    params = small_mlp(11)
    eps = random_episodes(12, tasks=2)
    calls = []

    def batched(p, x, y):
        calls.append(x.shape)
        return vmap_tasks(MSE_MLP).fn(p, x, y)

    l1, g1 = maml_outer(task_batched(batched), params, eps, 0.05, 1)
    l2, g2 = maml_outer(MSE_MLP, params, eps, 0.05, 1)
    assert calls and all(s[0] == 2 for s in calls)
    np.testing.assert_allclose(l1.item(), l2.item(), rtol=1e-6)
    assert_trees_close(g1, g2)


@given(seed=st.integers(0, 10_000), beta=st.floats(0.0, 1.0))
def test_reptile_outer_on_segment(seed, beta):
    params = small_mlp(seed)
    adapted = tree_stack([small_mlp(seed + 1), small_mlp(seed + 2)])
    new = reptile_outer(params, adapted, beta)
    mean = tree_mean_axis0(adapted)
    assert_trees_close(new, tree_add(params, tree_scale(tree_sub(mean, params), beta)), rtol=1e-5, atol=1e-6)
    assert_trees_close(reptile_outer(params, adapted, 0.0), params, rtol=0, atol=0)


def test_reptile_outer_lr_one_single_task_gives_adapted():
    params = small_mlp(13)
    adapted = small_mlp(14)
    out = reptile_outer(params, tree_broadcast(adapted, 1), 1.0)
    assert_trees_close(out, adapted, rtol=1e-6, atol=1e-7)


def test_reptile_grad_is_theta_minus_mean_adapted():
    params = small_mlp(15)
    eps = random_episodes(16, tasks=2)
    _, direction = reptile_grad(MSE_MLP, params, eps, 0.05, 3)
    adapted = []
    for t in range(2):
        x = mx.concatenate([eps.support_x[t], eps.query_x[t]])
        y = mx.concatenate([eps.support_y[t], eps.query_y[t]])
        adapted.append(adapt(MSE_MLP, params, x, y, 3, 0.05))
    expected = tree_sub(params, tree_mean_axis0(tree_stack(adapted)))
    assert_trees_close(direction, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="outer_lr"):
        reptile_outer(params, tree_broadcast(params, 1), float("nan"))


@given(seed=st.integers(0, 10_000), batches=st.integers(1, 4), steps=st.integers(1, 5))
def test_reptile_grad_minibatches_are_interleaved_and_cycled(seed, batches, steps):
    """Inner step s trains on z[s mod B :: B] of z = concat(support, query); the loss is that
    last step's minibatch loss before the step, averaged over tasks."""
    params = small_mlp(seed)
    eps = random_episodes(seed + 1, tasks=2)
    loss, direction = reptile_grad(MSE_MLP, params, eps, 0.05, steps, inner_batches=batches)
    adapted, last = [], []
    for t in range(2):
        x = mx.concatenate([eps.support_x[t], eps.query_x[t]])
        y = mx.concatenate([eps.support_y[t], eps.query_y[t]])
        p = params
        for s in range(steps):
            xb, yb = x[s % batches::batches], y[s % batches::batches]
            if s == steps - 1:
                last.append(MSE_MLP(p, xb, yb).item())
            p = adapt(MSE_MLP, p, xb, yb, 1, 0.05)
        adapted.append(p)
    assert_trees_close(direction, tree_sub(params, tree_mean_axis0(tree_stack(adapted))), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(loss.item(), np.mean(last), rtol=1e-5)


def test_reptile_grad_rejects_bad_inner_batches():
    params = small_mlp(3)
    eps = random_episodes(4, tasks=2)
    n = eps.support_x.shape[1] + eps.query_x.shape[1]
    for bad in (0, n + 1, True):
        with pytest.raises(ValueError, match=rf"inner_batches: expected an int in 1\.\.{n}"):
            reptile_grad(MSE_MLP, params, eps, 0.05, 2, inner_batches=bad)


@given(seed=st.integers(0, 10_000), lr=st.floats(0.001, 0.2))
def test_metasgd_with_constant_rates_equals_maml(seed, lr):
    params = small_mlp(seed)
    eps = random_episodes(seed + 5, tasks=2)
    l1, g1 = metasgd_outer(MSE_MLP, metasgd_init(params, lr), eps, 2)
    l2, g2 = maml_outer(MSE_MLP, params, eps, lr, 2)
    np.testing.assert_allclose(l1.item(), l2.item(), rtol=1e-5)
    assert_trees_close(g1.params, g2, rtol=1e-4, atol=1e-6)


def test_metasgd_rate_gradient_matches_finite_differences():
    params = small_mlp(17, sizes=(1, 5, 1), dtype=mx.float64)
    eps = random_episodes(18, tasks=2, dtype=mx.float64)
    meta = metasgd_init(params, 0.05)
    _, grads = metasgd_outer(MSE_MLP, meta, eps, 2)
    rng = np.random.default_rng(1)
    v = tree_map(lambda x: mx.array(rng.standard_normal(x.shape), dtype=mx.float64), meta.lr)
    h = 1e-6
    f = lambda lr_tree: metasgd_outer(MSE_MLP, meta._replace(lr=lr_tree), eps, 2)[0].item()  # noqa: E731
    fd = (f(tree_add(meta.lr, tree_scale(v, h))) - f(tree_sub(meta.lr, tree_scale(v, h)))) / (2 * h)
    np.testing.assert_allclose(tree_dot(grads.lr, v).item(), fd, rtol=1e-5, atol=1e-9)


def test_protonet_logits_are_negative_squared_distances_to_class_means():
    rng = np.random.default_rng(0)
    s = mx.array(rng.standard_normal((6, 3)), dtype=mx.float32)
    sy = mx.array([0, 0, 1, 1, 2, 2])
    q = mx.array(rng.standard_normal((4, 3)), dtype=mx.float32)
    logits = np.array(protonet_logits(s, sy, q, 3))
    protos = np.array(s).reshape(3, 2, 3).mean(axis=1)
    expected = -((np.array(q)[:, None, :] - protos[None]) ** 2).sum(-1)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def _soft_kmeans_reference(s, sy, q, n_way, steps):
    """Ren et al.'s refinement written out with loops in float64."""
    s, q = np.asarray(s, np.float64), np.asarray(q, np.float64)
    protos = np.stack([s[sy == k].mean(0) for k in range(n_way)])
    for _ in range(steps):
        d = ((q[:, None] - protos[None]) ** 2).sum(-1)
        z = np.exp(-(d - d.min(1, keepdims=True)))
        z /= z.sum(1, keepdims=True)
        protos = np.stack([(s[sy == k].sum(0) + (z[:, k:k + 1] * q).sum(0)) / ((sy == k).sum() + z[:, k].sum())
                           for k in range(n_way)])
    return -((q[:, None] - protos[None]) ** 2).sum(-1)


@given(seed=st.integers(0, 2**16), steps=st.integers(0, 3), shots=st.integers(1, 3))
def test_soft_kmeans_logits_match_the_written_out_refinement(seed, steps, shots):
    rng = np.random.default_rng(seed)
    sy = np.repeat(np.arange(3), shots)
    s, q = rng.standard_normal((3 * shots, 4)), rng.standard_normal((7, 4))
    logits = soft_kmeans_logits(mx.array(s, dtype=mx.float32), mx.array(sy), mx.array(q, dtype=mx.float32), 3, steps)
    np.testing.assert_allclose(np.array(logits), _soft_kmeans_reference(s, sy, q, 3, steps), rtol=1e-4, atol=1e-4)


def test_soft_kmeans_with_zero_steps_is_protonet_and_queries_permute_with_their_logits():
    rng = np.random.default_rng(3)
    s = mx.array(rng.standard_normal((6, 3)), dtype=mx.float32)
    sy = mx.array([0, 0, 1, 1, 2, 2])
    q = mx.array(rng.standard_normal((5, 3)), dtype=mx.float32)
    np.testing.assert_array_equal(np.array(soft_kmeans_logits(s, sy, q, 3, 0)), np.array(protonet_logits(s, sy, q, 3)))
    perm = mx.array([3, 0, 4, 1, 2])
    np.testing.assert_allclose(np.array(soft_kmeans_logits(s, sy, q[perm], 3, 2)),
                               np.array(soft_kmeans_logits(s, sy, q, 3, 2))[np.array(perm)], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="steps"):
        soft_kmeans_logits(s, sy, q, 3, -1)


def test_soft_kmeans_moves_prototypes_to_the_query_clusters():
    # Query clusters at x = -2 and x = 1.3; the one-shot supports sit at x = 0 and x = 2.6, so the
    # query at 1.2 is nearer support 0 and plain ProtoNet gets it wrong. Refinement pulls
    # prototype 0 to the left cluster and prototype 1 to the right one, which fixes it.
    s = mx.array([[0.0, 0.0], [2.6, 0.0]])
    sy = mx.array([0, 1])
    q = mx.array([[-2.1, 0.0], [-1.9, 0.0], [1.2, 0.0], [1.4, 0.0]])
    plain = np.array(protonet_logits(s, sy, q, 2)).argmax(1)
    refined = np.array(soft_kmeans_logits(s, sy, q, 2, 3)).argmax(1)
    assert plain.tolist() == [0, 0, 0, 1]
    assert refined.tolist() == [0, 0, 1, 1]


def test_bad_inputs_name_the_argument():
    params = small_mlp(0)
    eps = random_episodes(1, tasks=2)
    with pytest.raises(ValueError, match="inner_lr"):
        maml_outer(MSE_MLP, params, eps, float("nan"), 1)
    with pytest.raises(ValueError, match="steps"):
        maml_outer(MSE_MLP, params, eps, 0.1, -1)
    with pytest.raises(ValueError, match="episodes.query_x"):
        maml_outer(MSE_MLP, params, eps._replace(query_x=eps.query_x[:1]), 0.1, 1)
    with pytest.raises(ValueError, match="episodes.support_x"):
        maml_outer(MSE_MLP, params, Episode(*[x[0] for x in eps]), 0.1, 1)
    with pytest.raises((TypeError, TypeCheckError), match="episodes"):
        maml_outer(MSE_MLP, params, tuple(eps), 0.1, 1)


def test_typeguard_checks_public_annotations_during_tests():
    with pytest.raises(TypeCheckError):
        maml_outer(MSE_MLP, small_mlp(0), random_episodes(1), 0.1, "2")


def test_multi_step_loss_with_last_step_weight_only_is_maml():
    params = small_mlp(19)
    eps = random_episodes(20, tasks=2)
    l1, g1 = maml_outer(MSE_MLP, params, eps, 0.05, 3, step_weights=(0.0, 0.0, 2.0))
    l2, g2 = maml_outer(MSE_MLP, params, eps, 0.05, 3)
    np.testing.assert_allclose(l1.item(), l2.item(), rtol=1e-6)
    assert_trees_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_multi_step_loss_averages_per_step_query_losses():
    params = small_mlp(21)
    eps = random_episodes(22, tasks=2)
    per_step = [maml_outer(MSE_MLP, params, eps, 0.05, k)[0].item() for k in (1, 2, 3)]
    loss, _ = maml_outer(MSE_MLP, params, eps, 0.05, 3, step_weights=(1.0, 1.0, 1.0))
    np.testing.assert_allclose(loss.item(), np.mean(per_step), rtol=1e-5)
    with pytest.raises(ValueError, match="step_weights"):
        maml_outer(MSE_MLP, params, eps, 0.05, 3, step_weights=(1.0, 1.0))


def test_protonet_outer_gradient_and_accuracy():
    from metafn.nn import mlp_apply as apply

    params = small_mlp(23, sizes=(2, 8, 4))
    rng = np.random.default_rng(0)
    sx = mx.array(rng.standard_normal((3, 6, 2)), dtype=mx.float32)
    qx = mx.array(rng.standard_normal((3, 9, 2)), dtype=mx.float32)
    sy = mx.broadcast_to(mx.array([0, 0, 1, 1, 2, 2]), (3, 6))
    qy = mx.broadcast_to(mx.array([0, 1, 2] * 3), (3, 9))
    eps = Episode(sx, sy, qx, qy)
    loss, grads, acc = protonet_outer(apply, params, eps, 3)

    def per_task(p, t):
        logits = protonet_logits(apply(p, sx[t]), sy[t], apply(p, qx[t]), 3)
        return mx.mean(mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, qy[t][:, None], -1)[:, 0])

    ref_loss, ref_grads = mx.value_and_grad(lambda p: sum(per_task(p, t) for t in range(3)) / 3)(params)
    np.testing.assert_allclose(loss.item(), ref_loss.item(), rtol=1e-5)
    assert_trees_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    assert 0.0 <= acc.item() <= 1.0


# ----------------------------------------------------------------------------- LSLR (MAML++)


def _random_rates(meta, seed, low=0.01, high=0.1):
    """The rates of ``meta`` replaced by independent draws in ``[low, high]``."""
    rng = np.random.default_rng(seed)
    return meta._replace(lr=tree_map(
        lambda a: mx.array(rng.uniform(low, high, a.shape), dtype=a.dtype), meta.lr))


def loop_lslr_loss(meta, eps, step_weights=None):
    """LSLR's meta-loss task by task in plain Python: step s moves tensor l by lr[l][s] * grad."""
    steps = meta.lr[0]["w"].shape[0]
    weights = step_weights or (0.0,) * (steps - 1) + (1.0,)
    total = 0.0
    for t in range(eps.support_x.shape[0]):
        p = meta.params
        for s, w in enumerate(weights):
            g = mx.grad(MSE_MLP)(p, eps.support_x[t], eps.support_y[t])
            p = tree_map(lambda x, d, a: x - a[s] * d, p, g, meta.lr)
            if w:
                total = total + w * MSE_MLP(p, eps.query_x[t], eps.query_y[t])
    return total / (eps.support_x.shape[0] * sum(weights))


def test_lslr_init_shapes_and_rates():
    params = small_mlp(30)
    meta = lslr_init(params, 0.4, 5)
    assert isinstance(meta, LSLRParams) and lslr_steps(meta) == 5
    assert [a.shape for a in tree_leaves(meta.lr)] == [(5,)] * len(tree_leaves(params))
    assert all(np.all(np.array(a) == np.float32(0.4)) for a in tree_leaves(meta.lr))
    rates = _random_rates(meta, 0)
    for s in (0, 4):
        assert_trees_close(lslr_rates(rates, s), tree_map(lambda a: a[s], rates.lr), 0, 0)
    # Beyond the learned steps: the last step's rates.
    assert_trees_close(lslr_rates(rates, 9), lslr_rates(rates, 4), 0, 0)
    with pytest.raises(ValueError, match="steps"):
        lslr_init(params, 0.4, 0)
    with pytest.raises(ValueError, match="step"):
        lslr_rates(meta, -1)


@given(seed=st.integers(0, 10_000), lr=st.floats(0.001, 0.2), steps=st.integers(1, 3),
       multi=st.booleans())
def test_lslr_with_constant_rates_equals_maml(seed, lr, steps, multi):
    params = small_mlp(seed)
    eps = random_episodes(seed + 5, tasks=2)
    weights = tuple(float(k + 1) for k in range(steps)) if multi else None
    l1, g1 = lslr_outer(MSE_MLP, lslr_init(params, lr, steps), eps, step_weights=weights)
    l2, g2 = maml_outer(MSE_MLP, params, eps, lr, steps, step_weights=weights)
    np.testing.assert_allclose(l1.item(), l2.item(), rtol=1e-5)
    assert_trees_close(g1.params, g2, rtol=1e-4, atol=1e-6)
    _, f1 = lslr_outer(MSE_MLP, lslr_init(params, lr, steps), eps, first_order=True)
    _, f2 = fomaml_outer(MSE_MLP, params, eps, lr, steps)
    assert_trees_close(f1.params, f2, rtol=1e-4, atol=1e-6)


@given(seed=st.integers(0, 10_000), tasks=st.integers(1, 4), steps=st.integers(1, 3),
       multi=st.booleans())
def test_lslr_vmap_equals_loop(seed, tasks, steps, multi):
    meta = _random_rates(lslr_init(small_mlp(seed), 0.05, steps), seed)
    eps = random_episodes(seed + 1, tasks=tasks)
    weights = (1.0,) * steps if multi else None
    loss, grads = lslr_outer(MSE_MLP, meta, eps, step_weights=weights)
    assert isinstance(grads, LSLRParams)
    chex.assert_trees_all_equal_shapes(to_numpy(grads), to_numpy(meta))
    loop_loss, loop_grads = mx.value_and_grad(lambda m: loop_lslr_loss(m, eps, weights))(meta)
    np.testing.assert_allclose(loss.item(), loop_loss.item(), rtol=1e-5)
    assert_trees_close(grads, loop_grads, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("weights", [None, (1.0, 0.5, 2.0)])
def test_lslr_meta_gradient_matches_central_finite_differences(weights):
    """float64, second order: along random directions the gradient wrt the per-step rates, and
    wrt (initialization, rates) together, equals central differences of the meta-loss."""
    params = small_mlp(31, sizes=(1, 6, 6, 1), dtype=mx.float64)
    eps = random_episodes(32, tasks=2, dtype=mx.float64)
    meta = _random_rates(lslr_init(params, 0.1, 3), 33, 0.05, 0.15)
    _, grads = lslr_outer(MSE_MLP, meta, eps, step_weights=weights)
    assert grads.lr[0]["w"].dtype == mx.float64
    f = lambda m: lslr_outer(MSE_MLP, m, eps, step_weights=weights)[0].item()  # noqa: E731
    rng = np.random.default_rng(2)
    h = 1e-6
    for _ in range(3):
        v = tree_map(lambda x: mx.array(rng.standard_normal(x.shape), dtype=mx.float64), meta)
        fd_lr = (f(meta._replace(lr=tree_add(meta.lr, tree_scale(v.lr, h))))
                 - f(meta._replace(lr=tree_sub(meta.lr, tree_scale(v.lr, h))))) / (2 * h)
        np.testing.assert_allclose(tree_dot(grads.lr, v.lr).item(), fd_lr, rtol=1e-6, atol=1e-9)
        fd = (f(tree_add(meta, tree_scale(v, h))) - f(tree_sub(meta, tree_scale(v, h)))) / (2 * h)
        np.testing.assert_allclose(tree_dot(grads, v).item(), fd, rtol=1e-6, atol=1e-9)


def _frozen_gradient_loss(meta, lr_tree, eps):
    """Mean query loss after S steps ``theta - sum_s lr_s g_s`` whose inner gradients ``g_s`` are
    those of the run at ``meta``'s own rates, held constant: the function of the rates whose
    derivative first-order LSLR returns."""
    steps = meta.lr[0]["w"].shape[0]
    total = 0.0
    for t in range(eps.support_x.shape[0]):
        p, q = meta.params, meta.params
        for s in range(steps):
            g = mx.grad(MSE_MLP)(p, eps.support_x[t], eps.support_y[t])
            p = tree_map(lambda x, d, a: x - a[s] * d, p, g, meta.lr)
            q = tree_map(lambda x, d, a: x - a[s] * d, q, g, lr_tree)
        total += MSE_MLP(q, eps.query_x[t], eps.query_y[t]).item()
    return total / eps.support_x.shape[0]


def test_lslr_first_order_rate_gradient_matches_finite_differences():
    params = small_mlp(34, sizes=(1, 6, 6, 1), dtype=mx.float64)
    eps = random_episodes(35, tasks=2, dtype=mx.float64)
    meta = _random_rates(lslr_init(params, 0.1, 3), 36, 0.05, 0.15)
    _, grads = lslr_outer(MSE_MLP, meta, eps, first_order=True)
    _, second = lslr_outer(MSE_MLP, meta, eps)
    rng = np.random.default_rng(4)
    h = 1e-6
    for _ in range(3):
        v = tree_map(lambda x: mx.array(rng.standard_normal(x.shape), dtype=mx.float64), meta.lr)
        f = lambda lr_tree: _frozen_gradient_loss(meta, lr_tree, eps)  # noqa: E731
        fd = (f(tree_add(meta.lr, tree_scale(v, h))) - f(tree_sub(meta.lr, tree_scale(v, h)))) / (2 * h)
        np.testing.assert_allclose(tree_dot(grads.lr, v).item(), fd, rtol=1e-6, atol=1e-9)
    assert abs(tree_dot(grads.lr, v).item() - tree_dot(second.lr, v).item()) > 1e-6


def test_lslr_on_conv4_task_batched_loss():
    """A tiny conv4 through its task-batched loss: constant rates give MAML's meta-gradient
    (float32, mx.conv2d per task); in float64 (im2col form) the rate gradient matches central
    differences of the cross-entropy meta-loss."""
    from metafn.nn import conv4_batched_loss, conv4_init

    size, n, k, q, tasks = 16, 3, 2, 2, 2
    keys = mx.random.split(mx.random.key(40), 2)
    eps = Episode(
        mx.random.uniform(shape=(tasks, n * k, size, size, 1), key=keys[0]),
        mx.broadcast_to(mx.repeat(mx.arange(n), k), (tasks, n * k)).astype(mx.int32),
        mx.random.uniform(shape=(tasks, n * q, size, size, 1), key=keys[1]),
        mx.broadcast_to(mx.repeat(mx.arange(n), q), (tasks, n * q)).astype(mx.int32),
    )
    params = conv4_init(mx.random.key(41), n, hidden=4, image_size=size)
    loss = conv4_batched_loss("loop")
    l1, g1 = lslr_outer(loss, lslr_init(params, 0.3, 2), eps, step_weights=(1.0, 1.0))
    l2, g2 = maml_outer(loss, params, eps, 0.3, 2, step_weights=(1.0, 1.0))
    np.testing.assert_allclose(l1.item(), l2.item(), rtol=1e-5)
    assert_trees_close(g1.params, g2, rtol=1e-4, atol=1e-5)
    assert [a.shape for a in tree_leaves(g1.lr)] == [(2,)] * len(tree_leaves(params))

    f64 = lambda tree: tree_map(  # noqa: E731
        lambda a: a.astype(mx.float64) if mx.issubdtype(a.dtype, mx.floating) else a, tree)
    meta = _random_rates(lslr_init(f64(params), 0.3, 2), 42, 0.2, 0.4)
    eps64, loss64 = f64(eps), conv4_batched_loss("im2col")
    _, grads = lslr_outer(loss64, meta, eps64)
    f = lambda lr_tree: lslr_outer(loss64, meta._replace(lr=lr_tree), eps64)[0].item()  # noqa: E731
    rng = np.random.default_rng(3)
    v = tree_map(lambda a: mx.array(rng.standard_normal(a.shape), dtype=mx.float64), meta.lr)
    h = 1e-5
    fd = (f(tree_add(meta.lr, tree_scale(v, h))) - f(tree_sub(meta.lr, tree_scale(v, h)))) / (2 * h)
    # MLX's float64 exp has float32 accuracy (see tests/test_conv4.py): a coarser tolerance.
    assert abs(fd - tree_dot(grads.lr, v).item()) < 2e-3 + 1e-2 * abs(fd)


def test_lslr_bad_inputs_name_the_argument():
    params = small_mlp(0)
    eps = random_episodes(1, tasks=2)
    meta = lslr_init(params, 0.1, 2)
    with pytest.raises((TypeError, TypeCheckError), match="meta"):
        lslr_outer(MSE_MLP, metasgd_init(params, 0.1), eps)
    with pytest.raises(ValueError, match="meta.lr"):
        lslr_outer(MSE_MLP, meta._replace(lr=meta.lr[:1]), eps)
    ragged = [dict(layer, w=mx.zeros((3,))) if i == 0 else layer for i, layer in enumerate(meta.lr)]
    with pytest.raises(ValueError, match="meta.lr"):
        lslr_outer(MSE_MLP, meta._replace(lr=ragged), eps)
    with pytest.raises(ValueError, match="step_weights"):
        lslr_outer(MSE_MLP, meta, eps, step_weights=(1.0,))
    with pytest.raises(ValueError, match="episodes.query_x"):
        lslr_outer(MSE_MLP, meta, eps._replace(query_x=eps.query_x[:1]))
