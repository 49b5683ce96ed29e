"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning") for the BERT encoder of :mod:`metafn.nn.bert`, as pure functions.

``n`` trainable virtual-token embeddings ``P (n, d)`` are prepended to the word embeddings of
every input; the frozen encoder sees ``[P; E_word[x]] + E_pos + E_type`` (as Hugging Face
peft does for BERT), and the returned hidden states drop the ``n`` prompt positions, so
pooling with the original attention mask is unchanged. Trainable parameters: ``n d``.

Adapter: ``{"prompt": (n, d)}``. Initialization (``init``):

- ``"vocab"``: rows of the word-embedding table at ``n`` random token ids (Lester et al.
  initialize from vocabulary embeddings); ids ``>= 1000`` when the vocabulary is larger than
  2000 (BERT's ids below ~1000 are [PAD], [unused*], [UNK], [CLS], [SEP], [MASK]);
- ``"text"``: the embeddings of the tokens of ``init_text`` (repeated / cut to ``n``; needs a
  tokenizer);
- ``"normal"``: ``N(0, init_std^2)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx

from metafn.tree import PyTree

__all__ = ["PromptConfig", "prompt_init", "prompt_apply"]


@dataclass(frozen=True)
class PromptConfig:
    """``n_tokens`` virtual tokens; ``init`` in ``("vocab", "text", "normal")``; ``init_text``
    for ``"text"``; ``init_std`` for ``"normal"``."""

    n_tokens: int = 20
    init: str = "vocab"
    init_text: str | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.n_tokens, int) or isinstance(self.n_tokens, bool) or self.n_tokens < 1:
            raise ValueError(f"n_tokens: expected a positive int, got {self.n_tokens!r}")
        if self.init not in ("vocab", "text", "normal"):
            raise ValueError(f"init: expected 'vocab', 'text' or 'normal', got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ValueError("init_text: required (a non-empty string) when init='text'")


def _word_embeddings(params: PyTree) -> mx.array:
    try:
        return params["embeddings"]["word_embeddings"]["weight"]
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError("params: expected a BERT tree with embeddings.word_embeddings.weight "
                         "(see metafn.nn.bert)") from e


def prompt_init(
    key: mx.array, params: PyTree, config: PromptConfig, tokenizer: Any = None
) -> dict[str, mx.array]:
    """``{"prompt": (n_tokens, d)}`` initialized per ``config.init`` (module docstring).

    tokenizer: a :class:`metafn.nn.bert.BertTokenizer`, needed for ``init="text"``.
    """
    if not isinstance(config, PromptConfig):
        raise TypeError(f"config: expected a PromptConfig, got {type(config).__name__}")
    table = _word_embeddings(params)
    vocab, d = table.shape
    n = config.n_tokens
    if config.init == "normal":
        return {"prompt": config.init_std * mx.random.normal((n, d), key=key)}
    if config.init == "vocab":
        low = 1000 if vocab > 2000 else 0
        ids = mx.random.randint(low, vocab, (n,), key=key)
        return {"prompt": table[ids]}
    if tokenizer is None:
        raise ValueError("tokenizer: required for init='text' (the BertTokenizer of the model)")
    enc = tokenizer.tokenizer.encode(config.init_text, add_special_tokens=False)
    ids = list(enc.ids) or [0]
    ids = (ids * (n // len(ids) + 1))[:n]
    return {"prompt": table[mx.array(ids)]}


def prompt_apply(
    params: PyTree,
    adapter: dict[str, mx.array],
    config: PromptConfig,
    apply_fn: Callable[..., Any],
    *args: Any,
    key: mx.array | None = None,
    **kwargs: Any,
) -> Any:
    """``apply_fn(params, *args, prompt=adapter["prompt"], **kwargs)``; ``apply_fn`` is
    :func:`metafn.nn.bert.bert_apply`, :func:`~metafn.nn.bert.sentence_embed` or any function
    taking a ``prompt=`` keyword. ``key`` is accepted for a uniform interface (unused)."""
    if not isinstance(adapter, dict) or "prompt" not in adapter:
        raise ValueError("adapter: expected {'prompt': (n, d)} from prompt_init")
    if adapter["prompt"].shape[0] != config.n_tokens:
        raise ValueError(f"adapter: prompt has {adapter['prompt'].shape[0]} tokens, config says "
                         f"{config.n_tokens}")
    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a callable, got {apply_fn!r}")
    return apply_fn(params, *args, prompt=adapter["prompt"], **kwargs)
