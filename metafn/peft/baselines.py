"""Baselines for the PEFT comparison, in the same init / apply / merge form: full fine-tuning
and training only selected modules (head-only, BitFit, ...), as pure functions.

The trainable part is a flat dict ``{leaf_path: array}`` of some leaves of ``params``
(``leaf_path`` as in ``mlx.utils.tree_flatten``, e.g. ``encoder.layer.0.output.dense.b``);
:func:`merge_leaves` puts them back. Differentiating a loss with respect to this dict gives
exactly the gradients of the selected leaves.

- Full fine-tuning (:class:`FullConfig`): every leaf, optionally minus those whose path
  matches ``exclude`` (a regex, e.g. ``r"embeddings\\..*"`` to freeze the embeddings).
- Head-only / selected modules (:class:`HeadConfig`): the leaves under the modules named by
  ``modules`` (suffix match on the dotted module path, or a regex with full match on the
  leaf path). ``HeadConfig(modules=r".*\\.b")`` is BitFit (biases only).

When the frozen part is a whole encoder (head-only on sentence embeddings), it is much faster
to embed the data once and train the head on the fixed features.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx

from metafn.peft.lora import _norm_targets
from metafn.tree import PyTree, tree_flatten

__all__ = [
    "FullConfig", "HeadConfig", "select_leaves", "merge_leaves", "full_init", "full_apply",
    "full_merge", "head_init", "head_apply", "head_merge",
]


@dataclass(frozen=True)
class FullConfig:
    """Full fine-tuning; ``exclude``: optional regex of leaf paths to keep frozen."""

    exclude: str | None = None

    def __post_init__(self) -> None:
        if self.exclude is not None:
            try:
                re.compile(self.exclude)
            except re.error as e:
                raise ValueError(f"exclude: {self.exclude!r} is not a valid regex ({e})") from e


@dataclass(frozen=True)
class HeadConfig:
    """Train only the leaves under ``modules`` (names, suffix match; or a regex over leaf paths)."""

    modules: str | tuple[str, ...] = ("classifier",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", _norm_targets(self.modules))


def select_leaves(params: PyTree, modules: str | tuple[str, ...] | list[str]) -> dict[str, mx.array]:
    """``{leaf_path: leaf}`` for leaves selected by ``modules``: a tuple of names selects every
    leaf whose path has a dotted prefix equal to a name or ending with ``"." + name``; a
    string is a regex that must fully match the leaf path. Errors list the available paths."""
    flat = dict(tree_flatten(params))
    if not flat:
        raise ValueError("params: no array leaves")
    mods = _norm_targets(modules)
    if isinstance(mods, str):
        if mods == "all-linear":
            raise ValueError("modules: 'all-linear' is for adapters; use FullConfig for all leaves")
        pat = re.compile(mods)
        out = {k: v for k, v in flat.items() if pat.fullmatch(k)}
        if not out:
            raise ValueError(f"modules: regex {mods!r} matches no leaf; leaves: "
                             f"{', '.join(list(flat)[:12])}, ...")
        return out
    out = {}
    for name in mods:
        hit = {}
        for k, v in flat.items():
            parts = k.split(".")
            prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
            if name in prefixes or any(p.endswith("." + name) for p in prefixes):
                hit[k] = v
        if not hit:
            mods_avail = sorted({k.rsplit(".", 1)[0] for k in flat})
            raise ValueError(f"modules: {name!r} matches no module; available: "
                             f"{', '.join(mods_avail[:20])}{', ...' if len(mods_avail) > 20 else ''}")
        out.update(hit)
    return {k: flat[k] for k in flat if k in out}


def merge_leaves(params: PyTree, trainable: dict[str, mx.array]) -> PyTree:
    """``params`` with the leaves at the paths of ``trainable`` replaced (containers copied)."""
    if not isinstance(trainable, dict):
        raise TypeError(f"trainable: expected a dict {{leaf_path: array}}, got {type(trainable).__name__}")
    used: set[str] = set()

    def rec(tree: Any, path: str) -> Any:
        if isinstance(tree, dict):
            return {k: rec(v, f"{path}.{k}" if path else str(k)) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            items = [rec(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(tree)]
            return items if isinstance(tree, list) else tuple(items)
        if path in trainable:
            used.add(path)
            new = trainable[path]
            if isinstance(tree, mx.array) and new.shape != tree.shape:
                raise ValueError(f"trainable[{path!r}]: shape {new.shape} != params' {tree.shape}")
            return new
        return tree

    out = rec(params, "")
    unknown = set(trainable) - used
    if unknown:
        raise KeyError(f"trainable: paths {sorted(unknown)[:5]} are not leaves of params")
    return out


def full_init(key: mx.array | None, params: PyTree, config: FullConfig = FullConfig()) -> dict[str, mx.array]:
    """All leaves of ``params`` (minus ``config.exclude``) as the trainable dict. ``key`` is
    unused (uniform interface)."""
    flat = dict(tree_flatten(params))
    if config.exclude is not None:
        pat = re.compile(config.exclude)
        flat = {k: v for k, v in flat.items() if not pat.fullmatch(k)}
    if not flat:
        raise ValueError("config.exclude: excludes every leaf; nothing left to train")
    return flat


def head_init(key: mx.array | None, params: PyTree, config: HeadConfig = HeadConfig()) -> dict[str, mx.array]:
    """The leaves under ``config.modules`` as the trainable dict (``key`` unused)."""
    return select_leaves(params, config.modules)


def full_merge(params: PyTree, trainable: dict[str, mx.array], config: Any = None) -> PyTree:
    """:func:`merge_leaves` (the fine-tuned model as a plain tree)."""
    return merge_leaves(params, trainable)


head_merge = full_merge


def full_apply(
    params: PyTree,
    trainable: dict[str, mx.array],
    config: Any,
    apply_fn: Callable[..., Any],
    *args: Any,
    key: mx.array | None = None,
    **kwargs: Any,
) -> Any:
    """``apply_fn(merge_leaves(params, trainable), *args, **kwargs)`` (``key`` unused)."""
    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a callable, got {apply_fn!r}")
    return apply_fn(merge_leaves(params, trainable), *args, **kwargs)


head_apply = full_apply
