"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as pure functions,
and the target-selection core every PEFT method here shares.

Works with any model whose parameters are a pytree (nested dicts / lists) in which a *dense
module* is a dict holding a weight ``"w"`` of ndim >= 2 (and usually a bias ``"b"``):

- ``w (d_in, d_out)``: a dense layer (:mod:`metafn.nn.mlp`, the BERT encoder);
- ``w (C_out, *kernel, C_in)``: an MLX convolution, viewed as the matrix
  ``(prod(kernel) * C_in, C_out)``, i.e. ``W_mat = w.reshape(C_out, -1).T``.

A module's *name* is its dotted path, e.g. ``encoder.layer.0.attention.self.query`` or ``1`` for
the second layer of an MLP. ``target_modules`` selects modules as in Hugging Face peft: a tuple
of names matches a module whose path equals a name or ends with ``"." + name``; a single
string is a regular expression that must match the whole path (``re.fullmatch``);
``"all-linear"`` selects every dense module.

For each target the adapter holds ``A (d_in, r)`` and ``B (r, d_out)`` and the effective weight is

    W' = W + s * A @ B,     s = alpha / r   (alpha / sqrt(r) with ``rslora=True``)

(reshaped back to the weight's layout for convolutions). ``B = 0`` at init, so the adapted
model starts as the base model; ``A`` is kaiming-uniform (``U(-1/sqrt(d_in), 1/sqrt(d_in))``,
PyTorch's ``kaiming_uniform_(a=sqrt(5))`` as in peft) or gaussian ``N(0, 1/r^2)``.
Trainable parameters per target: ``r (d_in + d_out)``.

An adapter is a flat dict ``{module_name: {"a": A, "b": B}}`` (a pytree of arrays: give it to
``mx.grad``, an optimizer, :func:`metafn.peft.io.save_adapter`); its dotted keys are module
names, so do not ``tree_unflatten`` its flattened form. Differentiate the loss with respect
to the adapter only, with the base parameters as a constant argument.

Dropout (rate ``p``, only when a ``key`` is passed): on the unmerged path it is the usual
inverted dropout on the branch input, ``s * (drop(x) A) B``. On the merged path (any model)
the same mask must be shared by every example of the call, so it drops input features of
the branch: ``A <- diag(m) A / (1 - p)``, ``m_i ~ Bernoulli(1 - p)``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import mlx.core as mx

from metafn.tree import PyTree, tree_count

__all__ = [
    "LoraConfig", "Adapter", "DenseInfo", "dense_modules", "match_targets", "select_targets",
    "map_modules", "lora_init", "lora_delta", "lora_merge", "lora_inject", "lora_apply",
    "lora_num_params", "as_matrix_shape", "delta_to_weight", "dropout_rows",
]

Adapter = dict[str, Any]


@dataclass(frozen=True)
class LoraConfig:
    """LoRA hyperparameters, named as in Hugging Face peft's ``LoraConfig``.

    r: rank (>= 1, at most ``min(d_in, d_out)`` of every target).
    alpha: scaling numerator; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with
      ``rslora``).
    dropout: dropout rate on the low-rank branch input, in ``[0, 1)``; applied only when a
      PRNG key is passed to apply/merge.
    target_modules: tuple of module names (suffix match), a regex string (full match), or
      ``"all-linear"``. A list is accepted and stored as a tuple.
    init: ``"kaiming"`` (A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))) or ``"gaussian"`` (A ~ N(0, 1/r^2));
      B is always 0.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = ("query", "value")
    init: str = "kaiming"
    rslora: bool = False

    def __post_init__(self) -> None:
        _check_rank(self.r, "r")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
            math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise ValueError(f"alpha: expected a positive finite number, got {self.alpha!r}")
        _check_dropout(self.dropout)
        object.__setattr__(self, "target_modules", _norm_targets(self.target_modules))
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"init: expected 'kaiming' or 'gaussian', got {self.init!r}")

    @property
    def scale(self) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with ``rslora``)."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def _check_rank(r: Any, name: str) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{name}: expected a positive int rank, got {r!r}")


def _check_dropout(p: Any) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: expected a rate in [0, 1), got {p!r}")


def _norm_targets(t: Any) -> str | tuple[str, ...]:
    if isinstance(t, str):
        if t != "all-linear":
            try:
                re.compile(t)
            except re.error as e:
                raise ValueError(f"target_modules: {t!r} is not a valid regular expression ({e})") from e
        return t
    if isinstance(t, (list, tuple)) and t and all(isinstance(x, str) and x for x in t):
        return tuple(t)
    raise ValueError(
        f"target_modules: expected a non-empty list/tuple of module names, a regex string or "
        f"'all-linear', got {t!r}"
    )


# ----------------------------------------------------------------------------- the core


@dataclass(frozen=True)
class DenseInfo:
    """A dense module found in a parameter tree: its weight shape and matrix view."""

    name: str
    shape: tuple[int, ...]
    d_in: int
    d_out: int


def as_matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(d_in, d_out)`` of a weight: ``(d_in, d_out)`` as is; conv ``(C_out, *k, C_in)`` ->
    ``(prod(k) * C_in, C_out)``."""
    if len(shape) == 2:
        return shape[0], shape[1]
    return math.prod(shape[1:]), shape[0]


def delta_to_weight(delta: mx.array, shape: tuple[int, ...]) -> mx.array:
    """Reshape a matrix update ``(d_in, d_out)`` to the weight layout ``shape``."""
    if len(shape) == 2:
        return delta
    return delta.T.reshape(shape)


def _walk(tree: Any, path: tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(tree, dict):
        if _is_dense(tree):
            yield ".".join(path), tree
            return
        for k, v in tree.items():
            yield from _walk(v, path + (str(k),))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _walk(v, path + (str(i),))


def _is_dense(node: dict[str, Any]) -> bool:
    w = node.get("w")
    if isinstance(w, mx.array) and w.ndim >= 2:
        return True
    return isinstance(node.get("wq"), mx.array) and isinstance(node.get("scales"), mx.array)


def dense_modules(params: PyTree, group_size: int | None = None) -> dict[str, DenseInfo]:
    """Every dense module of ``params``: ``{name: DenseInfo}`` in tree order.

    Quantized modules (``{"wq", "scales", "biases"}``, see :mod:`metafn.peft.qlora`) are found
    too; their ``d_in`` is ``scales.shape[-1] * group_size`` (required for them).
    """
    out: dict[str, DenseInfo] = {}
    for name, node in _walk(params, ()):
        if "w" in node:
            shape = tuple(node["w"].shape)
        else:
            if group_size is None:
                raise ValueError(f"params: module {name!r} is quantized; pass group_size")
            d_out, n_groups = node["scales"].shape
            shape = (n_groups * group_size, d_out)
        d_in, d_out = as_matrix_shape(shape)
        out[name] = DenseInfo(name, shape, d_in, d_out)
    return out


def _available(names: list[str]) -> str:
    short = sorted({n.rsplit(".", 1)[-1] for n in names} | {".".join(n.split(".")[-2:]) for n in names})
    shown = ", ".join(short[:40])
    full = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f"available names: {shown} (full paths: {full})"


def match_targets(names: list[str], target_modules: str | tuple[str, ...] | list[str]) -> list[str]:
    """The module names selected by ``target_modules`` (see the module docstring).

    Raises ``ValueError`` listing the available names when an entry of a name tuple, or the
    regex, selects nothing.
    """
    targets = _norm_targets(target_modules)
    if not names:
        raise ValueError("params: no dense module (a dict with a weight 'w' of ndim >= 2) found")
    if targets == "all-linear":
        return list(names)
    if isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [n for n in names if pattern.fullmatch(n)]
        if not chosen:
            raise ValueError(
                f"target_modules: regex {targets!r} matches no module; {_available(names)}"
            )
        return chosen
    chosen_set: set[str] = set()
    for t in targets:
        hit = [n for n in names if n == t or n.endswith("." + t)]
        if not hit:
            raise ValueError(f"target_modules: {t!r} matches no module; {_available(names)}")
        chosen_set.update(hit)
    return [n for n in names if n in chosen_set]


def select_targets(
    params: PyTree, target_modules: str | tuple[str, ...] | list[str], r: int | None = None,
    group_size: int | None = None,
) -> dict[str, DenseInfo]:
    """The dense modules of ``params`` chosen by ``target_modules``; with ``r``, checks that
    ``r <= min(d_in, d_out)`` for each (a larger rank adds nothing and is an error)."""
    mods = dense_modules(params, group_size)
    chosen = match_targets(list(mods), target_modules)
    out = {n: mods[n] for n in chosen}
    if r is not None:
        for info in out.values():
            if r > min(info.d_in, info.d_out):
                raise ValueError(
                    f"r: rank {r} exceeds min(d_in, d_out) = {min(info.d_in, info.d_out)} of "
                    f"module {info.name!r} (d_in={info.d_in}, d_out={info.d_out})"
                )
    return out


def map_modules(
    params: PyTree, fns: Mapping[str, Callable[[dict[str, Any]], dict[str, Any]]]
) -> PyTree:
    """A new tree where each dense module named in ``fns`` is replaced by ``fns[name](node)``.

    Containers on the way are copied; all other leaves are shared (nothing is mutated).
    Raises ``KeyError`` if a name in ``fns`` is not a dense module of ``params``.
    """
    seen: set[str] = set()

    def rec(tree: Any, path: tuple[str, ...]) -> Any:
        if isinstance(tree, dict):
            if _is_dense(tree):
                name = ".".join(path)
                if name in fns:
                    seen.add(name)
                    return fns[name](tree)
                return tree
            return {k: rec(v, path + (str(k),)) for k, v in tree.items()}
        if isinstance(tree, list):
            return [rec(v, path + (str(i),)) for i, v in enumerate(tree)]
        if isinstance(tree, tuple):
            return tuple(rec(v, path + (str(i),)) for i, v in enumerate(tree))
        return tree

    out = rec(params, ())
    missing = set(fns) - seen
    if missing:
        raise KeyError(
            f"adapter: module(s) {sorted(missing)[:5]} are not dense modules of params; "
            f"{_available(list(dense_modules(params, group_size=1)))}"
        )
    return out


def _check_adapter(adapter: Any, name: str, leaves: tuple[str, ...]) -> None:
    if not isinstance(adapter, dict) or not adapter:
        raise TypeError(f"{name}: expected a non-empty dict {{module: {{...}}}} from *_init, "
                        f"got {type(adapter).__name__}")
    for mod, node in adapter.items():
        if not isinstance(node, dict) or any(k not in node for k in leaves):
            raise ValueError(f"{name}[{mod!r}]: expected a dict with keys {leaves}, got "
                             f"{sorted(node) if isinstance(node, dict) else type(node).__name__}")


def dropout_rows(key: mx.array | None, a: mx.array, p: float) -> mx.array:
    """``diag(m) a / (1 - p)`` with ``m_i ~ Bernoulli(1 - p)`` over the rows of ``a (d_in, r)``;
    ``a`` unchanged when ``key`` is None or ``p == 0``."""
    if key is None or p == 0.0:
        return a
    keep = mx.random.bernoulli(1.0 - p, (a.shape[0], 1), key=key)
    return mx.where(keep, a / (1.0 - p), 0.0)


def _module_keys(key: mx.array | None, names: list[str]) -> dict[str, mx.array | None]:
    if key is None:
        return {n: None for n in names}
    ks = mx.random.split(key, len(names))
    return {n: ks[i] for i, n in enumerate(names)}


# ----------------------------------------------------------------------------- LoRA


def lora_init(key: mx.array, params: PyTree, config: LoraConfig) -> Adapter:
    """``{name: {"a": (d_in, r), "b": (r, d_out) zeros}}`` for every target module of ``params``.

    Deterministic in ``key``; module ``i`` (tree order) uses ``split(key, n)[i]``.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config: expected a LoraConfig, got {type(config).__name__}")
    targets = select_targets(params, config.target_modules, config.r, group_size=_gs(config))
    keys = _module_keys(key, list(targets))
    out: Adapter = {}
    for name, info in targets.items():
        k = keys[name]
        if config.init == "kaiming":
            bound = 1.0 / math.sqrt(info.d_in)
            a = mx.random.uniform(-bound, bound, (info.d_in, config.r), key=k)
        else:
            a = mx.random.normal((info.d_in, config.r), key=k) * (1.0 / config.r)
        out[name] = {"a": a, "b": mx.zeros((config.r, info.d_out))}
    return out


def _gs(config: Any) -> int | None:
    return getattr(config, "group_size", None)


def lora_delta(a: mx.array, b: mx.array, scale: float, shape: tuple[int, ...]) -> mx.array:
    """``s * A @ B`` in the layout of a weight of shape ``shape``."""
    return delta_to_weight(scale * (a @ b), shape)


def lora_merge(
    params: PyTree, adapter: Adapter, config: LoraConfig, key: mx.array | None = None
) -> PyTree:
    """Base parameters with every target weight replaced by ``W + s * A @ B``.

    ``key`` turns on the merged-path dropout (feature mask on A's rows, see module docstring);
    without it the merge is exact and deterministic. Gradients flow to ``A`` and ``B``.
    """
    _check_adapter(adapter, "adapter", ("a", "b"))
    keys = _module_keys(key if config.dropout > 0 else None, list(adapter))
    s = config.scale

    def make(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        ad = adapter[name]

        def fn(node: dict[str, Any]) -> dict[str, Any]:
            w = node["w"]
            a = dropout_rows(keys[name], ad["a"], config.dropout)
            return {**node, "w": w + lora_delta(a, ad["b"], s, tuple(w.shape)).astype(w.dtype)}

        return fn

    return map_modules(params, {n: make(n) for n in adapter})


def lora_inject(
    params: PyTree, adapter: Adapter, config: LoraConfig, key: mx.array | None = None
) -> PyTree:
    """Base parameters whose target modules also carry the unmerged LoRA branch
    (``lora_a``, ``lora_b``, ``lora_scale`` and, with a key and dropout > 0, ``lora_key`` /
    ``lora_p``), for models whose dense layers use :func:`metafn.nn.bert.linear_apply`:
    ``y = x W + b + s * (drop(x) A) B``. Only 2-D weights (``(d_in, d_out)``) are supported."""
    _check_adapter(adapter, "adapter", ("a", "b"))
    keys = _module_keys(key if config.dropout > 0 else None, list(adapter))
    s = mx.array(config.scale, dtype=mx.float32)

    def make(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        ad = adapter[name]

        def fn(node: dict[str, Any]) -> dict[str, Any]:
            if "w" in node and node["w"].ndim != 2:
                raise ValueError(f"adapter[{name!r}]: the unmerged path needs a 2-D dense weight, "
                                 f"got shape {node['w'].shape}; use the merged path")
            out = {**node, "lora_a": ad["a"], "lora_b": ad["b"], "lora_scale": s}
            if keys[name] is not None:
                out["lora_key"] = keys[name]
                out["lora_p"] = mx.array(config.dropout, dtype=mx.float32)
            return out

        return fn

    return map_modules(params, {n: make(n) for n in adapter})


def lora_apply(
    params: PyTree,
    adapter: Adapter,
    config: LoraConfig,
    apply_fn: Callable[..., Any],
    *args: Any,
    key: mx.array | None = None,
    unmerged: bool = False,
    **kwargs: Any,
) -> Any:
    """``apply_fn(effective_params, *args, **kwargs)`` with the adapter applied.

    Merged path (default, any model): the effective weights ``W + s A B`` are built inside the
    graph. ``unmerged=True`` (models built on :func:`metafn.nn.bert.linear_apply`, e.g. the BERT
    encoder) computes ``x W + s (x A) B`` instead. ``key`` enables dropout (training).
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a callable (params, *args) -> output, got {apply_fn!r}")
    p = (lora_inject if unmerged else lora_merge)(params, adapter, config, key)
    return apply_fn(p, *args, **kwargs)


def lora_num_params(adapter: Adapter) -> int:
    """Number of trainable scalars in an adapter (``sum r (d_in + d_out)`` for LoRA)."""
    return tree_count(adapter)
