"""Evaluation helpers: confidence intervals, rate selection, adaptation curves."""

from __future__ import annotations

import math

import metafn  # noqa: F401
import metafn.inner
import metafn.nn
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, strategies as st

from metafn.config import config_from_dict
from metafn.evaluate import adaptation_curve, curve_over_tasks, mean_ci, select_lr, summarize_curve
from metafn.experiment import build_experiment
from metafn.random import key
from metafn.losses import mse_loss

MSE = mse_loss(metafn.nn.mlp_apply)


@given(st.lists(st.floats(-100, 100), min_size=2, max_size=200))
def test_mean_ci_matches_formula(values):
    mean, half = mean_ci(np.array(values))
    arr = np.array(values, dtype=np.float64)
    assert math.isclose(mean, arr.mean(), rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(half, 1.96 * arr.std(ddof=1) / math.sqrt(len(arr)), rel_tol=1e-9, abs_tol=1e-9)


def test_select_lr_ranks_divergence_last_and_uses_the_budget_step():
    loss = lambda *rows: (np.array(rows, dtype=np.float64), None)  # noqa: E731
    curves = {0.1: loss([3, 3], [1, 1], [0.5, 0.5]), 0.3: loss([3, 3], [0.8, 0.8], [np.inf, 1.0])}
    assert select_lr(curves, 1, classification=False)[0] == 0.3
    lr, table = select_lr(curves, 2, classification=False)
    assert lr == 0.1 and table["0.3"] == math.inf


def test_adaptation_curve_equals_query_loss_after_k_sgd_steps():
    cfg = config_from_dict({"task": {"family": "sine"}, "model": {"hidden": [16]}})
    exp = build_experiment(cfg)
    params = exp.init_params(key(0))
    eps = exp.sample(key(1), "test", 8)
    loss, acc = adaptation_curve(exp, params, eps, 5, 0.01)
    assert loss.shape == (6, 8) and acc is None
    direct = mx.vmap(lambda x, y: mx.mean((metafn.nn.mlp_apply(params, x) - y) ** 2))(eps.query_x, eps.query_y)
    np.testing.assert_allclose(loss[0], np.array(direct), rtol=1e-5)
    for k in (1, 5):
        adapted = metafn.inner.adapt(MSE, params, eps.support_x[3], eps.support_y[3], k, 0.01)
        np.testing.assert_allclose(loss[k, 3], MSE(adapted, eps.query_x[3], eps.query_y[3]).item(), rtol=1e-4)


def test_scoring_only_some_steps_leaves_the_scored_rows_unchanged():
    cfg = config_from_dict({"task": {"family": "xor", "n_way": 2}, "model": {"hidden": [8]}})
    exp = build_experiment(cfg)
    params = exp.init_params(key(0))
    eps = exp.sample(key(1), "test", 6)
    full_loss, full_acc = adaptation_curve(exp, params, eps, 5, 0.1)
    loss, acc = adaptation_curve(exp, params, eps, 5, 0.1, frozenset({0, 2}))
    assert loss.shape == full_loss.shape == (6, 6) and acc.shape == (6, 6)
    for k in (0, 2):
        np.testing.assert_array_equal(loss[k], full_loss[k])
        np.testing.assert_array_equal(acc[k], full_acc[k])
    assert np.isnan(loss[[1, 3, 4, 5]]).all() and np.isnan(acc[[1, 3, 4, 5]]).all()
    summary = summarize_curve(loss, acc, frozenset({0, 2}))
    assert summary["scored_steps"] == [0, 2]
    assert summary["accuracy_mean"][2] == pytest.approx(float(full_acc[2].mean()))
    assert summary["loss_mean"][1] is None and summary["accuracy_ci95"][5] is None
    assert summarize_curve(full_loss, full_acc)["scored_steps"] == list(range(6))
    for bad in (frozenset(), frozenset({6}), frozenset({-1, 2})):
        with pytest.raises(ValueError, match="score_at: expected None or a non-empty set of steps in 0..5"):
            adaptation_curve(exp, params, eps, 5, 0.1, bad)


def test_same_key_same_tasks_for_every_method():
    cfg = config_from_dict({"task": {"family": "xor", "n_way": 2}, "model": {"hidden": [8]}})
    exp = build_experiment(cfg)
    a = curve_over_tasks(exp, exp.init_params(key(0)), key(5), "test", 12, 0, 0.1, 5)
    b = curve_over_tasks(exp, exp.init_params(key(0)), key(5), "test", 12, 0, 0.1, 5)
    np.testing.assert_array_equal(a[0], b[0])
    with pytest.raises(ValueError, match="lr"):
        adaptation_curve(exp, exp.init_params(key(0)), exp.sample(key(1), "val", 2), 1, None)
