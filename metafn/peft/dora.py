"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") as pure functions.

Each target weight is split into a magnitude and a direction; LoRA adapts the direction:

    V  = W + s * A @ B                       (matrix view (d_in, d_out), s = alpha / r)
    W' = m * V / ||V||_c                     ||V||_c = column norms, shape (d_out,)

with one magnitude per output unit, ``m (d_out,)``, initialised to ``||W||_c`` and ``B = 0``,
so ``W' = W`` at init. As in the paper (section 4.3) and Hugging Face peft, ``||V||_c`` is
treated as a constant in the backward pass (``detach_norm=True``, less memory); set it False
for the exact gradient. For a convolution ``(C_out, *k, C_in)`` the column norm is taken over
everything but ``C_out`` (the matrix view's column).

Adapter: ``{module_name: {"a": (d_in, r), "b": (r, d_out), "m": (d_out,)}}``; trainable
parameters per target ``r (d_in + d_out) + d_out``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx

from metafn.peft.lora import (
    Adapter, LoraConfig, _check_adapter, _module_keys, delta_to_weight, dropout_rows, lora_init,
    map_modules,
)
from metafn.tree import PyTree

__all__ = ["DoraConfig", "dora_init", "dora_weight", "dora_merge", "dora_apply"]


@dataclass(frozen=True)
class DoraConfig(LoraConfig):
    """:class:`~metafn.peft.lora.LoraConfig` plus ``detach_norm`` (treat ``||V||_c`` as a
    constant in the backward pass, as in the paper and peft)."""

    detach_norm: bool = True


def _matrix(w: mx.array) -> mx.array:
    return w if w.ndim == 2 else w.reshape(w.shape[0], -1).T


def dora_init(key: mx.array, params: PyTree, config: DoraConfig) -> Adapter:
    """LoRA init (``B = 0``) plus ``m = ||W||_c`` for every target; the adapted model equals the
    base model at init."""
    if not isinstance(config, DoraConfig):
        raise TypeError(f"config: expected a DoraConfig, got {type(config).__name__}")
    lora = lora_init(key, params, config)
    weights: dict[str, mx.array] = {}

    def grab(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def fn(node: dict[str, Any]) -> dict[str, Any]:
            if "w" not in node:
                raise ValueError(f"params: DoRA needs a float weight at {name!r} (quantized found)")
            weights[name] = node["w"]
            return node

        return fn

    map_modules(params, {n: grab(n) for n in lora})
    return {n: {**ab, "m": mx.linalg.norm(_matrix(weights[n]), axis=0)} for n, ab in lora.items()}


def dora_weight(
    w: mx.array, a: mx.array, b: mx.array, m: mx.array, scale: float, detach_norm: bool = True
) -> mx.array:
    """``m * V / ||V||_c`` with ``V = W + scale * A @ B``, in the layout of ``w``."""
    v = _matrix(w) + scale * (a @ b)
    norm = mx.linalg.norm(v, axis=0)
    if detach_norm:
        norm = mx.stop_gradient(norm)
    return delta_to_weight(v * (m / norm), tuple(w.shape)).astype(w.dtype)


def dora_merge(
    params: PyTree, adapter: Adapter, config: DoraConfig, key: mx.array | None = None
) -> PyTree:
    """Base parameters with every target weight replaced by its DoRA weight. ``key`` enables
    the merged-path dropout on ``A``'s rows (see :mod:`metafn.peft.lora`)."""
    _check_adapter(adapter, "adapter", ("a", "b", "m"))
    keys = _module_keys(key if config.dropout > 0 else None, list(adapter))

    def make(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        ad = adapter[name]

        def fn(node: dict[str, Any]) -> dict[str, Any]:
            a = dropout_rows(keys[name], ad["a"], config.dropout)
            w = dora_weight(node["w"], a, ad["b"], ad["m"], config.scale, config.detach_norm)
            return {**node, "w": w}

        return fn

    return map_modules(params, {n: make(n) for n in adapter})


def dora_apply(
    params: PyTree,
    adapter: Adapter,
    config: DoraConfig,
    apply_fn: Callable[..., Any],
    *args: Any,
    key: mx.array | None = None,
    **kwargs: Any,
) -> Any:
    """``apply_fn(dora_merge(params, adapter, config, key), *args, **kwargs)``."""
    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a callable (params, *args) -> output, got {apply_fn!r}")
    return apply_fn(dora_merge(params, adapter, config, key), *args, **kwargs)
