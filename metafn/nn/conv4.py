"""The conv4 few-shot image model (Vinyals et al. 2016; Finn et al. 2017) as pure functions.

Four blocks, then a linear head::

    block(x) = maxpool_2x2(relu(batch_norm(conv3x3(x, W), gamma, beta)))
    conv4(x) = flatten(block4(block3(block2(block1(x))))) @ W_head + b_head

Every block is computed by :func:`conv_block`, which pools *before* the batch-norm affine and
the ReLU (exact, see there), so those run on a quarter of the activations.

``conv3x3``: 3x3 kernel, stride 1, zero padding 1, ``hidden`` output channels, no bias (batch
norm subtracts the batch mean, which cancels a bias exactly). ``maxpool_2x2``: stride 2, odd
sizes floored (28 -> 14 -> 7 -> 3 -> 1, so the 28x28 feature size is ``D = hidden``; 84x84 gives
``D = 25 hidden``). Batch norm uses the statistics of the batch it is given (transductive, as in
MAML, which has no running averages): per channel ``c`` over the ``(N, H, W)`` axes,

    mu_c = mean(x_c),  var_c = mean((x_c - mu_c)^2)   (two passes, biased variance)
    y = gamma_c (x - mu_c) / sqrt(var_c + eps) + beta_c,   eps = 1e-5.

Parameters::

    {"blocks": [{"w": (hidden, 3, 3, c_in), "gamma": (hidden,), "beta": (hidden,)} x 4],
     "head": {"w": (D, n_way), "b": (n_way,)}}

(``w`` in MLX's ``(C_out, KH, KW, C_in)`` layout). Initialization: conv kernels Glorot-uniform
(``fan_in = 9 c_in``, ``fan_out = 9 hidden``, as Finn et al.'s ``xavier_initializer_conv2d``),
``gamma = 1``, ``beta = 0``, head ``U(-1/sqrt(D), 1/sqrt(D))`` (:func:`metafn.nn.dense_init`).
Inputs are NHWC: ``x (N, H, W, c_in)``.

Task-batched form
-----------------
MLX cannot ``mx.vmap`` ``mx.grad`` through ``conv2d`` ("Not implemented for AsStrided"), so
:func:`conv4_task_losses` computes ``T`` tasks with their own parameters (leading axis ``T`` on
every leaf) directly, for MAML's inner loop (:func:`metafn.outer.task_batched`). Three
equivalent ways to run the ``T`` networks (``method``):

* ``"loop"`` (default): the network once per task, ``mx.conv2d`` on that task's slice of the
  parameters; activations stay separate arrays (one graph over all tasks);
* ``"grouped"``: tasks folded into channels, ``x (B, H, W, T c_in)``, one
  ``mx.conv2d(x, W (T hidden, 3, 3, c_in), groups=T)`` per layer;
* ``"im2col"``: the 9 shifted copies of the padded input concatenated, ``(T, B H W, 9 c_in)``,
  times ``(T, 9 c_in, hidden)`` as one batched matmul. Runs in float64 (MLX's CPU convolution
  has no float64 kernel), which the finite-difference tests use.

Batch-norm statistics, the head and the cross-entropy are per task in all three.

Measured on Linux CPU (2 shared cores, OpenBLAS, MLX 0.32; W4: 28x28, 64 channels, 5-way 1-shot,
15 queries, 8 tasks, 1 inner step; best of 5, machine under load from other jobs): one
second-order meta-gradient ``loop`` 3.4 s, a Python loop of per-task ``mx.value_and_grad``
2.8 s (it holds one task's graph at a time: 0.22 GB peak against 0.80 GB), ``im2col`` ~7 s,
``grouped`` ~105 s (MLX's CPU grouped convolution takes a slow path, ~25-30x a dense one).
First order: 2.3 s / 2.2 s / ~9 s / ~80 s. ``mx.compile`` of the whole meta-gradient spent 7 min
(second order) / 1 min (first order) compiling and then ran no faster. With the pooled-first
:func:`conv_block` and one ``mx.split`` per parameter, ``loop`` takes 1.08 s on one idle core
(1.15 s compiled; ``python -m bench.speed --threads 1 --pin 0``, 2026-12-05).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import mlx.core as mx

from metafn.nn.mlp import dense_init
from metafn.outer import BatchedLoss, task_batched
from metafn.tree import PyTree

__all__ = [
    "batch_norm", "max_pool_2x2", "conv3x3", "conv_block", "conv4_feature_size", "conv4_init",
    "conv4_embed", "conv4_apply", "conv4_loss", "conv4_task_embed", "conv4_task_logits",
    "conv4_task_losses", "conv4_batched_loss", "TASK_METHODS", "BN_EPS",
]

BN_EPS = 1e-5
TASK_METHODS = ("loop", "grouped", "im2col")

Conv4Params = dict[str, Any]


def conv4_feature_size(image_size: int, hidden: int = 64) -> int:
    """Length ``D`` of the flattened conv4 features for square ``image_size`` inputs."""
    s = image_size
    for _ in range(4):
        s //= 2
    if s < 1:
        raise ValueError(
            f"image_size: conv4 halves the image 4 times, so it needs >= 16 pixels, got {image_size}"
        )
    return hidden * s * s


def conv4_init(
    key: mx.array, n_way: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28
) -> Conv4Params:
    """conv4 parameters for ``image_size x image_size x in_channels`` inputs and ``n_way`` classes."""
    for name, v in (("n_way", n_way), ("in_channels", in_channels), ("hidden", hidden)):
        if isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    d = conv4_feature_size(image_size, hidden)
    keys = mx.random.split(key, 5)
    blocks = []
    c_in = in_channels
    for i in range(4):
        bound = math.sqrt(6.0 / (9 * c_in + 9 * hidden))
        blocks.append({
            "w": mx.random.uniform(-bound, bound, (hidden, 3, 3, c_in), key=keys[i]),
            "gamma": mx.ones((hidden,)),
            "beta": mx.zeros((hidden,)),
        })
        c_in = hidden
    return {"blocks": blocks, "head": dense_init(keys[4], d, n_way)}


def _staged_mean(x: mx.array, axes: tuple[int, ...]) -> mx.array:
    """Mean over ``axes`` (kept as size 1), one axis at a time from the innermost.

    MLX's float32 mean over several large axes at once accumulates ~40x more rounding error than
    XLA's (relative 5e-6 against 1.4e-7 measured over (N, H, W)); after max-pooling that error
    flips arg-maxes and moves whole gradient entries. Reducing axis by axis sums shorter runs.
    """
    for axis in sorted(axes, reverse=True):
        x = mx.mean(x, axis=axis, keepdims=True)
    return x


def _bn_affine(
    x: mx.array, gamma: mx.array, beta: mx.array, axes: tuple[int, ...], eps: float = BN_EPS
) -> tuple[mx.array, mx.array]:
    """Batch norm of ``x`` over ``axes`` as a per-channel affine map ``y = x * scale + shift``:
    ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mu * scale``, with the batch's two-pass
    statistics ``mu = mean(x)``, ``var = mean((x - mu)^2)`` (staged reductions, see
    :func:`_staged_mean`). ``scale`` and ``shift`` have the shape of ``x`` with ``axes`` set to 1
    (or the broadcast shape of ``gamma`` / ``beta`` against it)."""
    mu = _staged_mean(x, axes)
    var = _staged_mean(mx.square(x - mu), axes)
    scale = gamma * mx.rsqrt(var + eps)
    return scale, beta - mu * scale


def _apply_affine(x: mx.array, scale: mx.array, shift: mx.array, axes: tuple[int, ...]) -> mx.array:
    """``x * scale + shift`` with per-channel ``scale`` / ``shift`` reduced over ``axes``."""
    if scale.shape != shift.shape or scale.ndim != x.ndim:
        return x * scale + shift
    # The affine on a view with each run of reduced / kept axes collapsed into one, e.g.
    # (N, H, W, C) -> (N H W, C) with (C,)-shaped statistics. The reshape materializes scale and
    # shift: under mx.compile the CPU backend otherwise fuses the statistics' arithmetic into the
    # full-size kernel and indexes five broadcast operands per element (a conv4 forward pass ran
    # 4x slower compiled than eager).
    view, stat_view = _collapsed_shapes(x.shape, set(a % x.ndim for a in axes))
    y = x.reshape(view) * scale.reshape(stat_view) + shift.reshape(stat_view)
    return y.reshape(x.shape)


def batch_norm(
    x: mx.array, gamma: mx.array, beta: mx.array, axes: tuple[int, ...], eps: float = BN_EPS
) -> mx.array:
    """Batch norm with the batch's own statistics over ``axes`` (see the module docstring).

    ``gamma`` and ``beta`` broadcast against the reduced statistics (shape of ``x`` with ``axes``
    set to 1). Two passes: ``mu = mean(x)``, ``var = mean((x - mu)^2)`` (staged reductions, see
    :func:`_staged_mean`); computed as ``x * s + (beta - mu s)`` with ``s = gamma / sqrt(var + eps)``.
    """
    scale, shift = _bn_affine(x, gamma, beta, axes, eps)
    return _apply_affine(x, scale, shift, axes)


def conv_block(
    x: mx.array,
    w: mx.array,
    gamma: mx.array,
    beta: mx.array,
    axes: tuple[int, ...] = (0, 1, 2),
    conv: Callable[[mx.array, mx.array], mx.array] | None = None,
) -> mx.array:
    """One conv4 block, ``maxpool_2x2(relu(batch_norm(conv(x, w), gamma, beta)))``, pooled first.

    Batch norm with batch statistics is, per channel, the affine map ``a z + b`` with
    ``a = gamma / sqrt(var + eps)``; ReLU is non-decreasing, so where ``a >= 0``

        maxpool(relu(a z + b)) = relu(a maxpool(z) + b)

    exactly, in floating point too (a correctly rounded multiply or add is monotone). A channel
    with ``gamma < 0`` is flipped first: with the constant ``s = sign(gamma)`` (+1 at 0),
    ``conv(x, s w) = s conv(x, w)`` exactly (the sign goes on the small kernel, not on the
    activation), its statistics are ``s mu`` and ``var``, and ``gamma s >= 0``. The affine and the
    ReLU then run on the pooled, quarter-size tensor, forward and in every backward pass (MAML's
    second order differentiates the backward pass again). Only the gradient's split among *tied*
    maxima can differ from the unpooled order. For a thin input with the default convolution and
    statistics over ``(N, H, W)`` (``18 Ci <= Co``), the convolution is one GEMM on the input's
    patches and the statistics come from the patches' moments (:func:`_patch_moments`), equal up
    to rounding: conv4's first block on W6's 100 images, forward and backward, 31.0 -> ~19 ms.

    ``x``: the block input; ``w``: kernels with the output channel on the axis before the last
    three (``(Co, 3, 3, Ci)``, or ``(T, Co, 3, 3, Ci)``); ``gamma`` / ``beta``: shaped like the
    statistics of ``conv(x, w)`` reduced over ``axes``, holding one entry per output channel of
    ``w`` in its order. ``conv`` defaults to :func:`conv3x3`.
    """
    thin = (conv is None and axes == (0, 1, 2) and x.ndim == 4 and 18 * x.shape[-1] <= w.shape[0]
            and mx.default_device() == mx.cpu)  # float64 moments: the CPU has them, Metal not
    conv = conv3x3 if conv is None else conv
    sign = mx.stop_gradient(mx.where(gamma < 0, -1.0, 1.0).astype(gamma.dtype))
    w = w * sign.reshape(*w.shape[:-3], 1, 1, 1)
    if thin:  # first layers (grayscale / RGB input): one im2col GEMM, patch-moment statistics
        n, h, wd, ci = x.shape
        p = _patches3x3(x).reshape(n * h * wd, 9 * ci)
        v = w.reshape(w.shape[0], 9 * ci)
        z = (p @ v.T).reshape(n, h, wd, w.shape[0])
        mu, var = _patch_moments(p, v)
        scale = gamma * sign * mx.rsqrt(var + BN_EPS)
        shift = beta - mu * scale
    else:
        z = conv(x, w)
        scale, shift = _bn_affine(z, gamma * sign, beta, axes)
    return mx.maximum(_apply_affine(max_pool_2x2(z), scale, shift, axes), 0.0)


def _patch_moments(p: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
    """Per-channel mean and (biased) variance of the convolution ``Z = P V^T`` over its rows,
    from the moments of the patches ``P (M, 9 Ci)`` (the im2col matrix, :func:`_patches3x3`)
    and the kernels ``V (Co, 9 Ci)`` instead of from ``Z (M, Co)``. With ``m = mean_rows(P)`` and
    the centred patch covariance ``S = (P - m)^T (P - m) / M``:

        mu = V m,    var_c = V_c S V_c^T   (exact: Z - mu = (P - m) V^T).

    For a thin input (``9 Ci`` well below ``Co``: the first layer on grayscale or RGB images)
    ``P`` is a fraction of ``Z``'s size, and the statistics' gradient flows to ``V`` (and ``P``)
    through ``(9 Ci, 9 Ci)``-sized products instead of full-size broadcasts of ``Z``.

    Precision: neighbouring pixels are strongly correlated, so ``S`` is ill-conditioned and the
    quadratic form cancels: accumulated in float32 it lost ~3e-5 of ``var`` on W5's images
    (two passes over ``Z``: 3e-7), enough to flip max-pool arg-maxes downstream. So the moments
    are computed in float64 (the CPU backend has it; the ``(M, 9 Ci)`` and ``(9 Ci, 9 Ci)``
    arrays are small) and rounded once: 5e-8. Shapes: ``p (M, 9 Ci)``, ``v (Co, 9 Ci)`` ->
    ``mu, var (Co,)`` in ``p``'s dtype.
    """
    dtype = p.dtype
    p, v = p.astype(mx.float64), v.astype(mx.float64)
    m = mx.mean(p, axis=0)
    pc = p - m
    cov = (pc.T @ pc) * (1.0 / p.shape[0])
    return (v @ m).astype(dtype), mx.sum((v @ cov) * v, axis=1).astype(dtype)


def _collapsed_shapes(shape: tuple[int, ...], reduced: set[int]) -> tuple[list[int], list[int]]:
    """``shape`` with each maximal run of axes that are all in ``reduced`` (or all not) merged
    into one axis, and the matching statistics shape (1 on the merged reduced axes); a leading
    reduced run is dropped from the statistics shape, so it broadcasts as ``(C,)``."""
    view: list[int] = []
    stat: list[int] = []
    prev = None
    for i, n in enumerate(shape):
        red = i in reduced
        if red == prev:
            view[-1] *= n
            stat[-1] *= 1 if red else n
        else:
            view.append(n)
            stat.append(1 if red else n)
        prev = red
    if shape and 0 in reduced:
        stat = stat[1:]
    return view, stat


def max_pool_2x2(x: mx.array) -> mx.array:
    """2x2 max pooling, stride 2, over axes ``(-3, -2)`` of ``(..., H, W, C)``; odd sizes floored."""
    *lead, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    if h != 2 * h2 or w != 2 * w2:
        x = x[..., : 2 * h2, : 2 * w2, :]
    return mx.max(x.reshape(*lead, h2, 2, w2, 2, c), axis=(-4, -2))


def _im2col_conv_tasks(x: mx.array, w: mx.array) -> mx.array:
    """``T`` independent 3x3 'same' convolutions as one batched matmul.

    ``x (T, B, H, W, Ci)``, ``w (T, Co, 3, 3, Ci)`` -> ``(T, B, H, W, Co)``: the 9 shifted
    copies of the zero-padded input, concatenated in ``(kh, kw, ci)`` order, times the kernels.
    """
    t, b, h, wd, ci = x.shape
    co = w.shape[1]
    wm = w.reshape(t, co, 9 * ci).transpose(0, 2, 1)  # (T, 9 Ci, Co)
    return (_patches3x3(x).reshape(t, b * h * wd, 9 * ci) @ wm).reshape(t, b, h, wd, co)


def _patches3x3(x: mx.array) -> mx.array:
    """The im2col form of ``x (..., H, W, Ci)`` for a 3x3 'same' convolution: the 9 shifted
    copies of the zero-padded input concatenated in ``(kh, kw, ci)`` order (the order of a kernel
    ``w (Co, 3, 3, Ci)`` flattened), ``(..., H, W, 9 Ci)``."""
    *lead, h, wd, _ = x.shape
    xp = mx.pad(x, [(0, 0)] * len(lead) + [(1, 1), (1, 1), (0, 0)])
    return mx.concatenate(
        [xp[..., i:i + h, j:j + wd, :] for i in range(3) for j in range(3)], axis=-1
    )


def conv3x3(x: mx.array, w: mx.array) -> mx.array:
    """3x3 convolution, stride 1, zero padding 1: ``x (N, H, W, Ci)``, ``w (Co, 3, 3, Ci)``.

    ``mx.conv2d``; for float64 (which MLX's CPU convolution does not support) the im2col form.
    """
    if x.dtype == mx.float64 or w.dtype == mx.float64:
        return _im2col_conv_tasks(x[None], w[None])[0]
    return mx.conv2d(x, w, padding=1)


def _check_x(params: Conv4Params, x: mx.array, ndim: int, name: str = "x") -> None:
    if not isinstance(x, mx.array):
        raise TypeError(f"{name}: expected an mx.array, got {type(x).__name__}")
    layout = "(N, H, W, C)" if ndim == 4 else "(T, N, H, W, C)"
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected images {layout}, got shape {x.shape}")
    c_in = params["blocks"][0]["w"].shape[-1]
    if x.shape[-1] != c_in:
        raise ValueError(f"{name}: expected {c_in} channels (last axis, NHWC), got shape {x.shape}")


def _check_features(params: Conv4Params, d: int, x: mx.array) -> None:
    want = params["head"]["w"].shape[-2]
    if d != want:
        raise ValueError(
            f"x: images of shape {x.shape} give {d} conv4 features, but the head expects {want}; "
            f"was conv4_init called with this image_size?"
        )


def conv4_embed(params: Conv4Params, x: mx.array) -> mx.array:
    """Features before the head: ``x (N, H, W, C) -> (N, D)`` (flattened in ``(h, w, c)`` order)."""
    _check_x(params, x, 4)
    for blk in params["blocks"]:
        x = conv_block(x, blk["w"], blk["gamma"], blk["beta"])
    return x.reshape(x.shape[0], -1)


def conv4_apply(params: Conv4Params, x: mx.array) -> mx.array:
    """Logits ``(N, n_way)`` for images ``x (N, H, W, C)``."""
    feats = conv4_embed(params, x)
    _check_features(params, feats.shape[-1], x)
    return feats @ params["head"]["w"] + params["head"]["b"]


def _per_example_ce(logits: mx.array, y: mx.array) -> mx.array:
    picked = mx.take_along_axis(logits, y[..., None].astype(mx.int32), axis=-1)[..., 0]
    return mx.logsumexp(logits, axis=-1) - picked


def _check_labels(logits: mx.array, y: mx.array, name: str = "y") -> None:
    if not isinstance(y, mx.array):
        raise TypeError(f"{name}: expected an mx.array of class indices, got {type(y).__name__}")
    if y.shape != logits.shape[:-1]:
        raise ValueError(f"{name}: expected labels of shape {logits.shape[:-1]}, got {y.shape}")
    if mx.issubdtype(y.dtype, mx.floating):
        raise TypeError(f"{name}: expected an integer dtype, got {y.dtype}")


def conv4_loss(params: Conv4Params, x: mx.array, y: mx.array) -> mx.array:
    """Mean softmax cross-entropy of :func:`conv4_apply` on ``x (N, H, W, C)``, ``y (N,)``."""
    logits = conv4_apply(params, x)
    _check_labels(logits, y)
    return mx.mean(_per_example_ce(logits, y))


# ----------------------------------------------------------------------------- task-batched


def _task_features_grouped(params_t: Conv4Params, x: mx.array) -> mx.array:
    """Grouped-convolution form: tasks folded into channels ``(B, H, W, T C)`` throughout."""
    t, b, h, w, ci = x.shape
    z = x.transpose(1, 2, 3, 0, 4).reshape(b, h, w, t * ci)

    def grouped_conv(z: mx.array, w: mx.array) -> mx.array:
        return mx.conv2d(z, w, padding=1, groups=t)

    for blk in params_t["blocks"]:
        wt = blk["w"]
        z = conv_block(z, wt.reshape(-1, *wt.shape[2:]), blk["gamma"].reshape(-1),
                       blk["beta"].reshape(-1), conv=grouped_conv)
    b, h, w, tc = z.shape
    return z.reshape(b, h, w, t, tc // t).transpose(3, 0, 1, 2, 4).reshape(t, b, -1)


def _unstack(a: mx.array) -> list[mx.array]:
    """``a (T, ...)`` as ``T`` arrays ``(...)``, by one ``mx.split``: its gradient is one
    concatenation, where ``a[i]`` (a gather) scatters into a full-size zero array per task."""
    return [p.squeeze(0) for p in mx.split(a, a.shape[0], axis=0)]


def conv4_task_embed(params_t: Conv4Params, x: mx.array, method: str = "loop") -> mx.array:
    """Features of ``T`` tasks with their own parameters: ``x (T, B, H, W, C) -> (T, B, D)``.

    Every leaf of ``params_t`` has a leading task axis ``T``; task ``t`` equals
    ``conv4_embed(params_t[t], x[t])`` (batch-norm statistics per task).
    """
    _check_x({"blocks": [{"w": params_t["blocks"][0]["w"][0]}]}, x, 5)
    if method not in TASK_METHODS:
        raise ValueError(f"method: expected one of {TASK_METHODS}, got {method!r}")
    t = x.shape[0]
    if params_t["blocks"][0]["w"].shape[0] != t:
        raise ValueError(
            f"params_t: expected a leading task axis of {t} (as x) on every leaf, got "
            f"w of shape {params_t['blocks'][0]['w'].shape}"
        )
    if method == "grouped":
        if x.dtype == mx.float64 or params_t["blocks"][0]["w"].dtype == mx.float64:
            raise ValueError('method: "grouped" uses mx.conv2d, which has no float64 kernel on '
                             'CPU; use method="im2col" (or "loop") for float64')
        return _task_features_grouped(params_t, x)
    if method == "loop":
        # Per-task activations stay separate arrays: slicing a stacked activation would cost a
        # full-size scatter per task in the backward pass (the vjp of x[t] is a slice update).
        blocks = [{k: _unstack(v) for k, v in blk.items()} for blk in params_t["blocks"]]
        feats = []
        for i, z in enumerate(_unstack(x)):
            for blk in blocks:
                z = conv_block(z, blk["w"][i], blk["gamma"][i], blk["beta"][i])
            feats.append(z.reshape(z.shape[0], -1))
        return mx.stack(feats)
    for blk in params_t["blocks"]:
        g = blk["gamma"][:, None, None, None, :]
        bt = blk["beta"][:, None, None, None, :]
        x = conv_block(x, blk["w"], g, bt, (1, 2, 3), conv=_im2col_conv_tasks)
    return x.reshape(t, x.shape[1], -1)


def conv4_task_logits(params_t: Conv4Params, x: mx.array, method: str = "loop") -> mx.array:
    """Logits ``(T, B, n_way)`` of ``T`` tasks with their own parameters, ``x (T, B, H, W, C)``."""
    feats = conv4_task_embed(params_t, x, method)
    _check_features({"head": {"w": params_t["head"]["w"][0]}}, feats.shape[-1], x[0])
    return feats @ params_t["head"]["w"] + params_t["head"]["b"][:, None, :]


def conv4_task_losses(
    params_t: Conv4Params, x: mx.array, y: mx.array, method: str = "loop"
) -> mx.array:
    """Per-task mean cross-entropy ``(T,)``: ``x (T, B, H, W, C)``, ``y (T, B)`` int labels.

    ``out[t] == conv4_loss(params_t[t], x[t], y[t])``. Wrap it as
    ``metafn.outer.task_batched(conv4_task_losses)`` (or use :func:`conv4_batched_loss`) for
    :func:`metafn.outer.maml_outer` and the other outer loops.
    """
    logits = conv4_task_logits(params_t, x, method)
    _check_labels(logits, y)
    return mx.mean(_per_example_ce(logits, y), axis=-1)


def conv4_batched_loss(method: str = "loop") -> BatchedLoss:
    """``task_batched(conv4_task_losses)`` with a chosen convolution ``method``; a
    :class:`metafn.outer.BatchedLoss` for ``maml_outer`` / ``fomaml_outer`` / ``reptile_grad``."""
    if method not in TASK_METHODS:
        raise ValueError(f"method: expected one of {TASK_METHODS}, got {method!r}")

    def losses(params_t: PyTree, x: mx.array, y: mx.array) -> mx.array:
        return conv4_task_losses(params_t, x, y, method)

    fn: Callable[[PyTree, mx.array, mx.array], mx.array] = losses
    return task_batched(fn)
