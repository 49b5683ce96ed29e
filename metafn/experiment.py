"""From a :class:`~metafn.config.Config` to the pure functions a run needs.

An :class:`Experiment` bundles a model (``init_params``, a task-batched ``predict_t``), a loss
kind, and a task sampler. :func:`meta_gradient` turns it and an algorithm config into the pure
``(meta, episodes) -> (loss, grads)`` that the trainer differentiates; :func:`init_meta` gives the
meta-parameters (the initialization, plus inner rates for Meta-SGD).
"""


from pathlib import Path
from typing import Callable, NamedTuple

import mlx.core as mx

from metafn.config import AlgorithmConfig, Config
from metafn.losses import cross_entropy, mse
from metafn.nn.mlp import mlp_apply, mlp_init
from metafn.outer import (
    BatchedLoss, MetaSGDParams, maml_outer, metasgd_init, metasgd_outer, protonet_outer,
    reptile_grad, task_batched,
)
from metafn.tasks.episode import Episode
from metafn.tree import PyTree

__all__ = ["Experiment", "build_experiment", "task_losses", "init_meta", "meta_gradient",
           "model_params"]

Sampler = Callable[[mx.array, str, int], Episode]


class Experiment(NamedTuple):
    """The model, loss and tasks of a run, as pure functions.

    init_params(key) -> params; predict_t(params_T, X_T) -> outputs ``(T, n, d_out)`` for params
    with a leading task axis; sample(key, split, n_tasks) -> Episode batch; embed(params, x)
    -> ``(n, D)`` features (ProtoNets); n_way is None for regression.
    """

    init_params: Callable[[mx.array], PyTree]
    predict_t: Callable[[PyTree, mx.array], mx.array]
    sample: Sampler
    embed: Callable[[PyTree, mx.array], mx.array] | None
    n_way: int | None

    @property
    def classification(self) -> bool:
        return self.n_way is not None


def task_losses(exp: Experiment) -> BatchedLoss:
    """Per-task losses ``(params_T, X_T, Y_T) -> (T,)``: MSE (regression) or cross-entropy."""
    if exp.classification:
        return task_batched(
            lambda p, x, y: mx.vmap(cross_entropy)(exp.predict_t(p, x), y)
        )
    return task_batched(lambda p, x, y: mx.vmap(mse)(exp.predict_t(p, x), y))


def _toy_experiment(config: Config) -> Experiment:
    from metafn.tasks.sampling import family_from_name, sample_episodes

    task = config.task
    family = family_from_name(task.family) if task.family == "sine" else family_from_name(
        task.family, noise=task.noise
    )
    d_in, d_out = (1, 1) if task.family == "sine" else (2, task.n_way)
    sizes = [d_in, *config.model.hidden, d_out]
    activation = config.model.activation

    def sample(key: mx.array, split: str, n_tasks: int) -> Episode:
        return sample_episodes(
            key, family, n_tasks, task.k_shot, task.n_query, n_way=task.n_way, split=split
        )

    def apply(params: PyTree, x: mx.array) -> mx.array:
        return mlp_apply(params, x, activation)

    def embed(params: PyTree, x: mx.array) -> mx.array:
        return mlp_apply(params, x, activation)

    return Experiment(
        init_params=lambda key: mlp_init(key, sizes),
        predict_t=mx.vmap(apply, in_axes=(0, 0)),
        sample=sample,
        embed=embed,
        n_way=task.n_way,
    )


def _omniglot_experiment(config: Config) -> Experiment:
    from metafn.nn.conv4 import conv4_embed, conv4_init, conv4_task_logits
    from metafn.tasks.omniglot import load_omniglot, sample_omniglot_episodes, split_omniglot

    task = config.task
    cache = task.cache_dir or str(Path.home() / ".cache" / "metafn")
    data = load_omniglot(task.data_dir, cache_dir=cache, image_size=task.image_size)
    splits = split_omniglot(data, rotations=task.rotations)._asdict()
    n_way = task.n_way

    def sample(key: mx.array, split: str, n_tasks: int) -> Episode:
        if split not in splits:
            raise ValueError(f"split: expected one of {sorted(splits)}, got {split!r}")
        return sample_omniglot_episodes(key, splits[split], n_tasks, n_way, task.k_shot,
                                        task.n_query, within_alphabet=task.within_alphabet)

    return Experiment(
        init_params=lambda key: conv4_init(key, n_way, hidden=config.model.channels,
                                           image_size=task.image_size),
        predict_t=conv4_task_logits,
        sample=sample,
        embed=conv4_embed,
        n_way=n_way,
    )


def build_experiment(config: Config) -> Experiment:
    """The :class:`Experiment` for ``config.task.family`` (toy 2D/sine MLPs, Omniglot conv4)."""
    if config.task.family == "omniglot":
        return _omniglot_experiment(config)
    return _toy_experiment(config)


def init_meta(exp: Experiment, algorithm: AlgorithmConfig, key: mx.array) -> PyTree:
    """Meta-parameters: the model's initialization, with per-parameter inner rates for Meta-SGD."""
    params = exp.init_params(key)
    if algorithm.name == "metasgd":
        return metasgd_init(params, algorithm.inner_lr)
    return params


def model_params(meta: PyTree) -> PyTree:
    """The model parameters inside meta-parameters (drops Meta-SGD's rates)."""
    return meta.params if isinstance(meta, MetaSGDParams) else meta


def meta_gradient(
    exp: Experiment, algorithm: AlgorithmConfig
) -> Callable[[PyTree, Episode], tuple[mx.array, PyTree]]:
    """The pure ``(meta, episodes) -> (meta_loss, meta_grads)`` of ``algorithm.name``.

    maml (second order), fomaml, reptile (pseudo-gradient theta - mean adapted), metasgd,
    pooled (the query loss at theta itself: pre-training on all tasks pooled), protonet.
    """
    losses = task_losses(exp)
    name, lr, steps = algorithm.name, algorithm.inner_lr, algorithm.inner_steps
    weights = algorithm.step_weights
    if weights is None and algorithm.multi_step_loss and steps > 0:
        weights = (1.0,) * steps
    if name == "maml":
        return lambda meta, eps: maml_outer(losses, meta, eps, lr, steps, step_weights=weights)
    if name == "fomaml":
        return lambda meta, eps: maml_outer(losses, meta, eps, lr, steps, True, weights)
    if name == "reptile":
        return lambda meta, eps: reptile_grad(losses, meta, eps, lr, steps)
    if name == "metasgd":
        return lambda meta, eps: metasgd_outer(losses, meta, eps, steps)
    if name == "pooled":
        return lambda meta, eps: maml_outer(losses, meta, eps, lr, 0)
    if name == "protonet":
        if exp.embed is None or exp.n_way is None:
            raise ValueError("algorithm.name: protonet needs a classification family with an embedding")
        n_way = exp.n_way

        def proto(meta: PyTree, eps: Episode) -> tuple[mx.array, PyTree]:
            loss, grads, _ = protonet_outer(exp.embed, meta, eps, n_way)
            return loss, grads

        return proto
    raise ValueError(f"algorithm.name: unknown algorithm {name!r}")
