"""The inner-loop update rules (metafn.inner.InnerRule): SGD and Reptile's inner Adam.

Properties of the pure ``inner_step`` (Adam with ``b1 = 0`` takes a sign step of size ``lr``
first, the state is shaped like the parameters, same inputs give the same result, the update
agrees with the outer ``optim.adam``, it is invariant to the gradient's scale), its use in
``reptile_grad`` (the default SGD path unchanged, per-task states equal a loop over tasks) and in
evaluation (``adaptation_curve``), and the config keys that choose it.
"""

from __future__ import annotations

import metafn  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from typeguard import TypeCheckError

from helpers import MSE_MLP, assert_trees_close, assert_trees_equal, random_episodes, small_mlp, to_numpy
from metafn.config import ConfigError, config_from_dict
from metafn.experiment import inner_rule
from metafn.inner import (
    InnerAdamState, InnerRule, adapt, check_inner_rule, inner_init, inner_step, inner_update,
)
from metafn.optim import adam, apply_updates
from metafn.outer import reptile_grad
from metafn.tree import tree_flatten, tree_map, tree_mean_axis0, tree_scale, tree_stack, tree_sub

ADAM0 = InnerRule("adam", 0.0, 0.999, 1e-8)


@given(seed=st.integers(0, 10_000), lr=st.floats(1e-4, 0.1), b2=st.floats(0.0, 0.9999))
def test_adam_beta1_zero_first_step_is_a_sign_step(seed, lr, b2):
    """b1 = 0, t = 1: m/(1-0) = g, v/(1-b2) = g^2, so theta - lr * g / (|g| + eps).

    In float32, ``v = (1 - b2) g^2`` and the correction ``1 - b2`` each carry a relative rounding
    error of about ``2^-24 / (1 - b2)`` (cancellation in ``1 - b2``), so the tolerance grows as
    b2 nears 1 (4e-5 relative was seen at b2 = 0.9999).
    """
    params, grads = small_mlp(seed), small_mlp(seed + 1)
    rule = InnerRule("adam", 0.0, b2, 1e-8)
    new, state = inner_step(rule, params, grads, inner_init(rule, params), lr)
    expected = tree_map(lambda p, g: p - lr * g / (mx.abs(g) + 1e-8), params, grads)
    assert_trees_close(new, expected, rtol=1e-5 + 4 * 2.0**-24 / (1 - b2), atol=1e-6)
    assert state.count.item() == 1
    assert_trees_close(state.mu, grads, rtol=0, atol=0)


@given(seed=st.integers(0, 10_000), steps=st.integers(1, 4), b1=st.sampled_from([0.0, 0.9]))
def test_adam_state_is_shaped_like_params(seed, steps, b1):
    params = small_mlp(seed)
    rule = InnerRule("adam", b1, 0.999, 1e-8)
    state = inner_init(rule, params)
    assert isinstance(state, InnerAdamState) and state.count.item() == 0
    for s in range(steps):
        params, state = inner_step(rule, params, small_mlp(seed + 1 + s), state, 0.01)
    assert state.count.item() == steps
    for moment in (state.mu, state.nu):
        flat, ref = tree_flatten(moment), tree_flatten(params)
        assert [k for k, _ in flat] == [k for k, _ in ref]
        assert all(a.shape == b.shape and a.dtype == b.dtype for (_, a), (_, b) in zip(flat, ref))
    assert all(bool(mx.all(v >= 0).item()) for _, v in tree_flatten(state.nu))


@given(seed=st.integers(0, 10_000), b1=st.sampled_from([0.0, 0.5, 0.9]))
@settings(max_examples=20)
def test_adam_is_deterministic(seed, b1):
    params = small_mlp(seed)
    rule = InnerRule("adam", b1, 0.99, 1e-8)
    runs = []
    for _ in range(2):
        p, s = params, inner_init(rule, params)
        for k in range(3):
            p, s = inner_step(rule, p, small_mlp(seed + 10 + k), s, 0.003)
        runs.append((p, s))
    assert_trees_equal(runs[0][0], runs[1][0])
    assert_trees_equal(runs[0][1].nu, runs[1][1].nu)


@given(seed=st.integers(0, 10_000), b1=st.sampled_from([0.0, 0.9]), b2=st.sampled_from([0.9, 0.999]))
@settings(max_examples=20)
def test_adam_rule_matches_outer_optim_adam(seed, b1, b2):
    """Three steps of the inner Adam equal optim.adam's (the outer optimizer) on the same grads."""
    params = small_mlp(seed)
    rule = InnerRule("adam", b1, b2, 1e-8)
    opt = adam(0.01, b1, b2, 1e-8)
    p_in, s_in = params, inner_init(rule, params)
    p_out, s_out = params, opt.init(params)
    for k in range(3):
        g = small_mlp(seed + 100 + k)
        p_in, s_in = inner_step(rule, p_in, g, s_in, 0.01)
        u, s_out = opt.update(g, s_out, p_out)
        p_out = apply_updates(p_out, u)
    assert_trees_close(p_in, p_out, rtol=1e-5, atol=1e-7)


@given(seed=st.integers(0, 10_000), scale=st.floats(0.01, 100.0))
@settings(max_examples=20)
def test_adam_step_is_invariant_to_gradient_scale(seed, scale):
    params = small_mlp(seed)
    rule = InnerRule("adam", 0.0, 0.999, 1e-12)
    grads = [small_mlp(seed + 1 + k) for k in range(2)]
    runs = []
    for c in (1.0, scale):
        p, s = params, inner_init(rule, params)
        for g in grads:
            p, s = inner_step(rule, p, tree_scale(g, c), s, 0.01)
        runs.append(p)
    assert_trees_close(runs[0], runs[1], rtol=1e-4, atol=1e-6)


@given(seed=st.integers(0, 10_000), lr=st.floats(0.0, 1.0))
@settings(max_examples=20)
def test_sgd_rule_is_inner_update_with_empty_state(seed, lr):
    params, grads = small_mlp(seed), small_mlp(seed + 1)
    rule = InnerRule()
    assert inner_init(rule, params) == ()
    new, state = inner_step(rule, params, grads, (), lr)
    assert state == ()
    assert_trees_equal(new, inner_update(params, grads, lr))


def test_adam_per_parameter_rates_tree():
    params, grads = small_mlp(1), small_mlp(2)
    rates = tree_map(lambda p: mx.full(p.shape, 0.01), params)
    scalar, _ = inner_step(ADAM0, params, grads, inner_init(ADAM0, params), 0.01)
    tree, _ = inner_step(ADAM0, params, grads, inner_init(ADAM0, params), rates)
    assert_trees_close(tree, scalar, rtol=1e-6, atol=0)


def test_bad_rules_and_states_are_named():
    params = small_mlp(0)
    with pytest.raises(ValueError, match=r"rule.name: expected one of \['sgd', 'adam'\]"):
        check_inner_rule(InnerRule("rmsprop"))
    with pytest.raises(ValueError, match=r"rule.b1: expected a number in \[0, 1\)"):
        check_inner_rule(InnerRule("adam", 1.0))
    with pytest.raises(ValueError, match=r"rule.b2: expected a number in \[0, 1\)"):
        check_inner_rule(InnerRule("adam", 0.0, -0.1))
    with pytest.raises(ValueError, match=r"rule.eps: expected a finite number > 0"):
        check_inner_rule(InnerRule("adam", 0.0, 0.999, 0.0))
    with pytest.raises((TypeError, TypeCheckError), match="rule"):  # typeguard checks first under pytest
        check_inner_rule(("adam", 0.0, 0.999, 1e-8))
    with pytest.raises(TypeError, match="state: expected the InnerAdamState"):
        inner_step(ADAM0, params, params, (), 0.01)
    with pytest.raises(ValueError, match="lr: expected a finite"):
        inner_step(ADAM0, params, params, inner_init(ADAM0, params), float("nan"))


# ------------------------------------------------------------------------- reptile_grad


@given(seed=st.integers(0, 10_000), batches=st.integers(1, 3), steps=st.integers(0, 4))
@settings(max_examples=20)
def test_reptile_default_path_is_unchanged_by_the_sgd_rule(seed, batches, steps):
    """inner_rule=None (the default) and an explicit sgd rule give bit-identical results."""
    params = small_mlp(seed)
    eps = random_episodes(seed + 1, tasks=2)
    loss0, d0 = reptile_grad(MSE_MLP, params, eps, 0.05, steps, batches)
    loss1, d1 = reptile_grad(MSE_MLP, params, eps, 0.05, steps, batches, InnerRule())
    assert_trees_equal(d0, d1)
    assert loss0.item() == loss1.item()


@given(seed=st.integers(0, 10_000), batches=st.integers(1, 3), steps=st.integers(1, 4))
@settings(max_examples=20)
def test_reptile_adam_equals_a_loop_over_tasks_each_with_its_own_state(seed, batches, steps):
    params = small_mlp(seed)
    eps = random_episodes(seed + 1, tasks=3)
    _, direction = reptile_grad(MSE_MLP, params, eps, 0.003, steps, batches, ADAM0)
    grad = mx.grad(MSE_MLP)
    adapted = []
    for t in range(3):
        x = mx.concatenate([eps.support_x[t], eps.query_x[t]])
        y = mx.concatenate([eps.support_y[t], eps.query_y[t]])
        p, state = params, inner_init(ADAM0, params)
        for s in range(steps):
            xb, yb = x[s % batches::batches], y[s % batches::batches]
            p, state = inner_step(ADAM0, p, grad(p, xb, yb), state, 0.003)
        adapted.append(p)
    expected = tree_sub(params, tree_mean_axis0(tree_stack(adapted)))
    assert_trees_close(direction, expected, rtol=1e-4, atol=1e-7)


def test_reptile_adam_one_step_moves_each_entry_by_at_most_lr():
    params = small_mlp(3)
    eps = random_episodes(4, tasks=2)
    _, direction = reptile_grad(MSE_MLP, params, eps, 0.002, 1, 1, ADAM0)
    for _, d in tree_flatten(direction):
        assert float(mx.max(mx.abs(d)).item()) <= 0.002 * (1 + 1e-5)


# ------------------------------------------------------------------- evaluation and config


def test_adaptation_curve_fine_tunes_with_the_rule():
    from metafn.config import config_from_dict as cfd
    from metafn.evaluate import adaptation_curve
    from metafn.experiment import build_experiment, task_losses

    config = cfd({"task": {"family": "linear2d", "n_way": 2, "k_shot": 5, "n_query": 5},
                  "algorithm": {"name": "reptile", "inner_lr": 0.01, "inner_optimizer": "adam",
                                "inner_beta1": 0.0}})
    exp = build_experiment(config)
    params = exp.init_params(mx.random.key(0))
    eps = exp.sample(mx.random.key(1), "train", 4)
    rule = inner_rule(config.algorithm)
    loss, acc = adaptation_curve(exp, params, eps, 3, 0.01, rule=rule)
    losses = task_losses(exp).fn
    p = tree_map(lambda a: mx.broadcast_to(a[None], (4, *a.shape)), params)
    state = inner_init(rule, p)
    grad = mx.grad(lambda q: mx.sum(losses(q, eps.support_x, eps.support_y)))
    for _ in range(3):
        p, state = inner_step(rule, p, grad(p), state, 0.01)
    expected = losses(p, eps.query_x, eps.query_y)
    np.testing.assert_allclose(loss[3], np.array(expected), rtol=1e-5, atol=1e-6)
    sgd_loss, _ = adaptation_curve(exp, params, eps, 3, 0.01)
    assert not np.allclose(sgd_loss[3], loss[3])
    np.testing.assert_array_equal(sgd_loss[0], loss[0])


def test_config_inner_optimizer_keys():
    algo = config_from_dict({"algorithm": {"name": "reptile", "inner_optimizer": "adam",
                                           "inner_beta1": 0.0, "inner_lr": 0.001}}).algorithm
    assert inner_rule(algo) == InnerRule("adam", 0.0, 0.999, 1e-8)
    assert inner_rule(config_from_dict({}).algorithm) == InnerRule()
    with pytest.raises(ConfigError, match=r"algorithm.inner_optimizer: expected one of \['sgd', 'adam'\]"):
        config_from_dict({"algorithm": {"name": "reptile", "inner_optimizer": "rmsprop"}})
    with pytest.raises(ConfigError, match=r"algorithm.inner_optimizer: expected sgd for maml"):
        config_from_dict({"algorithm": {"name": "maml", "inner_optimizer": "adam"}})
    with pytest.raises(ConfigError, match=r"algorithm.inner_beta1: expected a float in \[0, 1\)"):
        config_from_dict({"algorithm": {"name": "reptile", "inner_optimizer": "adam", "inner_beta1": 1.0}})
    with pytest.raises(ConfigError, match=r"algorithm.inner_beta2: expected a float in \[0, 1\)"):
        config_from_dict({"algorithm": {"name": "reptile", "inner_optimizer": "adam", "inner_beta2": -0.5}})
    with pytest.raises(ConfigError, match=r"algorithm.inner_eps: expected a finite float > 0"):
        config_from_dict({"algorithm": {"name": "reptile", "inner_optimizer": "adam", "inner_eps": 0}})
    with pytest.raises(ConfigError, match=r"algorithm.inner_beta1: expected its default 0.9 unless "
                                          r"inner_optimizer is adam"):
        config_from_dict({"algorithm": {"name": "reptile", "inner_beta1": 0.0}})
    with pytest.raises(ConfigError, match=r"algorithm.inner_optimizer: expected a string"):
        config_from_dict({"algorithm": {"name": "reptile", "inner_optimizer": 3}})


def test_reptile_adam_config_file_loads():
    from pathlib import Path

    from metafn.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "omniglot_reptile_adam.yaml")
    assert inner_rule(config.algorithm) == InnerRule("adam", 0.0, 0.999, 1e-8)
    assert config.algorithm.inner_lr == 0.001
