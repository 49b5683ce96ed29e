"""Outer loops of gradient-based meta-learning over a batch of tasks.

Every function takes a batch of episodes with a leading task axis ``T`` and treats the tasks
in parallel. A per-task loss ``loss_fn(params, x, y) -> scalar`` is lifted to a *task-batched*
loss ``(params_T, X_T, Y_T) -> (T,)`` with ``mx.vmap``; a model that has a faster batched form
(conv4 folds tasks into grouped-convolution channels, because MLX cannot vmap grad through
conv2d) passes it wrapped in :func:`task_batched` instead. Tasks are independent, so the
gradient of ``sum_t L_t(theta_t)`` with respect to the stacked ``theta_T`` holds each task's own
gradient, and one ``mx.grad`` adapts all tasks at once.

Meta-objective (MAML, Finn et al. 2017), for inner rate alpha and S inner steps:

    theta'_t = U^S(theta; support_t),  U(theta) = theta - alpha * grad L_support(theta)
    L_meta(theta) = (1/T) sum_t L_query_t(theta'_t)

``maml_outer`` returns ``(L_meta, grad L_meta)`` with the full second-order term (nested
``mx.grad``); FOMAML drops it (inner gradients held constant), so its meta-gradient is the query
gradient at theta'_t. Reptile (Nichol et al. 2018) moves theta toward the adapted parameters:
``theta + beta (mean_t theta'_t - theta)``; ``reptile_grad`` returns ``theta - mean_t theta'_t``
so any outer optimizer can take it.

Learned inner rates: Meta-SGD (Li et al. 2017) learns one rate per parameter *entry*, shared by
all inner steps (:class:`MetaSGDParams`); MAML++'s LSLR (Antoniou et al. 2019) learns one rate per
parameter *tensor* and inner step (:class:`LSLRParams`, :func:`lslr_outer`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import mlx.core as mx

from metafn.inner import InnerRule, LearningRate, check_inner_rule, check_lr, inner_init, inner_step
from metafn.losses import LossFn
from metafn.tasks.episode import Episode, check_episode_batch
from metafn.tree import (
    PyTree, tree_broadcast, tree_flatten, tree_map, tree_mean_axis0, tree_sub,
)

__all__ = [
    "BatchedLoss", "task_batched", "vmap_tasks", "batched_adapt", "maml_outer", "fomaml_outer",
    "reptile_outer", "reptile_grad", "MetaSGDParams", "metasgd_init", "metasgd_outer",
    "LSLRParams", "lslr_init", "lslr_steps", "lslr_rates", "lslr_outer",
    "protonet_logits", "soft_kmeans_logits", "protonet_outer", "embed_tasks",
]


class BatchedLoss(NamedTuple):
    """A loss already batched over tasks: ``fn(params_T, X_T, Y_T) -> (T,)``."""

    fn: Callable[[PyTree, mx.array, mx.array], mx.array]


def task_batched(fn: Callable[[PyTree, mx.array, mx.array], mx.array]) -> BatchedLoss:
    """Mark ``fn(params_T, X_T, Y_T) -> (T,)`` as batched over tasks (leading axis on every leaf)."""
    return BatchedLoss(fn)


def vmap_tasks(loss_fn: LossFn | BatchedLoss) -> BatchedLoss:
    """Lift a per-task ``loss_fn(params, x, y) -> scalar`` over a leading task axis with vmap."""
    if isinstance(loss_fn, BatchedLoss):
        return loss_fn
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable (params, x, y) -> scalar, got {loss_fn!r}")
    return BatchedLoss(mx.vmap(loss_fn, in_axes=(0, 0, 0)))


def batched_adapt(
    loss_fn: LossFn | BatchedLoss,
    params_t: PyTree,
    x: mx.array,
    y: mx.array,
    steps: int,
    lr: LearningRate,
    first_order: bool = False,
) -> PyTree:
    """Adapt ``T`` parameter copies (leading axis ``T`` on every leaf) on their own tasks.

    ``lr`` is a scalar or a per-parameter tree shaped like *one* copy (broadcast over tasks).
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps: expected a non-negative int, got {steps!r}")
    batched = vmap_tasks(loss_fn).fn
    grad_fn = mx.grad(lambda p: mx.sum(batched(p, x, y)))
    scalar_lr = isinstance(lr, (int, float, mx.array))
    for _ in range(steps):
        g = grad_fn(params_t)
        if first_order:
            g = tree_map(mx.stop_gradient, g)
        if scalar_lr:
            params_t = tree_map(lambda p, d: p - lr * d, params_t, g)
        else:
            params_t = tree_map(lambda p, d, a: p - a * d, params_t, g, lr)
    return params_t


def _check(params: PyTree, episodes: Episode, inner_lr: LearningRate, steps: int) -> int:
    tasks = check_episode_batch(episodes)
    check_lr(inner_lr, params, "inner_lr")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps: expected a non-negative int, got {steps!r}")
    return tasks


def _check_step_weights(step_weights: tuple[float, ...] | None, steps: int) -> None:
    if step_weights is None:
        return
    if len(step_weights) != steps or steps == 0:
        raise ValueError(
            f"step_weights: expected one weight per inner step ({steps}), got {len(step_weights)}"
        )
    if any(not (w >= 0) for w in step_weights) or sum(step_weights) <= 0:
        raise ValueError(f"step_weights: expected non-negative weights with a positive sum, got {step_weights}")


def _maml_objective(
    loss_fn: LossFn | BatchedLoss,
    episodes: Episode,
    inner_lr_of: Callable[[PyTree, int], LearningRate],
    params_of: Callable[[PyTree], PyTree],
    steps: int,
    first_order: bool,
    step_weights: tuple[float, ...] | None = None,
) -> Callable[[PyTree], mx.array]:
    """The meta-loss as a function of the meta-parameters; ``inner_lr_of(meta, s)`` is the rate
    of inner step ``s`` (a scalar or a tree broadcasting against one parameter copy)."""
    batched = vmap_tasks(loss_fn)
    sx, sy, qx, qy = episodes
    tasks = sx.shape[0]

    def objective(meta: PyTree) -> mx.array:
        params_t = tree_broadcast(params_of(meta), tasks)
        if step_weights is None:
            for s in range(steps):
                params_t = batched_adapt(batched, params_t, sx, sy, 1, inner_lr_of(meta, s), first_order)
            return mx.mean(batched.fn(params_t, qx, qy))
        total = 0.0
        for s, w in enumerate(step_weights):
            params_t = batched_adapt(batched, params_t, sx, sy, 1, inner_lr_of(meta, s), first_order)
            if w:
                total = total + w * mx.mean(batched.fn(params_t, qx, qy))
        return total / sum(step_weights)

    return objective


def maml_outer(
    loss_fn: LossFn | BatchedLoss,
    params: PyTree,
    episodes: Episode,
    inner_lr: LearningRate,
    steps: int,
    first_order: bool = False,
    step_weights: tuple[float, ...] | None = None,
) -> tuple[mx.array, PyTree]:
    """MAML meta-loss and meta-gradient ``(L_meta(theta), grad L_meta(theta))`` over ``T`` tasks.

    Second order by default (nested ``mx.grad`` through the inner updates); ``first_order=True``
    is FOMAML. With ``steps=0`` it is the plain gradient of the mean query loss.
    ``step_weights`` (one per inner step) gives MAML++'s multi-step loss (Antoniou et al. 2019):
    ``L_meta = sum_k w_k mean_t L_query_t(theta^k_t) / sum_k w_k``, the query loss after every
    inner step rather than only the last.
    """
    _check(params, episodes, inner_lr, steps)
    _check_step_weights(step_weights, steps)
    objective = _maml_objective(
        loss_fn, episodes, lambda _, s: inner_lr, lambda p: p, steps, first_order, step_weights
    )
    return mx.value_and_grad(objective)(params)


def fomaml_outer(
    loss_fn: LossFn | BatchedLoss,
    params: PyTree,
    episodes: Episode,
    inner_lr: LearningRate,
    steps: int,
) -> tuple[mx.array, PyTree]:
    """First-order MAML: the meta-gradient is ``mean_t grad L_query_t(theta'_t)``."""
    return maml_outer(loss_fn, params, episodes, inner_lr, steps, first_order=True)


def reptile_outer(params: PyTree, adapted: PyTree, outer_lr: float | mx.array) -> PyTree:
    """``theta + outer_lr * (mean_t theta'_t - theta)``; ``adapted`` has a leading task axis."""
    if isinstance(outer_lr, (int, float)) and not (0.0 <= outer_lr) or outer_lr != outer_lr:
        raise ValueError(f"outer_lr: expected a finite non-negative number, got {outer_lr}")
    mean = tree_mean_axis0(adapted)
    return tree_map(lambda p, m: p + outer_lr * (m - p), params, mean)


def reptile_grad(
    loss_fn: LossFn | BatchedLoss,
    params: PyTree,
    episodes: Episode,
    inner_lr: LearningRate,
    steps: int,
    inner_batches: int = 1,
    inner_rule: InnerRule | None = None,
) -> tuple[mx.array, PyTree]:
    """Reptile's pseudo-gradient ``theta - mean_t theta'_t`` and the mean loss of the last inner step.

    Each task adapts on its support and query sets together (Reptile trains on all of a task's
    data): ``z = concat(support, query)``, ``n`` examples. With ``inner_batches = B`` that data is
    dealt into ``B`` interleaved minibatches ``z[b::B]`` and inner step ``s`` (``0..steps-1``)
    takes an SGD step on minibatch ``s mod B``; ``B = 1`` is full-batch. Nichol et al. (2018,
    sec. 5) find that distinct minibatches per inner step carry Reptile's generalization term
    ``E[H_i g_j]``, ``i != j``: on one batch it only rewards a large gradient on the data just seen.
    Their Omniglot recipe is 5 steps over 5 minibatches of 10 (``n = 50``, ``B = 5``).
    ``sgd(beta)`` applied to the direction is exactly :func:`reptile_outer`.

    ``inner_rule`` (:class:`~metafn.inner.InnerRule`; ``None``: SGD) is the inner step's update;
    an ``adam`` rule starts from a fresh state for every task and meta-step (each task's moments
    are its own, stacked on the task axis), as in Nichol et al.'s Omniglot runs (Adam, ``beta1 =
    0``), except that their code keeps Adam's moments from task to task.

    The loss returned is the mean over tasks of the last inner step's minibatch loss, at the
    weights before that step (free: it is the value of the gradient that step takes).
    Errors: ``inner_batches`` not an int in ``1..n``.
    """
    tasks = _check(params, episodes, inner_lr, steps)
    batched = vmap_tasks(loss_fn)
    sx, sy, qx, qy = episodes
    x = mx.concatenate([sx, qx], axis=1)
    y = mx.concatenate([sy, qy], axis=1)
    n = x.shape[1]
    if isinstance(inner_batches, bool) or not isinstance(inner_batches, int) or not 1 <= inner_batches <= n:
        raise ValueError(f"inner_batches: expected an int in 1..{n} (the examples of a task's support "
                         f"and query sets), got {inner_batches!r}")
    use_rule = inner_rule is not None and inner_rule.name != "sgd"
    if inner_rule is not None:
        check_inner_rule(inner_rule)
    step = mx.value_and_grad(lambda p, xb, yb: mx.sum(batched.fn(p, xb, yb)))
    scalar_lr = isinstance(inner_lr, (int, float, mx.array))
    adapted = tree_broadcast(params, tasks)
    state = inner_init(inner_rule, adapted) if use_rule else ()
    loss = mx.sum(batched.fn(adapted, x, y)) if steps == 0 else None
    for s in range(steps):
        b = s % inner_batches
        loss, g = step(adapted, x[:, b::inner_batches], y[:, b::inner_batches])
        g = tree_map(mx.stop_gradient, g)
        if use_rule:
            adapted, state = inner_step(inner_rule, adapted, g, state, inner_lr)
        elif scalar_lr:
            adapted = tree_map(lambda p, d: p - inner_lr * d, adapted, g)
        else:
            adapted = tree_map(lambda p, d, a: p - a * d, adapted, g, inner_lr)
    return mx.stop_gradient(loss) / tasks, tree_sub(params, tree_mean_axis0(adapted))


class MetaSGDParams(NamedTuple):
    """Meta-SGD's meta-parameters: the initialization and a per-parameter inner rate tree."""

    params: PyTree
    lr: PyTree


def metasgd_init(params: PyTree, lr: float) -> MetaSGDParams:
    """Meta-SGD meta-parameters with every inner rate set to ``lr`` (Li et al. 2017)."""
    check_lr(lr, params)
    return MetaSGDParams(params, tree_map(lambda p: mx.full(p.shape, lr, dtype=p.dtype), params))


def metasgd_outer(
    loss_fn: LossFn | BatchedLoss,
    meta: MetaSGDParams,
    episodes: Episode,
    steps: int,
) -> tuple[mx.array, MetaSGDParams]:
    """Meta-SGD: MAML's objective with the inner rates meta-learned alongside the initialization.

    theta'_t = theta - alpha ⊙ grad L_support_t(theta) (elementwise rates alpha); returns the meta
    loss and gradients for both ``meta.params`` and ``meta.lr``.
    """
    if not isinstance(meta, MetaSGDParams):
        raise TypeError(f"meta: expected MetaSGDParams (see metasgd_init), got {type(meta).__name__}")
    _check(meta.params, episodes, meta.lr, steps)
    objective = _maml_objective(
        loss_fn, episodes, lambda m, s: m.lr, lambda m: m.params, steps, first_order=False
    )
    return mx.value_and_grad(objective)(meta)


class LSLRParams(NamedTuple):
    """MAML++'s meta-parameters with LSLR, per-layer per-step learned inner rates (Antoniou et al. 2019).

    params: the initialization theta, a parameter tree.
    lr: a tree with the keys of ``params`` whose leaf for each parameter tensor ``l`` (of any
      shape) is a vector ``(S,)``: ``lr[l][s] = alpha_{l,s}``, the rate of tensor ``l`` at inner
      step ``s``, for ``S`` inner steps.
    """

    params: PyTree
    lr: PyTree


def lslr_init(params: PyTree, lr: float, steps: int) -> LSLRParams:
    """LSLR meta-parameters for ``steps`` inner steps, every rate ``alpha_{l,s} = lr``.

    The rate vectors have the dtype of their parameter tensors.
    """
    check_lr(lr, params)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1 (LSLR learns one rate per inner step), got {steps!r}")
    return LSLRParams(params, tree_map(lambda p: mx.full((steps,), lr, dtype=p.dtype), params))


def _check_lslr(meta: LSLRParams) -> int:
    """The number of inner steps ``S`` of ``meta``; errors for a malformed rate tree."""
    if not isinstance(meta, LSLRParams):
        raise TypeError(f"meta: expected LSLRParams (see lslr_init), got {type(meta).__name__}")
    p_keys = [k for k, _ in tree_flatten(meta.params)]
    rates = tree_flatten(meta.lr)
    if [k for k, _ in rates] != p_keys:
        raise ValueError(
            f"meta.lr: expected one rate vector per parameter tensor with the keys of meta.params; "
            f"got keys {[k for k, _ in rates][:6]}... for params keys {p_keys[:6]}..."
        )
    shapes = {tuple(v.shape) for _, v in rates}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1 or next(iter(shapes))[0] < 1:
        raise ValueError(
            f"meta.lr: expected every leaf to be a vector (S,) of per-step rates with the same "
            f"S >= 1, got shapes {sorted(shapes)}"
        )
    return next(iter(shapes))[0]


def lslr_steps(meta: LSLRParams) -> int:
    """``S``, the number of inner steps ``meta``'s rates were learned for."""
    return _check_lslr(meta)


def lslr_rates(meta: LSLRParams, step: int) -> PyTree:
    """The rates of inner step ``step``: a tree of scalars ``alpha_{l,s}`` shaped like ``meta.params``'s
    keys (each leaf shape ``()``, broadcasting against its tensor).

    Steps at or beyond ``S`` (adapting for longer than the rates were learned for, e.g. at
    evaluation) use the last learned step's rates ``alpha_{l,S-1}``.
    """
    n = _check_lslr(meta)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step: expected a non-negative int, got {step!r}")
    return _rates_at(meta.lr, min(step, n - 1))


def _rates_at(lr: PyTree, step: int) -> PyTree:
    return tree_map(lambda a: a[step], lr)


def lslr_outer(
    loss_fn: LossFn | BatchedLoss,
    meta: LSLRParams,
    episodes: Episode,
    first_order: bool = False,
    step_weights: tuple[float, ...] | None = None,
) -> tuple[mx.array, LSLRParams]:
    """MAML with per-layer per-step learned inner rates (MAML++'s LSLR, Antoniou et al. 2019).

    For each task ``t`` and inner step ``s = 0..S-1`` (``S = lslr_steps(meta)``), every
    parameter tensor ``l`` moves with its own rate of that step::

        theta^{s+1}_{t,l} = theta^s_{t,l} - alpha_{l,s} * grad_l L_support_t(theta^s_t),  theta^0_t = theta
        L_meta = (1/T) sum_t L_query_t(theta^S_t)

    or, with ``step_weights`` ``w`` (one per step; MAML++'s multi-step loss),
    ``L_meta = sum_s w_s (1/T) sum_t L_query_t(theta^{s+1}_t) / sum_s w_s``. Returns ``L_meta``
    and its gradient with respect to both ``meta.params`` (shapes of the parameters) and
    ``meta.lr`` (``(S,)`` per tensor). Second order by default; ``first_order=True`` treats the
    inner gradients ``g_{l,s}`` as constants (the rates still get a gradient through the updates:
    for the last-step loss, ``dL/d alpha_{l,s} = -<grad_l L_query(theta^S), g_{l,s}>``). With every
    rate equal to ``alpha`` it equals ``maml_outer(loss_fn, meta.params, episodes, alpha, S, ...)``.
    """
    steps = _check_lslr(meta)
    check_episode_batch(episodes)
    _check_step_weights(step_weights, steps)
    objective = _maml_objective(
        loss_fn, episodes, lambda m, s: _rates_at(m.lr, s), lambda m: m.params, steps,
        first_order, step_weights,
    )
    return mx.value_and_grad(objective)(meta)


def _class_means(emb: mx.array, weights: mx.array) -> mx.array:
    """``(n_way, D)`` weighted means ``sum_i w_ik e_i / sum_i w_ik`` of ``emb (N, D)`` under
    ``weights (N, n_way)``; a class with no weight gets the zero vector."""
    return (weights.T @ emb) / mx.maximum(mx.sum(weights, axis=0), 1e-12)[:, None]


def _neg_sq_distances(query_emb: mx.array, protos: mx.array) -> mx.array:
    """``(Nq, n_way)`` logits ``-||q_j - c_k||^2``."""
    return -(
        mx.sum(query_emb * query_emb, axis=-1, keepdims=True)
        - 2.0 * query_emb @ protos.T
        + mx.sum(protos * protos, axis=-1)[None, :]
    )


def protonet_logits(
    support_emb: mx.array, support_y: mx.array, query_emb: mx.array, n_way: int
) -> mx.array:
    """Prototypical-network logits ``-||f(x_q) - c_k||^2`` (Snell et al. 2017).

    support_emb ``(Ns, D)``, support_y ``(Ns,)`` ints in ``[0, n_way)``, query_emb ``(Nq, D)``;
    ``c_k`` is the mean support embedding of class k; returns ``(Nq, n_way)``.
    """
    onehot = (support_y[:, None] == mx.arange(n_way)[None, :]).astype(support_emb.dtype)
    return _neg_sq_distances(query_emb, _class_means(support_emb, onehot))


def soft_kmeans_logits(
    support_emb: mx.array, support_y: mx.array, query_emb: mx.array, n_way: int, steps: int = 1
) -> mx.array:
    """Transductive ProtoNet logits: prototypes refined on the unlabelled queries by soft k-means
    (Ren et al. 2018, "Meta-learning for semi-supervised few-shot classification", with the
    query set as the unlabelled set).

    Starting from the support means ``c_k^0`` (:func:`protonet_logits`), each step assigns every
    query softly by the model's own posterior and re-averages::

        z_jk = softmax_k(-||q_j - c_k^t||^2)
        c_k^{t+1} = (sum_{i: y_i = k} s_i + sum_j z_jk q_j) / (n_k + sum_j z_jk)

    and returns ``-||q_j - c_k^steps||^2``, ``(Nq, n_way)``. ``steps = 0`` is
    :func:`protonet_logits`. Shapes as there. The logits of one query depend on the other
    queries of its episode (that is the point), so scores are only comparable with the same
    query set: transductive, like batch norm on the query batch.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps: expected an int >= 0, got {steps!r}")
    onehot = (support_y[:, None] == mx.arange(n_way)[None, :]).astype(support_emb.dtype)
    both = mx.concatenate([support_emb, query_emb], axis=0)
    logits = _neg_sq_distances(query_emb, _class_means(support_emb, onehot))
    for _ in range(steps):
        z = mx.softmax(logits, axis=-1)
        protos = _class_means(both, mx.concatenate([onehot, z], axis=0))
        logits = _neg_sq_distances(query_emb, protos)
    return logits


def embed_tasks(
    embed_fn: Callable[[PyTree, mx.array], mx.array], params: PyTree, x: mx.array
) -> mx.array:
    """Embed each task's examples separately: ``x (T, n, *x) -> (T, n, D)``."""
    return mx.stack([embed_fn(params, x[t]) for t in range(x.shape[0])])


def protonet_outer(
    embed_fn: Callable[[PyTree, mx.array], mx.array],
    params: PyTree,
    episodes: Episode,
    n_way: int,
) -> tuple[mx.array, PyTree, mx.array]:
    """Mean ProtoNet cross-entropy over ``T`` episodes, its gradient, and query accuracy.

    ``embed_fn(params, x)`` embeds a flat batch ``(N, *x) -> (N, D)``; it is called once per
    episode, so batch-norm statistics (conv4) never mix episodes.
    """
    from metafn.losses import accuracy, cross_entropy

    check_episode_batch(episodes)
    if not isinstance(n_way, int) or n_way < 2:
        raise ValueError(f"n_way: expected an int >= 2, got {n_way!r}")
    sx, sy, qx, qy = episodes
    ns = sx.shape[1]

    def loss_and_logits(p: PyTree) -> tuple[mx.array, mx.array]:
        emb = embed_tasks(embed_fn, p, mx.concatenate([sx, qx], axis=1))
        logits = mx.vmap(lambda s_emb, s_y, q_emb: protonet_logits(s_emb, s_y, q_emb, n_way))(
            emb[:, :ns], sy, emb[:, ns:]
        )
        return cross_entropy(logits, qy), logits

    (loss, logits), grads = mx.value_and_grad(lambda p: loss_and_logits(p), argnums=0)(params)
    return loss, grads, accuracy(logits, qy)
