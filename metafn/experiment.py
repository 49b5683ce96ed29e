"""From a :class:`~metafn.config.Config` to the pure functions a run needs.

An :class:`Experiment` bundles a model (``init_params``, a task-batched ``predict_t``), a loss
kind, and a task sampler. :func:`meta_gradient` turns it and an algorithm config into the pure
``(meta, episodes) -> (loss, grads)`` that the trainer differentiates; :func:`init_meta` gives the
meta-parameters (the initialization, plus inner rates for Meta-SGD and MAML++'s LSLR).

A :class:`PooledTask` is the pooled pre-training baseline of Omniglot: ordinary supervised
cross-entropy of conv4 over all meta-train classes under global labels
(:func:`build_pooled_task`, :func:`pooled_update`); :func:`with_zero_head` then swaps its
``n_classes``-way head for a fresh N-way one before fine-tuning on test episodes.
"""

from pathlib import Path
from typing import Any, Callable, NamedTuple

import mlx.core as mx

from metafn.config import AlgorithmConfig, Config
from metafn.inner import InnerRule
from metafn.losses import cross_entropy, mse
from metafn.nn.mlp import mlp_apply, mlp_init
from metafn.optim import GradientTransformation, apply_updates
from metafn.outer import (
    BatchedLoss, LSLRParams, MetaSGDParams, lslr_init, lslr_outer, lslr_rates, maml_outer,
    metasgd_init, metasgd_outer, protonet_outer, reptile_grad, task_batched,
)
from metafn.tasks.episode import Episode
from metafn.tree import PyTree

__all__ = ["Experiment", "build_experiment", "task_losses", "init_meta", "meta_gradient",
           "model_params", "learned_inner_rates", "LEARNED_RATE_ALGORITHMS", "PooledTask",
           "build_pooled_task", "pooled_update", "with_zero_head", "with_n_way_head", "inner_rule"]

LEARNED_RATE_ALGORITHMS = ("metasgd", "mamlpp")
"""Algorithms whose meta-parameters carry their own inner rates (used again at evaluation)."""

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
    options: dict[str, object] = {} if task.family == "sine" else {"noise": task.noise}
    if task.translation_range is not None:
        options["translation_range"] = tuple(task.translation_range)
    family = family_from_name(task.family, **options)
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


def _omniglot_splits(config: Config) -> dict[str, Any]:
    """``{"train", "val", "test"}`` -> :class:`~metafn.tasks.omniglot.OmniglotData` of ``config.task``."""
    from metafn.tasks.omniglot import load_omniglot, split_omniglot

    task = config.task
    cache = task.cache_dir or str(Path.home() / ".cache" / "metafn")
    data = load_omniglot(task.data_dir, cache_dir=cache, image_size=task.image_size)
    return split_omniglot(data, task.train_alphabets, task.val_alphabets, task.test_alphabets,
                          rotations=task.rotations, train_on_val=task.train_on_val)._asdict()


def _omniglot_augment(config: Config) -> Any:
    """The meta-training split's :class:`~metafn.tasks.augment.Augment` of ``config.task``."""
    from metafn.tasks.augment import Augment

    task = config.task
    return Augment(task.augment_rotation, task.augment_shift, task.augment_scale)


def _omniglot_experiment(config: Config) -> Experiment:
    from metafn.nn.conv4 import conv4_embed, conv4_init, conv4_task_logits
    from metafn.tasks.omniglot import sample_omniglot_episodes

    task = config.task
    splits = _omniglot_splits(config)
    n_way = task.n_way
    augment = _omniglot_augment(config)

    def sample(key: mx.array, split: str, n_tasks: int) -> Episode:
        if split not in splits:
            raise ValueError(f"split: expected one of {sorted(splits)}, got {split!r}")
        return sample_omniglot_episodes(key, splits[split], n_tasks, n_way, task.k_shot,
                                        task.n_query, within_alphabet=task.within_alphabet,
                                        augment=augment if split == "train" else None)

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
    """Meta-parameters: the model's initialization, with per-parameter inner rates for Meta-SGD
    (:class:`MetaSGDParams`) and per-tensor per-step rates for mamlpp (:class:`LSLRParams`),
    all starting at ``algorithm.inner_lr``."""
    params = exp.init_params(key)
    if algorithm.name == "metasgd":
        return metasgd_init(params, algorithm.inner_lr)
    if algorithm.name == "mamlpp":
        return lslr_init(params, algorithm.inner_lr, algorithm.inner_steps)
    return params


def model_params(meta: PyTree) -> PyTree:
    """The model parameters inside meta-parameters (drops Meta-SGD's or LSLR's rates)."""
    return meta.params if isinstance(meta, (MetaSGDParams, LSLRParams)) else meta


def learned_inner_rates(meta: PyTree, step: int) -> PyTree | None:
    """The rates meta-parameters carry for fine-tuning step ``step`` (0-based), or None.

    Meta-SGD: its per-parameter rate tree, the same at every step. LSLR (mamlpp): the per-tensor
    scalar rates of that inner step; steps beyond the ``S`` learned ones use the last step's
    rates (:func:`metafn.outer.lslr_rates`). Plain parameters carry no rates: None.
    """
    if isinstance(meta, MetaSGDParams):
        return meta.lr
    if isinstance(meta, LSLRParams):
        return lslr_rates(meta, step)
    return None


def inner_rule(algorithm: AlgorithmConfig) -> InnerRule:
    """The inner loop's update rule of ``algorithm`` (``inner_optimizer`` and Adam's constants),
    used in meta-training, in validation during training and in fine-tuning at evaluation."""
    return InnerRule(algorithm.inner_optimizer, algorithm.inner_beta1, algorithm.inner_beta2,
                     algorithm.inner_eps)


def step_loss_weights(algorithm: AlgorithmConfig) -> tuple[float, ...] | None:
    """Weights ``w_1..w_S`` of the query loss after each inner step in the meta-objective
    (``step_weights``, or uniform with ``multi_step_loss``); ``None``: only the last step counts."""
    if algorithm.step_weights is None and algorithm.multi_step_loss and algorithm.inner_steps > 0:
        return (1.0,) * algorithm.inner_steps
    return algorithm.step_weights


def meta_gradient(
    exp: Experiment, algorithm: AlgorithmConfig
) -> Callable[[PyTree, Episode], tuple[mx.array, PyTree]]:
    """The pure ``(meta, episodes) -> (meta_loss, meta_grads)`` of ``algorithm.name``.

    maml (second order), fomaml, reptile (pseudo-gradient theta - mean adapted), metasgd,
    mamlpp (MAML with LSLR rates; second order unless ``algorithm.first_order``), pooled (the
    query loss at theta itself: pre-training on all tasks pooled), protonet. ``multi_step_loss``
    / ``step_weights`` apply to maml, fomaml and mamlpp.
    """
    losses = task_losses(exp)
    name, lr, steps = algorithm.name, algorithm.inner_lr, algorithm.inner_steps
    weights = step_loss_weights(algorithm)
    if name == "maml":
        return lambda meta, eps: maml_outer(losses, meta, eps, lr, steps, step_weights=weights)
    if name == "fomaml":
        return lambda meta, eps: maml_outer(losses, meta, eps, lr, steps, True, weights)
    if name == "reptile":
        batches, rule = algorithm.inner_batches, inner_rule(algorithm)
        return lambda meta, eps: reptile_grad(losses, meta, eps, lr, steps, batches, rule)
    if name == "metasgd":
        return lambda meta, eps: metasgd_outer(losses, meta, eps, steps)
    if name == "mamlpp":
        first_order = algorithm.first_order
        return lambda meta, eps: lslr_outer(losses, meta, eps, first_order, weights)
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


# ----------------------------------------------------------------------------- pooled baseline


class PooledTask(NamedTuple):
    """Supervised pre-training on all meta-train classes pooled (Omniglot's pooled baseline).

    init_params(key) -> conv4 parameters with an ``n_classes``-way head; sample(key) -> images
    ``x (B, H, W, 1)`` and global labels ``y (B,)`` drawn from the meta-train split and
    augmented as meta-training is (``task.augment_*``;
    :func:`metafn.tasks.omniglot.sample_omniglot_batch`); loss(params, x, y) -> the mean
    cross-entropy ``(1/B) sum_i -log softmax(conv4(x_i))_{y_i}`` (batch norm with the
    statistics of the batch, as in every other use of conv4).
    """

    init_params: Callable[[mx.array], PyTree]
    sample: Callable[[mx.array], tuple[mx.array, mx.array]]
    loss: Callable[[PyTree, mx.array, mx.array], mx.array]
    n_classes: int
    batch_size: int


def build_pooled_task(config: Config) -> PooledTask:
    """The :class:`PooledTask` of an Omniglot ``config``: conv4 with ``model.channels`` channels
    over the meta-train split's classes (characters x 4 rotations with ``task.rotations``),
    ``eval.pooled_batch_size`` images a step, by default as many as one meta-training step
    sees: ``train.meta_batch_size * n_way * (k_shot + n_query)``."""
    from metafn.nn.conv4 import conv4_init, conv4_loss
    from metafn.tasks.omniglot import sample_omniglot_batch

    if config.task.family != "omniglot":
        raise ValueError(f"config.task.family: pooled pre-training over global classes needs "
                         f"omniglot, got {config.task.family!r}")
    train_split = _omniglot_splits(config)["train"]
    n_classes = train_split.n_classes
    task = config.task
    batch = config.eval.pooled_batch_size or (
        config.train.meta_batch_size * task.n_way * (task.k_shot + task.n_query))
    channels, size = config.model.channels, task.image_size
    if batch > n_classes * train_split.n_drawings:
        raise ValueError(f"eval.pooled_batch_size: {batch} exceeds the {n_classes * train_split.n_drawings} "
                         f"images of the meta-train split; set a smaller eval.pooled_batch_size")
    return PooledTask(
        init_params=lambda key: conv4_init(key, n_classes, hidden=channels, image_size=size),
        sample=lambda key: sample_omniglot_batch(key, train_split, batch, _omniglot_augment(config)),
        loss=conv4_loss,
        n_classes=n_classes,
        batch_size=batch,
    )


def pooled_update(
    loss: Callable[[PyTree, mx.array, mx.array], mx.array], optimizer: GradientTransformation
) -> Callable[[PyTree, PyTree, mx.array, mx.array], tuple[PyTree, PyTree, mx.array]]:
    """The pure pre-training step ``(params, opt_state, x, y) -> (params, opt_state, loss)``:
    ``g = grad loss(params, x, y)``, then one ``optimizer`` update; ``loss`` is the value
    before the update."""
    value_and_grad = mx.value_and_grad(loss)

    def update(
        params: PyTree, opt_state: PyTree, x: mx.array, y: mx.array
    ) -> tuple[PyTree, PyTree, mx.array]:
        value, grads = value_and_grad(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return apply_updates(params, updates), opt_state, value

    return update


def with_zero_head(params: PyTree, n_way: int) -> PyTree:
    """conv4 ``params`` with the linear head replaced by a zero ``n_way``-way head (body kept).

    ``{"blocks": ..., "head": {"w": (D, C), "b": (C,)}} -> {"blocks": ..., "head": {"w": 0 (D,
    n_way), "b": 0 (n_way,)}}``. With a zero head every class has the same logit, so accuracy
    before fine-tuning is chance, and on a balanced support set (``K`` of each of the ``N``
    classes) the first SGD step of rate ``lr`` gives exactly ``b = 0`` and column ``c`` of ``w``
    ``= (lr / N) (mu_c - mu)``, ``mu_c`` the mean feature of class ``c`` and ``mu`` of all
    support images: a linear classifier along the class-mean directions, with no random head
    adding noise to the comparison.
    """
    if not isinstance(params, dict) or not isinstance(params.get("head"), dict) or "w" not in params["head"]:
        raise ValueError("params: expected conv4 parameters with a linear head {'head': {'w', 'b'}}")
    if isinstance(n_way, bool) or not isinstance(n_way, int) or n_way < 1:
        raise ValueError(f"n_way: expected an int >= 1, got {n_way!r}")
    w = params["head"]["w"]
    head = {"w": mx.zeros((w.shape[0], n_way), dtype=w.dtype),
            "b": mx.zeros((n_way,), dtype=params["head"]["b"].dtype)}
    return {**params, "head": head}


def with_n_way_head(meta: PyTree, n_way: int) -> PyTree:
    """Meta-parameters of any conv4 algorithm re-headed for ``n_way``-way episodes.

    The initialization's head becomes a zero ``n_way``-way head (:func:`with_zero_head`), so a
    model meta-trained on 5-way tasks can be fine-tuned and scored on 20-way ones (the "zero
    trick" of Kao et al. 2022 for MAML's head). Learned inner rates follow the head:

    - Meta-SGD (:class:`MetaSGDParams`): the head's per-parameter rates ``(D, C)`` and ``(C,)``
      are replaced by their mean over the ``C`` trained classes, broadcast to ``(D, n_way)`` and
      ``(n_way,)``. Class labels are a random permutation in every episode, so the ``C`` columns
      are exchangeable and their mean is the class-symmetric rate;
    - mamlpp (:class:`LSLRParams`): rates are per tensor, ``(S,)`` each, and are kept.
    """
    if isinstance(meta, MetaSGDParams):
        lr_head = meta.lr["head"] if isinstance(meta.lr, dict) else None
        if not isinstance(lr_head, dict) or "w" not in lr_head or "b" not in lr_head:
            raise ValueError("meta: expected Meta-SGD rates with a conv4 head {'head': {'w', 'b'}}")
        params = with_zero_head(meta.params, n_way)  # checks n_way before it shapes the rates
        w, b = lr_head["w"], lr_head["b"]
        head_lr = {"w": mx.broadcast_to(mx.mean(w, axis=-1, keepdims=True), (w.shape[0], n_way)),
                   "b": mx.broadcast_to(mx.mean(b, keepdims=True), (n_way,))}
        return MetaSGDParams(params, {**meta.lr, "head": head_lr})
    if isinstance(meta, LSLRParams):
        return LSLRParams(with_zero_head(meta.params, n_way), meta.lr)
    return with_zero_head(meta, n_way)
