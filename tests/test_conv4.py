"""conv4 (metafn.nn.conv4): shapes, batch norm, pooling, the task-batched form and MAML through it."""

from __future__ import annotations

import metafn  # noqa: F401  (before mlx)
import mlx.core as mx
import numpy as np
import pytest

from metafn.inner import adapt
from metafn.nn import (
    batch_norm, conv4_apply, conv4_batched_loss, conv4_embed, conv4_init, conv4_loss,
    conv4_task_logits, conv4_task_losses, max_pool_2x2,
)
from metafn.nn.conv4 import (
    TASK_METHODS, _patch_moments, _patches3x3, conv3x3, conv4_feature_size, conv_block,
)
from metafn.outer import maml_outer, task_batched
from metafn.tasks import Episode
from metafn.tree import tree_dot, tree_index, tree_map, tree_norm, tree_stack

from helpers import assert_trees_close

# A tiny conv4: 16x16 images (the smallest that survives four 2x2 poolings), 4 channels.
S, HID, N, K, Q, T = 16, 4, 3, 2, 2, 2


def _f64(tree):
    return tree_map(lambda a: a.astype(mx.float64) if mx.issubdtype(a.dtype, mx.floating) else a, tree)


def _episodes(seed: int, t: int = T, n: int = N, k: int = K, q: int = Q, size: int = S) -> Episode:
    ks = mx.random.split(mx.random.key(seed), 2)
    sy = mx.broadcast_to(mx.repeat(mx.arange(n), k), (t, n * k)).astype(mx.int32)
    qy = mx.broadcast_to(mx.repeat(mx.arange(n), q), (t, n * q)).astype(mx.int32)
    return Episode(mx.random.uniform(shape=(t, n * k, size, size, 1), key=ks[0]), sy,
                   mx.random.uniform(shape=(t, n * q, size, size, 1), key=ks[1]), qy)


def _task_params(seed: int, t: int = T, **kw):
    return tree_stack([conv4_init(mx.random.key(seed + i), N, hidden=HID, image_size=S, **kw)
                       for i in range(t)])


def test_shapes_and_init():
    p = conv4_init(mx.random.key(0), 5)
    assert [b["w"].shape for b in p["blocks"]] == [(64, 3, 3, 1)] + [(64, 3, 3, 64)] * 3
    assert p["head"]["w"].shape == (64, 5) and p["head"]["b"].shape == (5,)
    assert all(mx.array_equal(b["gamma"], mx.ones(64)) and mx.array_equal(b["beta"], mx.zeros(64))
               for b in p["blocks"])
    x = mx.random.uniform(shape=(7, 28, 28, 1))
    assert conv4_apply(p, x).shape == (7, 5) and conv4_embed(p, x).shape == (7, 64)
    p84 = conv4_init(mx.random.key(0), 5, in_channels=3, hidden=32, image_size=84)
    assert p84["head"]["w"].shape == (32 * 25, 5)
    assert conv4_apply(p84, mx.zeros((2, 84, 84, 3))).shape == (2, 5)
    assert conv4_feature_size(28) == 64 and conv4_feature_size(16, 4) == 4
    bound = np.sqrt(6 / (9 * 64 + 9 * 64))
    assert float(mx.max(mx.abs(p["blocks"][1]["w"]))) <= bound


def test_bad_inputs_are_named():
    p = conv4_init(mx.random.key(0), 5)
    with pytest.raises(ValueError, match="x: expected 1 channels"):
        conv4_apply(p, mx.zeros((2, 28, 28, 3)))
    with pytest.raises(ValueError, match=r"x: expected images \(N, H, W, C\)"):
        conv4_apply(p, mx.zeros((28, 28, 1)))
    with pytest.raises(ValueError, match="head expects 64"):
        conv4_apply(p, mx.zeros((2, 56, 56, 1)))
    with pytest.raises(ValueError, match="image_size.*>= 16"):
        conv4_init(mx.random.key(0), 5, image_size=8)
    with pytest.raises(ValueError, match="n_way"):
        conv4_init(mx.random.key(0), 0)
    with pytest.raises(ValueError, match="method"):
        conv4_task_losses(_task_params(0), _episodes(0).support_x, _episodes(0).support_y, "fft")
    with pytest.raises(ValueError, match="y: expected labels of shape"):
        conv4_loss(p, mx.zeros((2, 28, 28, 1)), mx.zeros((3,), dtype=mx.int32))
    with pytest.raises(ValueError, match="params_t: expected a leading task axis of 3"):
        conv4_task_losses(_task_params(0), mx.zeros((3, 2, S, S, 1)), mx.zeros((3, 2), dtype=mx.int32))


def test_batch_norm_and_pool_match_numpy():
    x = mx.random.normal((5, 6, 7, 3), key=mx.random.key(1)) * 3 + 1
    g, b = mx.array([1.0, 2.0, 0.5]), mx.array([0.0, -1.0, 3.0])
    xn = np.array(x)
    mu, var = xn.mean((0, 1, 2)), xn.var((0, 1, 2))
    want = (xn - mu) / np.sqrt(var + 1e-5) * np.array(g) + np.array(b)
    np.testing.assert_allclose(np.array(batch_norm(x, g, b, (0, 1, 2))), want, rtol=1e-4, atol=1e-4)
    pooled = np.array(max_pool_2x2(x))  # odd width 7 floors to 3
    assert pooled.shape == (5, 3, 3, 3)
    np.testing.assert_array_equal(pooled, xn[:, :6, :6].reshape(5, 3, 2, 3, 2, 3).max((2, 4)))



@pytest.mark.parametrize("shape, axes, stat_shape", [
    ((5, 6, 7, 3), (0, 1, 2), (3,)),                  # conv4: per channel over (N, H, W)
    ((2, 5, 6, 7, 3), (1, 2, 3), (2, 1, 1, 1, 3)),    # per task and channel (im2col form)
    ((4, 5, 6, 3), (0, 2), (1, 5, 1, 3)),             # non-contiguous reduced axes
    ((4, 5, 6, 3), (-1,), (4, 5, 6, 1)),              # negative axis
])
def test_batch_norm_any_axes_matches_numpy_compiled_and_eager(shape, axes, stat_shape):
    """The collapsed-view affine (the fix for the slow compiled kernel) is exact batch norm for
    any reduced axes, with gradients equal compiled and eager."""
    x = mx.random.normal(shape, key=mx.random.key(2)) * 2 + 0.5
    g = 1 + mx.random.uniform(shape=stat_shape, key=mx.random.key(3))
    b = mx.random.normal(stat_shape, key=mx.random.key(4))
    xn, ax = np.array(x), tuple(a % len(shape) for a in axes)
    mu, var = xn.mean(ax, keepdims=True), xn.var(ax, keepdims=True)
    want = (xn - mu) / np.sqrt(var + 1e-5) * np.array(g) + np.array(b)
    np.testing.assert_allclose(np.array(batch_norm(x, g, b, axes)), want, rtol=1e-4, atol=1e-4)

    r = mx.random.normal(shape, key=mx.random.key(5))
    grad = mx.grad(lambda x, g, b: mx.sum(mx.maximum(batch_norm(x, g, b, axes), 0.0) * r),
                   argnums=(0, 1, 2))
    for e, c in zip(grad(x, g, b), mx.compile(grad)(x, g, b)):
        np.testing.assert_allclose(np.array(c), np.array(e), rtol=1e-4, atol=1e-5)

def test_patch_moments_are_the_convolution_output_mean_and_variance():
    """The patches times the flattened kernels are the convolution, and the patch moments give
    the per-channel mean and biased variance of its output, also with a large offset in the
    input (two passes: no cancellation)."""
    ks = mx.random.split(mx.random.key(11), 2)
    for offset in (0.0, 100.0):
        x = mx.random.uniform(shape=(4, 9, 8, 2), key=ks[0]).astype(mx.float64) + offset
        w = mx.random.normal((7, 3, 3, 2), key=ks[1]).astype(mx.float64)
        z = np.array(conv3x3(x, w)).reshape(-1, 7)
        p = _patches3x3(x).reshape(-1, 18)
        np.testing.assert_allclose(np.array(p @ w.reshape(7, 18).T), z, rtol=1e-12, atol=1e-9)
        mu, var = _patch_moments(p, w.reshape(7, 18))
        np.testing.assert_allclose(np.array(mu), z.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.array(var), z.var(0), rtol=1e-9)


def test_patch_moments_keep_float32_variance_accurate_on_binary_images():
    """Strokes make neighbouring pixels correlated and the patch covariance ill-conditioned;
    the moments still give the variance of float32 inputs to ~1e-7 (float32 accumulation lost
    ~3e-5 here, enough to flip max-pool arg-maxes downstream)."""
    ks = mx.random.split(mx.random.key(12), 2)
    blobs = mx.random.uniform(shape=(5, 7, 7, 1), key=ks[0]) < 0.3
    x = mx.repeat(mx.repeat(blobs, 4, axis=1), 4, axis=2).astype(mx.float32)  # 28x28 strokes
    w = mx.random.uniform(-0.58, 0.58, (64, 3, 3, 1), key=ks[1])
    z64 = np.array(conv3x3(x.astype(mx.float64), w.astype(mx.float64))).reshape(-1, 64)
    _, var = _patch_moments(_patches3x3(x).reshape(-1, 9), w.reshape(64, 9))
    assert var.dtype == mx.float32
    assert np.max(np.abs(np.array(var) - z64.var(0)) / z64.var(0)) < 1e-6


@pytest.mark.parametrize("c_in, c_out", [(2, 5), (1, 24)])  # (1, 24): patch-moment statistics
@pytest.mark.parametrize("dtype", [mx.float32, mx.float64])
def test_conv_block_pooled_first_equals_the_block_in_definition_order(dtype, c_in, c_out):
    """conv_block pools before the batch-norm affine and the ReLU (and flips channels with
    gamma < 0 through the kernel's sign): value, gradient and the second-order term MAML uses
    match maxpool(relu(batch_norm(conv(x, w)))) for gammas of both signs; at gamma = 0 the values
    match (every pooled entry ties there, so the two orders pick different valid subgradients)."""
    ks = mx.random.split(mx.random.key(7), 4)
    x = mx.random.normal((3, 9, 10, c_in), key=ks[0]).astype(dtype)  # odd height: pool floors
    w = mx.random.normal((c_out, 3, 3, c_in), key=ks[1]).astype(dtype) * 0.3
    gamma = mx.array(np.resize([1.3, -0.7, 0.05, -2.0, 0.4], c_out), dtype=dtype)
    beta = mx.random.normal((c_out,), key=ks[2]).astype(dtype)
    r = mx.random.normal((3, 4, 5, c_out), key=ks[3]).astype(dtype)

    def reference(x, w, g, b):
        return max_pool_2x2(mx.maximum(batch_norm(conv3x3(x, w), g, b, (0, 1, 2)), 0.0))

    tol = dict(rtol=1e-4, atol=1e-5) if dtype == mx.float32 else dict(rtol=1e-10, atol=1e-12)
    for g in (gamma, gamma * mx.array(np.resize([1, 1, 0, 1, 1], c_out), dtype=dtype)):
        np.testing.assert_allclose(np.array(conv_block(x, w, g, beta)),
                                   np.array(reference(x, w, g, beta)), **tol)

    def grads(block):
        g1 = mx.grad(lambda *a: mx.sum(block(*a) * r), argnums=(0, 1, 2, 3))
        # second order: the gradient of the squared norm of the weight gradient (MAML's term)
        g2 = mx.grad(lambda *a: mx.sum(mx.square(g1(*a)[1])), argnums=(1, 2, 3))
        return g1(x, w, gamma, beta) + g2(x, w, gamma, beta)

    for got, want in zip(grads(conv_block), grads(reference)):
        np.testing.assert_allclose(np.array(got), np.array(want), **tol)


@pytest.mark.parametrize("method", TASK_METHODS)
def test_task_batched_equals_loop_over_tasks(method: str):
    pt, ep = _task_params(10, t=3), _episodes(3, t=3)
    want = mx.stack([conv4_loss(tree_index(pt, i), ep.query_x[i], ep.query_y[i]) for i in range(3)])
    got = conv4_task_losses(pt, ep.query_x, ep.query_y, method)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)
    logits = conv4_task_logits(pt, ep.query_x, method)
    np.testing.assert_allclose(np.array(logits[1]),
                               np.array(conv4_apply(tree_index(pt, 1), ep.query_x[1])), atol=1e-5)
    # Gradients of the summed losses hold each task's own gradient.
    g = mx.grad(lambda p: mx.sum(conv4_task_losses(p, ep.query_x, ep.query_y, method)))(pt)
    for i in range(3):
        gi = mx.grad(conv4_loss)(tree_index(pt, i), ep.query_x[i], ep.query_y[i])
        assert_trees_close(tree_index(g, i), gi, rtol=1e-4, atol=1e-5)


def test_maml_task_batched_equals_python_loop():
    """Second-order MAML over the task-batched conv4 equals averaging per-task MAML gradients."""
    params = conv4_init(mx.random.key(4), N, hidden=HID, image_size=S)
    ep = _episodes(5)
    loss, grads = maml_outer(task_batched(conv4_task_losses), params, ep, 0.3, 2)
    per_task = []
    for i in range(T):
        def objective(p):
            adapted = adapt(conv4_loss, p, ep.support_x[i], ep.support_y[i], 2, 0.3)
            return conv4_loss(adapted, ep.query_x[i], ep.query_y[i])
        per_task.append(mx.value_and_grad(objective)(params))
    np.testing.assert_allclose(loss.item(), np.mean([l.item() for l, _ in per_task]), rtol=1e-5)
    want = tree_map(lambda *gs: sum(gs) / T, *[g for _, g in per_task])
    assert_trees_close(grads, want, rtol=1e-4, atol=1e-5)


def _onehot_mse(method: str):
    """A task-batched squared error on conv4 logits: no exp, so float64 stays exact in MLX."""

    def losses(p, x, y):
        target = (y[..., None] == mx.arange(N)).astype(x.dtype)
        return mx.mean(mx.square(conv4_task_logits(p, x, method) - target), axis=(1, 2))

    return task_batched(losses)


def _directions(params, count: int):
    out = []
    for i in range(count):
        v = tree_map(lambda a: mx.random.normal(a.shape, key=mx.random.key(100 * i + a.size),
                                                dtype=a.dtype), params)
        norm = tree_norm(v)
        out.append(tree_map(lambda a: a / norm, v))
    return out


def _central_difference(f, params, v, eps: float) -> float:
    plus = f(tree_map(lambda p, d: p + eps * d, params, v))
    minus = f(tree_map(lambda p, d: p - eps * d, params, v))
    return (plus - minus).item() / (2 * eps)


def test_maml_second_order_matches_finite_differences_float64():
    """MLX's conv2d has no float64 kernel on CPU, but the im2col form (pad, slices, batched
    matmul) runs in float64: central differences (eps 1e-6) match the second-order meta-gradient
    along random directions, and the first-order (FOMAML) gradient does not."""
    params = _f64(conv4_init(mx.random.key(1), N, hidden=HID, image_size=S))
    ep = _f64(_episodes(2))
    loss = _onehot_mse("im2col")
    _, g2 = maml_outer(loss, params, ep, 0.3, 2)
    _, g1 = maml_outer(loss, params, ep, 0.3, 2, first_order=True)
    assert g2["blocks"][0]["w"].dtype == mx.float64
    f = lambda p: maml_outer(loss, p, ep, 0.3, 2)[0]  # noqa: E731
    for v in _directions(params, 3):
        fd = _central_difference(f, params, v, 1e-6)
        assert abs(fd - tree_dot(g2, v).item()) < 1e-7 + 1e-5 * abs(fd)
        assert abs(fd - tree_dot(g1, v).item()) > 1e-4


def test_maml_cross_entropy_finite_differences_float64():
    """The same with the cross-entropy loss; MLX's float64 ``exp`` has only float32 accuracy
    (~3e-7 relative), so the difference step and tolerance are coarser."""
    params = _f64(conv4_init(mx.random.key(3), N, hidden=HID, image_size=S))
    ep = _f64(_episodes(4))
    loss = conv4_batched_loss("im2col")
    _, g2 = maml_outer(loss, params, ep, 0.3, 1)
    f = lambda p: maml_outer(loss, p, ep, 0.3, 1)[0]  # noqa: E731
    for v in _directions(params, 3):
        fd = _central_difference(f, params, v, 1e-5)
        assert abs(fd - tree_dot(g2, v).item()) < 2e-3 + 1e-2 * abs(fd)


def test_methods_agree_on_meta_gradients():
    """conv2d per task and grouped conv2d (float32) agree with the float64 im2col form that
    the finite-difference tests verify."""
    params = conv4_init(mx.random.key(6), N, hidden=HID, image_size=S)
    ep = _episodes(7)
    l64, g64 = maml_outer(conv4_batched_loss("im2col"), _f64(params), _f64(ep), 0.3, 1)
    g64 = tree_map(lambda a: a.astype(mx.float32), g64)
    for method in ("loop", "grouped"):
        l32, g32 = maml_outer(conv4_batched_loss(method), params, ep, 0.3, 1)
        np.testing.assert_allclose(l32.item(), l64.item(), rtol=1e-5)
        assert_trees_close(g32, g64, rtol=2e-3, atol=2e-4)
    # The default (method="loop") is what task_batched(conv4_task_losses) runs.
    _, g = maml_outer(task_batched(conv4_task_losses), params, ep, 0.3, 1)
    assert_trees_close(g, maml_outer(conv4_batched_loss("loop"), params, ep, 0.3, 1)[1], 0, 0)


def test_first_order_on_real_sized_model():
    """FOMAML on a full-width 28x28 conv4 runs and gives finite gradients of the right shapes."""
    params = conv4_init(mx.random.key(0), 5)
    ep = _episodes(1, t=2, n=5, k=1, q=2, size=28)
    loss, g = maml_outer(task_batched(conv4_task_losses), params, ep, 0.4, 1, first_order=True)
    assert np.isfinite(loss.item())
    assert tree_map(lambda a: a.shape, g) == tree_map(lambda a: a.shape, params)
    assert np.isfinite(tree_norm(g).item())
