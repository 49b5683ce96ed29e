"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation") for the BERT encoder of :mod:`metafn.nn.bert`, as pure functions.

Every layer ``l`` gets ``n`` trainable key and value vectors, prepended to that layer's keys
and values after their projections (what Hugging Face peft passes as ``past_key_values``):

    Attn_l(h) = softmax(Q [K_l^pre; K]^T / sqrt(d_h) + mask) [V_l^pre; V]

The prefix array has shape ``(L, 2, n, d)`` (``[:, 0]`` keys, ``[:, 1]`` values, heads
concatenated along ``d``). Trainable parameters: ``2 L n d``.

With ``projection=True`` (the reparameterization of Li & Liang, peft's
``prefix_projection``), the prefix is produced by a two-layer MLP from ``n`` trainable
embeddings: ``prefix = reshape(tanh(E W_1 + b_1) W_2 + b_2)``, ``E (n, d)``,
``W_1 (d, h)``, ``W_2 (h, 2 L d)``; this stabilizes training and can be dropped after it.

Adapter: ``{"prefix": (L, 2, n, d)}`` or ``{"embedding": (n, d), "mlp": [dense, dense]}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx

from metafn.nn.mlp import dense_init
from metafn.tree import PyTree

__all__ = ["PrefixConfig", "prefix_init", "prefix_kv", "prefix_apply"]


@dataclass(frozen=True)
class PrefixConfig:
    """``n_tokens`` prefix positions per layer; ``projection`` (MLP reparameterization with
    hidden width ``projection_hidden``, default ``d``); ``init_std`` of the direct prefix or
    of the projection's input embeddings."""

    n_tokens: int = 10
    projection: bool = False
    projection_hidden: int | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.n_tokens, int) or isinstance(self.n_tokens, bool) or self.n_tokens < 1:
            raise ValueError(f"n_tokens: expected a positive int, got {self.n_tokens!r}")
        h = self.projection_hidden
        if h is not None and (not isinstance(h, int) or h < 1):
            raise ValueError(f"projection_hidden: expected a positive int or None, got {h!r}")
        if not self.init_std > 0:
            raise ValueError(f"init_std: expected a positive number, got {self.init_std!r}")


def _dims(params: PyTree) -> tuple[int, int]:
    """``(layers, d)``; ``d`` from the embeddings, or from layer 0's output LayerNorm when the
    tree holds only (a slice of) the encoder layers (``{"encoder": {"layer": [...]}}``)."""
    try:
        layers = params["encoder"]["layer"]
        if "embeddings" in params:
            d = params["embeddings"]["word_embeddings"]["weight"].shape[1]
        else:
            d = layers[0]["output"]["LayerNorm"]["weight"].shape[0]
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError("params: expected a BERT tree with encoder.layer and "
                         "embeddings.word_embeddings (see metafn.nn.bert)") from e
    return len(layers), d


def prefix_init(key: mx.array, params: PyTree, config: PrefixConfig) -> dict[str, Any]:
    """A prefix adapter for the BERT ``params`` (module docstring for the two forms)."""
    if not isinstance(config, PrefixConfig):
        raise TypeError(f"config: expected a PrefixConfig, got {type(config).__name__}")
    n_layers, d = _dims(params)
    n = config.n_tokens
    if not config.projection:
        return {"prefix": config.init_std * mx.random.normal((n_layers, 2, n, d), key=key)}
    h = config.projection_hidden or d
    ke, k1, k2 = mx.random.split(key, 3)
    return {
        "embedding": config.init_std * mx.random.normal((n, d), key=ke),
        "mlp": [dense_init(k1, d, h), dense_init(k2, h, 2 * n_layers * d)],
    }


def prefix_kv(adapter: dict[str, Any], n_layers: int) -> mx.array:
    """The ``(L, 2, n, d)`` prefix keys/values of an adapter (through the MLP if projected)."""
    if "prefix" in adapter:
        return adapter["prefix"]
    if "embedding" not in adapter or "mlp" not in adapter:
        raise ValueError("adapter: expected {'prefix'} or {'embedding', 'mlp'} from prefix_init")
    e = adapter["embedding"]
    l1, l2 = adapter["mlp"]
    out = mx.tanh(e @ l1["w"] + l1["b"]) @ l2["w"] + l2["b"]  # (n, 2 L d)
    n, d = e.shape
    return out.reshape(n, n_layers, 2, d).transpose(1, 2, 0, 3)


def prefix_apply(
    params: PyTree,
    adapter: dict[str, Any],
    config: PrefixConfig,
    apply_fn: Callable[..., Any],
    *args: Any,
    key: mx.array | None = None,
    **kwargs: Any,
) -> Any:
    """``apply_fn(params, *args, prefix=prefix_kv(adapter), **kwargs)`` with ``apply_fn``
    :func:`metafn.nn.bert.bert_apply` / :func:`~metafn.nn.bert.sentence_embed` (anything taking
    ``prefix=``). ``key`` is accepted for a uniform interface (unused)."""
    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a callable, got {apply_fn!r}")
    n_layers, _ = _dims(params)
    kv = prefix_kv(adapter, n_layers)
    if kv.shape[2] != config.n_tokens:
        raise ValueError(f"adapter: prefix has {kv.shape[2]} tokens, config says {config.n_tokens}")
    return apply_fn(params, *args, prefix=kv, **kwargs)
