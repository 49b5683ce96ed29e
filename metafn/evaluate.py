"""Held-out evaluation: adaptation curves with 95% confidence intervals, and baselines.

For a batch of test tasks, ``adaptation_curve`` fine-tunes from the given initialization with
plain SGD (or another inner rule: ``rule``) on each task's support set and records the query loss (and accuracy) after
``0, 1, ..., S`` steps, or only after the steps named in ``score_at`` (the rest are NaN rows):
scoring the query set costs more than a fine-tuning step on images (75 queries against 5
support images in a 5-way 1-shot episode), so scoring only the reported budgets makes an
Omniglot evaluation about twice as fast. Fine-tuning rates are chosen per method on *validation* tasks and the
figures are reported on *test* tasks (disjoint pools), with ``mean +- 1.96 * sd / sqrt(n)``.
ProtoNets are evaluated by nearest-prototype accuracy (no fine-tuning).
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import numpy as np

from metafn.experiment import Experiment, learned_inner_rates, model_params, task_losses
from metafn.inner import InnerRule, inner_init, inner_step
from metafn.losses import accuracy, cross_entropy, mse
from metafn.outer import batched_adapt, embed_tasks, soft_kmeans_logits
from metafn.random import fold_in
from metafn.tasks.episode import Episode
from metafn.tree import PyTree, tree_broadcast

__all__ = ["mean_ci", "adaptation_curve", "protonet_scores", "curve_over_tasks", "select_lr",
           "summarize_curve"]

SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}


def mean_ci(values: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of the normal 95% confidence interval ``1.96 * sd / sqrt(n)``."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("values: expected at least one value")
    sd = values.std(ddof=1) if values.size > 1 else 0.0
    return float(values.mean()), float(1.96 * sd / math.sqrt(values.size))


def _query_scores(exp: Experiment, params_t: PyTree, eps: Episode) -> tuple[mx.array, mx.array | None]:
    out = exp.predict_t(params_t, eps.query_x)
    if exp.classification:
        return mx.vmap(cross_entropy)(out, eps.query_y), mx.vmap(accuracy)(out, eps.query_y)
    return mx.vmap(mse)(out, eps.query_y), None


def _check_score_at(score_at: frozenset[int] | None, steps: int) -> None:
    if score_at is not None and not (score_at and all(0 <= k <= steps for k in score_at)):
        raise ValueError(f"score_at: expected None or a non-empty set of steps in 0..{steps}, got "
                         f"{sorted(score_at)}")


def adaptation_curve(
    exp: Experiment, meta: PyTree, episodes: Episode, steps: int, lr: float | None,
    score_at: frozenset[int] | None = None, rule: InnerRule | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Query loss (and accuracy) per task after 0..steps SGD steps: arrays ``(steps+1, T)``.

    ``rule`` (:class:`~metafn.inner.InnerRule`; ``None``: SGD) is the fine-tuning step's update,
    e.g. the inner Adam a Reptile model was meta-trained with; its state starts afresh per task.

    ``score_at`` (a set of steps in ``0..steps``) scores the query set only after those steps;
    the other rows are NaN, and no step after the last scored one is taken. ``None``: every step.

    ``lr=None`` uses the rates learned with ``meta`` (:func:`metafn.experiment.learned_inner_rates`):
    Meta-SGD's per-parameter rates at every step, or LSLR's (mamlpp) per-tensor rates of step
    ``k`` for the ``k``-th step, the last learned step's beyond those learned.
    """
    if lr is None and learned_inner_rates(meta, 0) is None:
        raise ValueError("lr: None is only valid for meta-parameters with learned rates "
                         "(Meta-SGD or mamlpp)")
    _check_score_at(score_at, steps)
    losses = task_losses(exp)
    tasks = episodes.support_x.shape[0]
    params_t = tree_broadcast(model_params(meta), tasks)
    last = steps if score_at is None else max(score_at)
    use_rule = rule is not None and rule.name != "sgd"
    if use_rule:
        if lr is None:
            raise ValueError(f"rule: {rule.name} fine-tuning needs a rate lr, not learned rates")
        state = inner_init(rule, params_t)
        grad_fn = mx.grad(lambda p: mx.sum(losses.fn(p, episodes.support_x, episodes.support_y)))
    unscored = np.full(tasks, np.nan, dtype=np.float32)
    loss_rows, acc_rows = [], []
    for k in range(steps + 1):
        if k > last or (score_at is not None and k not in score_at):
            loss_rows.append(unscored)
            if exp.classification:
                acc_rows.append(unscored)
        else:
            loss, acc = _query_scores(exp, params_t, episodes)
            mx.eval(loss, acc) if acc is not None else mx.eval(loss)
            loss_rows.append(np.array(loss))
            if acc is not None:
                acc_rows.append(np.array(acc))
        if k < last:
            rate = learned_inner_rates(meta, k) if lr is None else lr
            if use_rule:
                params_t, state = inner_step(rule, params_t, grad_fn(params_t), state, rate)
                mx.eval(params_t, state)
                continue
            params_t = batched_adapt(
                losses, params_t, episodes.support_x, episodes.support_y, 1, rate, first_order=True
            )
            mx.eval(params_t)
    return np.stack(loss_rows), (np.stack(acc_rows) if acc_rows else None)


def protonet_scores(
    exp: Experiment, params: PyTree, episodes: Episode, soft_kmeans_steps: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-prototype query loss and accuracy per task, each ``(1, T)``; with
    ``soft_kmeans_steps > 0`` the prototypes are first refined on the task's queries
    (:func:`metafn.outer.soft_kmeans_logits`, transductive)."""
    if exp.embed is None or exp.n_way is None:
        raise ValueError("exp: ProtoNet evaluation needs a classification experiment with embed")
    sx, sy, qx, qy = episodes
    ns = sx.shape[1]
    emb = embed_tasks(exp.embed, params, mx.concatenate([sx, qx], axis=1))
    n_way = exp.n_way
    logits = mx.vmap(
        lambda s_emb, s_y, q_emb: soft_kmeans_logits(s_emb, s_y, q_emb, n_way, soft_kmeans_steps)
    )(emb[:, :ns], sy, emb[:, ns:])
    loss = mx.vmap(cross_entropy)(logits, qy)
    acc = mx.vmap(accuracy)(logits, qy)
    return np.array(loss)[None], np.array(acc)[None]


def curve_over_tasks(
    exp: Experiment,
    meta: PyTree,
    key: mx.array,
    split: str,
    n_tasks: int,
    steps: int,
    lr: float | None,
    chunk: int,
    scorer: str = "adapt",
    score_at: frozenset[int] | None = None,
    rule: InnerRule | None = None,
    soft_kmeans_steps: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Curves over ``n_tasks`` tasks of ``split`` sampled in chunks; arrays ``(S+1, n_tasks)``
    (``score_at``, ``rule``: as :func:`adaptation_curve`; ``scorer="protonet"`` scores nearest
    prototypes instead, ``(1, n_tasks)``, refined by ``soft_kmeans_steps``: :func:`protonet_scores`).

    The tasks depend only on ``key``, ``split`` and the chunking, so every method evaluated with
    the same arguments sees the same tasks (paired comparison).
    """
    split_key = fold_in(key, SPLIT_STREAMS[split])
    losses, accs = [], []
    for i, start in enumerate(range(0, n_tasks, chunk)):
        eps = exp.sample(fold_in(split_key, i), split, min(chunk, n_tasks - start))
        if scorer == "protonet":
            loss, acc = protonet_scores(exp, model_params(meta), eps, soft_kmeans_steps)
        else:
            loss, acc = adaptation_curve(exp, meta, eps, steps, lr, score_at, rule)
        losses.append(loss)
        if acc is not None:
            accs.append(acc)
    return np.concatenate(losses, axis=1), (np.concatenate(accs, axis=1) if accs else None)


def select_lr(
    val_curves: dict[float, tuple[np.ndarray, np.ndarray | None]],
    at_step: int,
    classification: bool,
) -> tuple[float, dict[str, float]]:
    """The rate whose validation curve is best after ``at_step`` steps.

    ``val_curves`` maps each candidate rate to its validation ``(loss, accuracy)`` curves
    ``(S+1, n_tasks)``. Best is the highest mean accuracy (classification) or the lowest mean
    loss (regression); a non-finite mean (a task diverged) ranks last. Returns the rate and
    every candidate's score at that step.
    """
    table: dict[str, float] = {}
    best, best_val = None, None
    for lr, (loss, acc) in val_curves.items():
        value = float(acc[at_step].mean()) if classification else float(loss[at_step].mean())
        if not math.isfinite(value):
            value = -math.inf if classification else math.inf
        table[repr(lr)] = value
        if best_val is None or (value > best_val if classification else value < best_val):
            best, best_val = lr, value
    if best is None:
        raise ValueError("val_curves: expected at least one candidate rate")
    return best, table


def summarize_curve(loss: np.ndarray, acc: np.ndarray | None,
                    score_at: frozenset[int] | None = None) -> dict[str, Any]:
    """Per-step mean and 95% CI half-width of a ``(S+1, n_tasks)`` curve, as JSON-ready lists.

    Steps outside ``score_at`` (the curve was not scored there) are ``None``; ``scored_steps``
    lists the others.
    """
    steps = range(loss.shape[0])
    scored = [k for k in steps if score_at is None or k in score_at]
    out: dict[str, Any] = {"n_tasks": int(loss.shape[1]), "scored_steps": scored}
    for name, rows in (("loss", loss), ("accuracy", acc)):
        if rows is None:
            continue
        stats = [mean_ci(rows[k]) if k in scored else (None, None) for k in steps]
        out[f"{name}_mean"] = [m for m, _ in stats]
        out[f"{name}_ci95"] = [c for _, c in stats]
    return out
