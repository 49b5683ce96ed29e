"""Experiment configuration: frozen dataclasses loaded from YAML with strict validation.

``load_config(path)`` parses YAML, rejects unknown keys (listing the valid ones), wrong types and
out-of-range values with a :class:`ConfigError` whose message starts with the dotted key
(``train.steps: expected an int >= 1, got 0``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ConfigError", "Config", "TaskConfig", "ModelConfig", "AlgorithmConfig", "TrainConfig",
    "EvalConfig", "load_config", "config_from_dict", "config_to_dict", "FAMILIES", "ALGORITHMS",
]

FAMILIES = ("sine", "linear2d", "xor", "circles", "spirals", "omniglot")
ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd", "mamlpp", "pooled", "protonet")
INNER_OPTIMIZERS = ("sgd", "adam")  # metafn.inner.INNER_OPTIMIZERS (config imports no mlx)


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _require(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


@dataclass(frozen=True)
class TaskConfig:
    """Which tasks to meta-learn: family, shots, queries, ways and family options.

    ``augment_rotation`` (degrees), ``augment_shift`` (pixels) and ``augment_scale`` (relative)
    give the ranges of a random affine transform applied to every meta-training image of
    Omniglot (:mod:`metafn.tasks.augment`); validation and test images are never augmented.
    ``train_on_val`` (Omniglot) meta-trains on the train and validation alphabets together: the
    final fit once hyperparameters are chosen on validation, whose scores then no longer come
    from held-out alphabets (evaluate ``last.safetensors``). ``train_alphabets`` /
    ``val_alphabets`` / ``test_alphabets`` (Omniglot) choose the split by alphabet name; a list
    left null is the default split's (:func:`metafn.tasks.omniglot.split_omniglot`), so
    ``metafn eval --set task.test_alphabets=[Balinese]`` scores one held-out alphabet.
    """

    family: str = "sine"
    k_shot: int = 5
    n_query: int = 10
    n_way: int | None = None
    noise: float = 0.1
    data_dir: str | None = None
    cache_dir: str | None = None
    image_size: int = 28
    rotations: bool = True
    within_alphabet: bool = False
    train_on_val: bool = False
    train_alphabets: tuple[str, ...] | None = None
    val_alphabets: tuple[str, ...] | None = None
    test_alphabets: tuple[str, ...] | None = None
    translation_range: tuple[float, ...] | None = None
    augment_rotation: float = 0.0
    augment_shift: float = 0.0
    augment_scale: float = 0.0

    def __post_init__(self) -> None:
        _require(self.family in FAMILIES, "task.family", f"one of {list(FAMILIES)}", self.family)
        _require(self.k_shot >= 1, "task.k_shot", "an int >= 1", self.k_shot)
        _require(self.n_query >= 1, "task.n_query", "an int >= 1", self.n_query)
        if self.family == "sine":
            _require(self.n_way in (None, 1), "task.n_way", "null for regression (sine)", self.n_way)
        else:
            _require(self.n_way is not None and self.n_way >= 2, "task.n_way", "an int >= 2", self.n_way)
        _require(math.isfinite(self.noise) and self.noise >= 0, "task.noise", "a finite float >= 0", self.noise)
        _require(self.image_size >= 8, "task.image_size", "an int >= 8", self.image_size)
        if self.translation_range is not None:
            t = self.translation_range
            _require(self.family in ("linear2d", "xor", "circles", "spirals"),
                     "task.translation_range", "null except for the 2D families", list(t))
            _require(len(t) == 2 and all(math.isfinite(v) for v in t) and t[0] <= t[1],
                     "task.translation_range", "a [low, high] pair of finite floats, low <= high",
                     list(t))
        for key in ("augment_rotation", "augment_shift", "augment_scale"):
            value = getattr(self, key)
            _require(math.isfinite(value) and value >= 0, f"task.{key}", "a finite float >= 0", value)
            _require(value == 0 or self.family == "omniglot", f"task.{key}",
                     "0 except for omniglot (image augmentation)", value)
        _require(not self.train_on_val or self.family == "omniglot", "task.train_on_val",
                 "false except for omniglot", self.train_on_val)
        for key in ("train_alphabets", "val_alphabets", "test_alphabets"):
            _require(getattr(self, key) is None or self.family == "omniglot", f"task.{key}",
                     "null except for omniglot", getattr(self, key))
        _require(self.augment_scale < 1, "task.augment_scale", "a float in [0, 1)", self.augment_scale)


@dataclass(frozen=True)
class ModelConfig:
    """Model shape: MLP hidden widths (toy families) or conv4 channels (Omniglot)."""

    hidden: tuple[int, ...] = (40, 40)
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    channels: int = 64

    def __post_init__(self) -> None:
        _require(len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden), "model.hidden",
                 "a non-empty list of positive ints", list(self.hidden))
        _require(self.channels >= 1, "model.channels", "an int >= 1", self.channels)


@dataclass(frozen=True)
class AlgorithmConfig:
    """The meta-learning algorithm and its inner loop.

    ``multi_step_loss`` (maml, fomaml, mamlpp): average the query loss after every inner step
    (MAML++, Antoniou et al. 2019) instead of using only the last; ``step_weights`` gives the
    weights explicitly (one per inner step).

    ``mamlpp`` is MAML with MAML++'s per-layer per-step learned inner rates (LSLR): one rate per
    parameter tensor and inner step, all starting at ``inner_lr``, meta-learned with the
    initialization (:func:`metafn.outer.lslr_outer`); it needs ``inner_steps >= 1``. Combine it
    with ``multi_step_loss`` for MAML++'s multi-step loss. ``first_order`` (mamlpp only) drops
    the second-order term as FOMAML does (``name: fomaml`` is first-order plain MAML).

    ``inner_batches`` (reptile only): deal each task's support + query examples into this many
    interleaved minibatches, one per inner step in turn (:func:`metafn.outer.reptile_grad`);
    1 is full-batch.

    ``inner_optimizer`` (reptile only): the inner loop's update, ``sgd`` (``theta - inner_lr *
    g``) or ``adam`` (Adam with ``inner_beta1``, ``inner_beta2``, ``inner_eps``, a fresh state
    for every task; :func:`metafn.inner.inner_step`), as in Nichol et al. 2018 (Adam, beta1 = 0,
    rate 1e-3). Validation during training and fine-tuning at evaluation use the same rule.
    """

    name: str = "maml"
    inner_lr: float = 0.01
    inner_steps: int = 1
    multi_step_loss: bool = False
    step_weights: tuple[float, ...] | None = None
    first_order: bool = False
    inner_batches: int = 1
    inner_optimizer: str = "sgd"
    inner_beta1: float = 0.9
    inner_beta2: float = 0.999
    inner_eps: float = 1e-8

    def __post_init__(self) -> None:
        _require(self.name in ALGORITHMS, "algorithm.name", f"one of {list(ALGORITHMS)}", self.name)
        _require(math.isfinite(self.inner_lr) and self.inner_lr > 0, "algorithm.inner_lr",
                 "a finite float > 0", self.inner_lr)
        _require(self.inner_steps >= 0, "algorithm.inner_steps", "an int >= 0", self.inner_steps)
        if self.name == "mamlpp":
            _require(self.inner_steps >= 1, "algorithm.inner_steps",
                     "an int >= 1 for mamlpp (it learns one rate per inner step)", self.inner_steps)
        _require(not self.first_order or self.name == "mamlpp", "algorithm.first_order",
                 f"false for {self.name} (only mamlpp reads it; name: fomaml is first-order MAML)",
                 self.first_order)
        _require(self.inner_batches >= 1, "algorithm.inner_batches", "an int >= 1", self.inner_batches)
        _require(self.inner_batches == 1 or self.name == "reptile", "algorithm.inner_batches",
                 f"1 for {self.name} (only reptile reads it)", self.inner_batches)
        _require(self.inner_optimizer in INNER_OPTIMIZERS, "algorithm.inner_optimizer",
                 f"one of {list(INNER_OPTIMIZERS)}", self.inner_optimizer)
        _require(self.inner_optimizer == "sgd" or self.name == "reptile", "algorithm.inner_optimizer",
                 f"sgd for {self.name} (only reptile has another inner rule)", self.inner_optimizer)
        for key in ("inner_beta1", "inner_beta2"):
            value = getattr(self, key)
            _require(0.0 <= value < 1.0, f"algorithm.{key}", "a float in [0, 1)", value)
        _require(math.isfinite(self.inner_eps) and self.inner_eps > 0, "algorithm.inner_eps",
                 "a finite float > 0", self.inner_eps)
        if self.inner_optimizer != "adam":
            for key, default in (("inner_beta1", 0.9), ("inner_beta2", 0.999), ("inner_eps", 1e-8)):
                _require(getattr(self, key) == default, f"algorithm.{key}",
                         f"its default {default} unless inner_optimizer is adam (only adam reads it)",
                         getattr(self, key))
        if self.step_weights is not None:
            _require(len(self.step_weights) == self.inner_steps and all(w >= 0 for w in self.step_weights)
                     and sum(self.step_weights) > 0, "algorithm.step_weights",
                     f"null or {self.inner_steps} non-negative weights (one per inner step)",
                     list(self.step_weights))


@dataclass(frozen=True)
class TrainConfig:
    """The outer loop: meta-batch, optimizer, schedule, and how often to evaluate and save.

    ``val_n_way`` (protonet only): the number of ways of the validation episodes scored during
    training (null: the training episodes' ``task.n_way``), so that e.g. a ProtoNet trained on
    60-way episodes is validated, and its best checkpoint chosen, on 20-way ones like a run
    trained 20-way. A method with a classification head is validated at its own ``n_way``.
    """

    steps: int = 10000
    meta_batch_size: int = 25
    optimizer: Literal["adam", "sgd"] = "adam"
    outer_lr: float = 1e-3
    schedule: Literal["constant", "cosine"] = "constant"
    clip_norm: float | None = None
    compile: bool = True
    log_interval: int = 100
    eval_interval: int = 1000
    save_interval: int = 1000
    val_tasks: int = 200
    val_n_way: int | None = None

    def __post_init__(self) -> None:
        for key in ("steps", "meta_batch_size", "log_interval", "eval_interval", "save_interval", "val_tasks"):
            value = getattr(self, key)
            _require(value >= 1, f"train.{key}", "an int >= 1", value)
        if self.val_n_way is not None:
            _require(self.val_n_way >= 2, "train.val_n_way", "null or an int >= 2", self.val_n_way)
        _require(math.isfinite(self.outer_lr) and self.outer_lr > 0, "train.outer_lr",
                 "a finite float > 0", self.outer_lr)
        if self.clip_norm is not None:
            _require(math.isfinite(self.clip_norm) and self.clip_norm > 0, "train.clip_norm",
                     "null or a finite float > 0", self.clip_norm)


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: adaptation curves over ``n_tasks`` test tasks with baselines.

    Curves run to ``steps`` fine-tuning steps. For each adaptation budget in ``budgets``
    (default: ``[steps]``) every method's fine-tuning rate is chosen on ``select_tasks``
    validation tasks by its score after that many steps, and the test figure after that many
    steps is reported at that rate. ``n_way``, ``k_shot``, ``n_query``, ``within_alphabet`` (when set) change
    the test and validation episodes from the training ones (e.g. ProtoNets trained 20-way,
    tested 5-way); a method with a classification head is only evaluated at its own ``n_way``.

    The pooled pre-training baseline trains for ``pooled_steps`` steps (default
    ``train.steps``). On Omniglot it is supervised cross-entropy over all meta-train classes
    under global labels, ``pooled_batch_size`` images a step (default: as many images as a
    meta-training step sees, ``train.meta_batch_size * n_way * (k_shot + n_query)``); the toy
    families train on meta-batches of episodes and take no batch size.

    ``full_curves``: score the test query sets after every fine-tuning step ``0..steps`` (the
    ``curves`` of the results); by default only after step 0 and each budget, the figures the
    results report (the rate search on validation tasks scores only the budgets either way).

    ``soft_kmeans_steps`` (protonet only): when > 0, the results also hold
    ``protonet_soft_kmeans``, the same model on the same test episodes with its prototypes
    refined by that many soft k-means steps on each episode's queries
    (:func:`metafn.outer.soft_kmeans_logits`; transductive).
    """

    n_tasks: int = 1000
    steps: int = 10
    budgets: tuple[int, ...] | None = None
    finetune_lrs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1)
    select_tasks: int = 200
    baselines: bool = True
    pooled_steps: int | None = None
    pooled_batch_size: int | None = None
    chunk: int = 100
    n_way: int | None = None
    k_shot: int | None = None
    n_query: int | None = None
    within_alphabet: bool | None = None
    full_curves: bool = False
    soft_kmeans_steps: int = 0

    def __post_init__(self) -> None:
        _require(self.n_tasks >= 1, "eval.n_tasks", "an int >= 1", self.n_tasks)
        _require(self.steps >= 0, "eval.steps", "an int >= 0", self.steps)
        if self.budgets is not None:
            _require(len(self.budgets) >= 1 and all(0 <= b <= self.steps for b in self.budgets),
                     "eval.budgets", f"null or a list of ints in [0, eval.steps={self.steps}]",
                     list(self.budgets))
        _require(len(self.finetune_lrs) >= 1 and all(math.isfinite(x) and x > 0 for x in self.finetune_lrs),
                 "eval.finetune_lrs", "a non-empty list of finite floats > 0", list(self.finetune_lrs))
        _require(self.select_tasks >= 1, "eval.select_tasks", "an int >= 1", self.select_tasks)
        _require(self.chunk >= 1, "eval.chunk", "an int >= 1", self.chunk)
        for key, low in (("n_way", 2), ("k_shot", 1), ("n_query", 1)):
            value = getattr(self, key)
            if value is not None:
                _require(value >= low, f"eval.{key}", f"null or an int >= {low}", value)
        if self.pooled_steps is not None:
            _require(self.pooled_steps >= 1, "eval.pooled_steps", "null or an int >= 1", self.pooled_steps)
        if self.pooled_batch_size is not None:
            _require(self.pooled_batch_size >= 1, "eval.pooled_batch_size", "null or an int >= 1",
                     self.pooled_batch_size)
        _require(self.soft_kmeans_steps >= 0, "eval.soft_kmeans_steps", "an int >= 0", self.soft_kmeans_steps)


@dataclass(frozen=True)
class Config:
    """A whole experiment."""

    name: str = "experiment"
    seed: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _require(0 <= self.seed < 2**32, "seed", "an int in [0, 2**32)", self.seed)
        if self.algorithm.name == "protonet":
            _require(self.task.n_way is not None, "algorithm.name",
                     "a classification family for protonet", self.task.family)
        if self.train.val_n_way is not None:
            _require(self.algorithm.name == "protonet", "train.val_n_way",
                     f"null for {self.algorithm.name} (its classification head has task.n_way "
                     f"outputs; only protonet can be validated at another number of ways)",
                     self.train.val_n_way)
        if self.eval.soft_kmeans_steps:
            _require(self.algorithm.name == "protonet", "eval.soft_kmeans_steps",
                     f"0 for {self.algorithm.name} (prototype refinement needs protonet)",
                     self.eval.soft_kmeans_steps)
        if self.eval.pooled_batch_size is not None:
            _require(self.task.family == "omniglot", "eval.pooled_batch_size",
                     "null except for task.family omniglot (the toy families' pooled baseline "
                     "trains on meta-batches of episodes)", self.eval.pooled_batch_size)


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (lists -> tuples)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _check_type(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        names = " or ".join(_type_name(o) for o in typing.get_args(tp))
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if tp is type(None):
        _require(value is None, key, "null", value)
        return None
    if origin is Literal:
        _require(value in typing.get_args(tp), key, f"one of {list(typing.get_args(tp))}", value)
        return value
    if origin is tuple:
        _require(isinstance(value, (list, tuple)), key, "a list", value)
        (item_tp, _) = typing.get_args(tp)
        return tuple(_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        _require(isinstance(value, bool), key, "true or false", value)
        return value
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, "an int", value)
        return value
    if tp is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value)
        return float(value)
    if tp is str:
        _require(isinstance(value, str), key, "a string", value)
        return value
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    raise ConfigError(f"{key}: unsupported annotation {tp}")  # pragma: no cover


def _type_name(tp: Any) -> str:
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{key}: unknown key; valid keys in {where}: {names}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check_type(value, hints[name], key)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from plain data (as parsed from YAML)."""
    return _from_dict(Config, data, "")


def load_config(path: str | Path) -> Config:
    """Load and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: no such file {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {exc}") from exc
    return config_from_dict(data)


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain, YAML/JSON-serializable data for ``config`` (tuples become lists)."""

    def plain(x: Any) -> Any:
        if isinstance(x, (tuple, list)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(config))
