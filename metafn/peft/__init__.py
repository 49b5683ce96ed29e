"""Parameter-efficient fine-tuning as pure functions over parameter pytrees.

Every method is a set of pure functions (no module wrappers, no hidden state):

    adapter = <m>_init(key, params, config)                    trainable pytree
    y       = <m>_apply(params, adapter, config, apply_fn, *args, key=None, **kw)
    merged  = <m>_merge(params, adapter, config)                plain params (where defined)

``params`` stay a constant argument; differentiate with respect to ``adapter`` only, e.g.
``mx.value_and_grad(lambda ad: loss(lora_apply(params, ad, cfg, model_apply, x), y))(adapter)``.

Methods: LoRA (:mod:`.lora`), DoRA (:mod:`.dora`), AdaLoRA (:mod:`.adalora`), QLoRA
(:mod:`.qlora`), prompt tuning (:mod:`.prompt`), prefix tuning (:mod:`.prefix`), full
fine-tuning and head-only (:mod:`.baselines`); save/load in :mod:`.io`.

:class:`PeftMethod` bundles one configured method's functions (as optax's
``GradientTransformation`` bundles ``init``/``update``), so a benchmark can treat all methods
alike::

    m = metafn.peft.lora_method(LoraConfig(r=8, target_modules=("query", "value")))
    base = m.prepare(params)                 # QLoRA quantizes here; others: identity
    adapter = m.init(key, base)
    emb = m.apply(base, adapter, embed_fn, ids, mask, key=dropout_key)
    plain = m.merge(base, adapter)           # None for prompt / prefix tuning
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import mlx.core as mx

from metafn.peft.adalora import (
    AdaLoraConfig, AdaLoraState, adalora_allocate, adalora_apply, adalora_budget,
    adalora_importance, adalora_init, adalora_init_state, adalora_mask, adalora_merge,
    adalora_orth_reg, adalora_ranks, adalora_scores, adalora_update,
)
from metafn.peft.baselines import (
    FullConfig, HeadConfig, full_apply, full_init, full_merge, head_apply, head_init, head_merge,
    merge_leaves, select_leaves,
)
from metafn.peft.dora import DoraConfig, dora_apply, dora_init, dora_merge, dora_weight
from metafn.peft.io import load_adapter, load_tree, save_adapter, save_tree
from metafn.peft.lora import (
    Adapter, LoraConfig, dense_modules, lora_apply, lora_delta, lora_init, lora_inject,
    lora_merge, lora_num_params, map_modules, match_targets, select_targets,
)
from metafn.peft.prefix import PrefixConfig, prefix_apply, prefix_init, prefix_kv
from metafn.peft.prompt import PromptConfig, prompt_apply, prompt_init
from metafn.peft.qlora import (
    QLoraConfig, qlora_apply, qlora_dequantize, qlora_init, qlora_merge, qlora_quantize,
)
from metafn.tree import PyTree

__all__ = [
    # configs
    "LoraConfig", "DoraConfig", "AdaLoraConfig", "QLoraConfig", "PromptConfig", "PrefixConfig",
    "FullConfig", "HeadConfig",
    # LoRA and the shared core
    "Adapter", "dense_modules", "match_targets", "select_targets", "map_modules", "lora_init",
    "lora_delta", "lora_merge", "lora_inject", "lora_apply", "lora_num_params",
    # DoRA
    "dora_init", "dora_weight", "dora_merge", "dora_apply",
    # AdaLoRA
    "AdaLoraState", "adalora_init", "adalora_init_state", "adalora_budget", "adalora_importance",
    "adalora_scores", "adalora_allocate", "adalora_mask", "adalora_update", "adalora_orth_reg",
    "adalora_merge", "adalora_apply", "adalora_ranks",
    # QLoRA
    "qlora_quantize", "qlora_dequantize", "qlora_init", "qlora_merge", "qlora_apply",
    # prompt / prefix
    "prompt_init", "prompt_apply", "prefix_init", "prefix_kv", "prefix_apply",
    # baselines
    "select_leaves", "merge_leaves", "full_init", "full_apply", "full_merge", "head_init",
    "head_apply", "head_merge",
    # io
    "save_adapter", "load_adapter", "save_tree", "load_tree",
    # bundles
    "PeftMethod", "lora_method", "dora_method", "adalora_method", "qlora_method",
    "prompt_method", "prefix_method", "full_method", "head_method", "method_for",
]


class PeftMethod(NamedTuple):
    """One configured PEFT method as pure functions.

    prepare(params) -> base: the frozen tree the method adapts (QLoRA quantizes; else identity).
    init(key, base) -> adapter: the trainable pytree.
    apply(base, adapter, apply_fn, *args, key=None, **kw): ``apply_fn`` run on the adapted
      model (``key`` enables dropout where the method has it).
    merge(base, adapter) -> params: a plain tree with the adapter folded in, or ``None`` for
      methods that change the computation rather than the weights (prompt, prefix).
    """

    name: str
    config: Any
    prepare: Callable[[PyTree], PyTree]
    init: Callable[[mx.array, PyTree], PyTree]
    apply: Callable[..., Any]
    merge: Callable[[PyTree, PyTree], PyTree] | None


def _identity(params: PyTree) -> PyTree:
    return params


def _bundle(name: str, config: Any, init: Callable[..., Any], apply: Callable[..., Any],
            merge: Callable[..., Any] | None, prepare: Callable[[PyTree], PyTree] = _identity,
            **apply_defaults: Any) -> PeftMethod:
    def init_fn(key: mx.array, base: PyTree) -> PyTree:
        return init(key, base, config)

    def apply_fn(base: PyTree, adapter: PyTree, fn: Callable[..., Any], *args: Any,
                 key: mx.array | None = None, **kwargs: Any) -> Any:
        return apply(base, adapter, config, fn, *args, key=key, **{**apply_defaults, **kwargs})

    merge_fn = None
    if merge is not None:
        def merge_fn(base: PyTree, adapter: PyTree) -> PyTree:
            return merge(base, adapter, config)

    return PeftMethod(name, config, prepare, init_fn, apply_fn, merge_fn)


def lora_method(config: LoraConfig = LoraConfig(), unmerged: bool = False) -> PeftMethod:
    """LoRA; ``unmerged=True`` uses ``x W + s (x A) B`` (models on ``bert.linear_apply``)."""
    return _bundle("lora", config, lora_init, lora_apply, lora_merge, unmerged=unmerged)


def dora_method(config: DoraConfig = DoraConfig()) -> PeftMethod:
    """DoRA (magnitude / direction)."""
    return _bundle("dora", config, dora_init, dora_apply, dora_merge)


def adalora_method(config: AdaLoraConfig) -> PeftMethod:
    """AdaLoRA's forward (``P diag(E) Q``); rank allocation is :func:`adalora_update`."""
    return _bundle("adalora", config, adalora_init, adalora_apply, adalora_merge)


def qlora_method(config: QLoraConfig = QLoraConfig(), unmerged: bool = False) -> PeftMethod:
    """QLoRA: ``prepare`` quantizes the base; ``merge`` returns dequantized float params."""
    return _bundle("qlora", config, qlora_init, qlora_apply, qlora_merge,
                   prepare=lambda p: qlora_quantize(p, config), unmerged=unmerged)


def prompt_method(config: PromptConfig = PromptConfig(), tokenizer: Any = None) -> PeftMethod:
    """Prompt tuning for the BERT encoder (``apply_fn`` must take ``prompt=``)."""

    def init(key: mx.array, base: PyTree, cfg: PromptConfig) -> PyTree:
        return prompt_init(key, base, cfg, tokenizer)

    return _bundle("prompt", config, init, prompt_apply, None)


def prefix_method(config: PrefixConfig = PrefixConfig()) -> PeftMethod:
    """Prefix tuning for the BERT encoder (``apply_fn`` must take ``prefix=``)."""
    return _bundle("prefix", config, prefix_init, prefix_apply, None)


def full_method(config: FullConfig = FullConfig()) -> PeftMethod:
    """Full fine-tuning: every leaf (minus ``config.exclude``) is trainable."""
    return _bundle("full", config, full_init, full_apply, full_merge)


def head_method(config: HeadConfig = HeadConfig()) -> PeftMethod:
    """Only the leaves under ``config.modules`` are trainable."""
    return _bundle("head", config, head_init, head_apply, head_merge)


def method_for(config: Any, **options: Any) -> PeftMethod:
    """The :class:`PeftMethod` for a config instance (e.g. from :func:`load_adapter`)."""
    table: dict[type, Callable[..., PeftMethod]] = {
        LoraConfig: lora_method, DoraConfig: dora_method, AdaLoraConfig: adalora_method,
        QLoraConfig: qlora_method, PromptConfig: prompt_method, PrefixConfig: prefix_method,
        FullConfig: full_method, HeadConfig: head_method,
    }
    factory = table.get(type(config))
    if factory is None:
        raise TypeError(f"config: expected a PEFT config, got {type(config).__name__}")
    return factory(config, **options)
