"""Few-shot text classification with a frozen BERT encoder, a PEFT adapter and a prototype-
initialized head; adaptation, meta-learning of the adapter (Reptile, FOMAML, MAML) and the
standard CLINC150 fine-tuning protocol, as pure functions.

The model. A frozen encoder ``f`` (:mod:`metafn.nn.bert`) is split after layer ``k``: the
*bottom* (embeddings and layers ``0..k-1``) never changes, so its output states
``h_k = bottom(x) (B, L, d)`` are computed once per utterance and cached; the *top* (layers
``k..``) carries the PEFT adapter ``phi`` (any :class:`metafn.peft.PeftMethod`: LoRA, DoRA,
prefix, full, ...). The sentence embedding is

    e_phi(x) = normalize(mean_pool(top_phi(h_k(x))))                (B, d)

(``split=None`` runs the whole encoder on token ids, for prompt tuning, whose adapter enters
below layer 0). The head is a cosine classifier over ``C`` classes, ``W (C, d)``, ``b (C,)``:

    logits = s * e_phi(x) @ normalize(W)^T + b,      s = exp(log_scale)

initialized from class prototypes (ProtoMAML, Triantafillou et al. 2020):
``W_c = mean_{i: y_i = c} e_phi(x_i)``, ``b = 0``; at this initialization the head is the
nearest-prototype classifier under cosine similarity.

Adaptation to a task (support set ``S``): ``W`` from the prototypes of ``S`` under the current
adapter, then ``steps`` optimizer steps on ``(phi, W, b)`` minimizing cross-entropy on ``S``
(adapter rate ``lr``, head rate ``head_lr``).

Meta-learning (over the adapter ``phi`` and the log temperature; the base stays frozen): with
``phi'_t, W'_t`` the result of adapting from ``phi`` on task ``t``'s support set,

    MAML     L(phi) = mean_t CE_query_t(phi'_t, W'_t),   exact gradient (second order)
    FOMAML   the same with inner gradients held constant (``stop_gradient``); gradient
             still flows through the prototype initialization of ``W`` (fo-Proto-MAML)
    Reptile  g = phi - mean_t phi'_t with ``phi'_t`` adapted on support + query

Tasks of a meta-batch are batched with ``mx.vmap`` (it differentiates through the encoder,
``mx.fast`` attention and layer norm included, to second order).

Token inputs are padded to a fixed table width and trimmed per batch to a multiple of 8
(:func:`bucket_length`), so only a handful of shapes ever reach MLX.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import mlx.core as mx
import numpy as np

from metafn.nn import bert
from metafn.optim import GradientTransformation, adam, apply_updates, sgd
from metafn.peft import PeftMethod
from metafn.tree import PyTree, tree_map, tree_mean_axis0, tree_sub

__all__ = [
    "TokenTable", "pretokenize", "bucket_length", "TextModel", "frozen_method", "text_model",
    "model_inputs", "precompute_inputs", "precompute_layers", "model_embed", "proto_head",
    "head_logits", "softmax_ce", "loo_proto_loss", "text_loss", "AdaptConfig", "adapt_text",
    "MetaParams", "meta_init", "TextBatch", "text_batch", "episode_query_loss",
    "text_maml_outer", "text_reptile_grad", "episode_accuracy", "proto_accuracy",
    "FinetuneConfig", "finetune", "embed_all", "predict_logits", "accuracy_np", "supcon_loss",
    "simcse_loss", "SimcseConfig", "simcse_pretrain", "pseudo_label",
]


# ----------------------------------------------------------------------------- tokens


class TokenTable(NamedTuple):
    """Pre-tokenized texts: ``ids (N, L)`` int32 (padded with the tokenizer's pad id) and
    ``mask (N, L)`` int32 (1 for real tokens), one row per text, all padded to the same ``L``."""

    ids: mx.array
    mask: mx.array


def pretokenize(
    tokenizer: bert.BertTokenizer, texts: Sequence[str], max_length: int = 32
) -> TokenTable:
    """Tokenize every text once (``[CLS] ... [SEP]``, truncated to ``max_length`` tokens) into
    a :class:`TokenTable` of width ``max_length``. CLINC150 utterances are at most 33 tokens
    (99.9% within 26), so 32 loses at most a word of one utterance."""
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length: expected an int >= 2, got {max_length!r}")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        batch = bert.tokenize(tokenizer, texts, max_length=max_length)
    n, length = batch.input_ids.shape
    pad = max_length - length
    ids, mask = batch.input_ids, batch.attention_mask
    if pad:
        ids = mx.concatenate([ids, mx.full((n, pad), tokenizer.pad_id, dtype=mx.int32)], axis=1)
        mask = mx.concatenate([mask, mx.zeros((n, pad), dtype=mx.int32)], axis=1)
    return TokenTable(ids, mask)


def bucket_length(mask: mx.array | np.ndarray, multiple: int = 8) -> int:
    """The longest row of ``mask (..., L)`` rounded up to a multiple of ``multiple`` (at most
    ``L``): trimming a batch to it keeps every real token and bounds the number of shapes."""
    m = np.asarray(mask)
    longest = int(m.sum(axis=-1).max()) if m.size else 1
    return int(min(m.shape[-1], max(multiple, -(-longest // multiple) * multiple)))


# ----------------------------------------------------------------------------- model


class TextModel(NamedTuple):
    """A frozen encoder split after layer ``split`` with a PEFT ``method`` on the top part.

    bottom: ``{"embeddings", "encoder": {"layer": layers[:split]}}`` (``None`` when
      ``split is None``: the whole encoder runs on token ids).
    top: ``{"encoder": {"layer": layers[split:]}}`` after ``method.prepare`` (the whole tree
      when ``split is None``).
    """

    config: bert.BertConfig
    method: PeftMethod
    bottom: PyTree | None
    top: PyTree
    split: int | None


def _frozen_apply(base: PyTree, adapter: PyTree, fn: Callable[..., Any], *args: Any,
                  key: mx.array | None = None, **kw: Any) -> Any:
    return fn(base, *args, **kw)


def frozen_method() -> PeftMethod:
    """The 'no adapter' method: the encoder stays as it is and the adapter is ``{}`` (for the
    frozen-encoder baselines: nearest prototype, head-only fine-tuning)."""
    return PeftMethod("frozen", None, lambda p: p, lambda key, base: {}, _frozen_apply,
                      lambda base, adapter: base)


def _shared_encoder_params(params: PyTree) -> dict[str, PyTree]:
    """Encoder entries every layer uses (MPNet's relative-position table), kept on both sides
    of a split."""
    return {k: v for k, v in params["encoder"].items() if k != "layer"}


def text_model(
    params: PyTree, config: bert.BertConfig, method: PeftMethod | None = None,
    split: int | None = 0,
) -> TextModel:
    """Split BERT ``params`` after layer ``split`` (``0 <= split < num_layers``) and prepare
    the top for ``method`` (default :func:`frozen_method`). ``split=None``: no split (inputs are
    token ids; required for prompt tuning)."""
    if not isinstance(config, bert.BertConfig):
        raise TypeError(f"config: expected a BertConfig, got {type(config).__name__}")
    method = frozen_method() if method is None else method
    if not isinstance(method, PeftMethod):
        raise TypeError(f"method: expected a metafn.peft.PeftMethod, got {type(method).__name__}")
    layers = params["encoder"]["layer"]
    if split is None:
        return TextModel(config, method, None, method.prepare(params), None)
    if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split < len(layers):
        raise ValueError(f"split: expected an int in [0, {len(layers)}) or None, got {split!r}")
    if method.name == "prompt":
        raise ValueError("split: prompt tuning enters below layer 0; use split=None")
    shared = _shared_encoder_params(params)
    bottom = {"embeddings": params["embeddings"], "encoder": {"layer": list(layers[:split]), **shared}}
    top = {"encoder": {"layer": list(layers[split:]), **shared}}
    return TextModel(config, method, bottom, method.prepare(top), split)


def model_inputs(model: TextModel, ids: mx.array, mask: mx.array) -> mx.array:
    """What the adapted part consumes: the frozen bottom's states ``(B, L, d)``, or the token
    ids themselves when the model is not split."""
    if model.bottom is None:
        return ids
    return bert.bert_apply(model.bottom, model.config, ids, mask)


def precompute_inputs(model: TextModel, table: TokenTable, batch_size: int = 128) -> mx.array:
    """:func:`model_inputs` for every row of ``table``: ``(N, L, d)`` float32 (or the ids
    ``(N, L)`` for an unsplit model). Rows run in batches of similar length, each trimmed to
    :func:`bucket_length`; padding positions hold zeros (the attention mask hides them from
    every later layer and from pooling, so padding never changes a real token's state)."""
    if model.bottom is None:
        return table.ids
    n, width = table.ids.shape
    np_mask = np.array(table.mask)
    order = np.argsort(-np_mask.sum(axis=1), kind="stable")
    out = np.zeros((n, width, model.config.hidden_size), np.float32)
    for start in range(0, n, batch_size):
        rows = np.sort(order[start:start + batch_size])
        length = bucket_length(np_mask[rows])
        idx = mx.array(rows.astype(np.int32))
        h = model_inputs(model, table.ids[idx][:, :length], table.mask[idx][:, :length])
        mx.eval(h)
        out[rows, :length] = np.array(h)
    return mx.array(out)


def precompute_layers(
    params: PyTree, config: bert.BertConfig, table: TokenTable, splits: Sequence[int],
    batch_size: int = 128,
) -> tuple[dict[int, mx.array], mx.array]:
    """One frozen pass over ``table`` recording the states after layer ``k`` for every ``k`` in
    ``splits`` (each ``(N, L, d)``, what :func:`precompute_inputs` gives for ``split=k``, with
    zeros at padding positions) and the final unit-norm sentence embeddings ``(N, d)``. Rows
    run in batches of similar length, each trimmed to :func:`bucket_length` (padding does not
    change the states of real tokens)."""
    layers = params["encoder"]["layer"]
    for k in splits:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(layers):
            raise ValueError(f"splits: expected ints in [0, {len(layers)}), got {k!r}")
    n, width = table.ids.shape
    np_mask = np.array(table.mask)
    order = np.argsort(-np_mask.sum(axis=1), kind="stable")
    d = config.hidden_size
    states = {k: np.zeros((n, width, d), np.float32) for k in splits}
    embs = np.zeros((n, d), np.float32)
    emb_only = {"embeddings": params["embeddings"],
                "encoder": {"layer": [], **_shared_encoder_params(params)}}
    rel = bert.relative_bias_table(params, config)
    for start in range(0, n, batch_size):
        rows = np.sort(order[start:start + batch_size])
        length = bucket_length(np_mask[rows])
        idx = mx.array(rows.astype(np.int32))
        ids, mask = table.ids[idx][:, :length], table.mask[idx][:, :length]
        h = bert.bert_apply(emb_only, config, ids, mask)
        for i, layer in enumerate(layers):
            if i in states:
                mx.eval(h)
                states[i][rows, :length] = np.array(h)
            h = bert.bert_layers([layer], config, h, mask, relative_attention_bias=rel)
        u = bert.mean_pool(h, mask) if config.pooling == "mean" else bert.cls_pool(h)
        u = bert.l2_normalize(u)
        mx.eval(u)
        embs[rows] = np.array(u)
    return {k: mx.array(v) for k, v in states.items()}, mx.array(embs)


def _top_embed(top: PyTree, config: bert.BertConfig, h: mx.array, mask: mx.array,
               prefix: mx.array | None = None) -> mx.array:
    out = bert.bert_layers(top["encoder"]["layer"], config, h, mask, prefix=prefix,
                           relative_attention_bias=bert.relative_bias_table(top, config))
    u = bert.mean_pool(out, mask) if config.pooling == "mean" else bert.cls_pool(out)
    return bert.l2_normalize(u)


def model_embed(
    model: TextModel, adapter: PyTree, x: mx.array, mask: mx.array, key: mx.array | None = None
) -> mx.array:
    """Unit-norm sentence embeddings ``e_phi(x) (B, d)`` of inputs ``x`` (from
    :func:`model_inputs`) with attention ``mask (B, L)``; ``key`` enables adapter dropout."""
    if x.shape[:2] != mask.shape:
        raise ValueError(f"mask: expected shape {x.shape[:2]} (as x's first two axes), "
                         f"got {mask.shape}")
    if model.bottom is None:
        u = model.method.apply(model.top, adapter, bert.sentence_embed, model.config, x, mask,
                               key=key)
        return bert.l2_normalize(u)
    return model.method.apply(model.top, adapter, _top_embed, model.config, x.astype(mx.float32),
                              mask, key=key)


# ----------------------------------------------------------------------------- head and loss


def proto_head(emb: mx.array, y: mx.array, n_classes: int) -> dict[str, mx.array]:
    """Prototype initialization of the cosine head: ``w (C, d)`` the unit-normalized class
    means of ``emb (N, d)`` under labels ``y (N,)`` in ``[0, C)``; ``b (C,)`` zeros. A class
    with no example gets ``w_c = 0``."""
    if emb.ndim != 2 or y.shape != emb.shape[:1]:
        raise ValueError(f"y: expected shape ({emb.shape[0]},) for emb {emb.shape}, got {y.shape}")
    onehot = (y[:, None] == mx.arange(n_classes)[None, :]).astype(emb.dtype)
    means = (onehot.T @ emb) / mx.maximum(mx.sum(onehot, axis=0), 1.0)[:, None]
    return {"w": bert.l2_normalize(means), "b": mx.zeros((n_classes,), dtype=emb.dtype)}


def head_logits(head: dict[str, mx.array], emb: mx.array, scale: float | mx.array) -> mx.array:
    """Cosine-classifier logits ``s * normalize(emb) @ normalize(w)^T + b``: ``(N, C)``."""
    w = bert.l2_normalize(head["w"])
    return scale * (bert.l2_normalize(emb) @ w.T) + head["b"]


def softmax_ce(logits: mx.array, y: mx.array, label_smoothing: float = 0.0) -> mx.array:
    """Mean cross-entropy of ``logits (N, C)`` against labels ``y (N,)`` with label smoothing
    ``eps``: ``(1 - eps) CE(y) + eps * mean_c CE(c)``."""
    if logits.shape[:-1] != y.shape:
        raise ValueError(f"y: expected shape {logits.shape[:-1]}, got {y.shape}")
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logp, y[..., None].astype(mx.int32), axis=-1)[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * mx.mean(logp, axis=-1)
    return mx.mean(nll)


def text_loss(
    model: TextModel, adapter: PyTree, head: dict[str, mx.array], scale: float | mx.array,
    x: mx.array, mask: mx.array, y: mx.array, label_smoothing: float = 0.0,
    key: mx.array | None = None,
) -> mx.array:
    """``CE(head_logits(head, e_phi(x), scale), y)`` (scalar)."""
    return softmax_ce(head_logits(head, model_embed(model, adapter, x, mask, key), scale), y,
                      label_smoothing)


def loo_proto_loss(emb: mx.array, y: mx.array, n_classes: int, scale: float | mx.array) -> mx.array:
    """Leave-one-out prototypical loss over a batch (Snell et al. 2017 with every example as a
    query): ``emb (B, d)``, labels ``y (B,)`` in ``[0, m)`` (``m = n_classes``; every class
    present in the batch at least twice; absent classes are left out of the softmax). For
    example ``i`` the prototype of class ``c`` is the mean
    of the batch's class-``c`` embeddings, without ``i`` itself for its own class:

        p_c^(-i) = (sum_{j: y_j = c} e_j - [c = y_i] e_i) / (n_c - [c = y_i])
        L = mean_i CE(s * cos(e_i, p_.^(-i)), y_i)
    """
    def unit(v: mx.array) -> mx.array:  # differentiable at 0 (absent classes give 0 sums)
        return v * mx.rsqrt(mx.sum(v * v, axis=-1, keepdims=True) + 1e-12)

    e = unit(emb)
    onehot = (y[:, None] == mx.arange(n_classes)[None, :]).astype(e.dtype)  # (B, m)
    sums = onehot.T @ e  # (m, d)
    counts = mx.sum(onehot, axis=0)  # (m,)
    logits = e @ unit(sums).T  # (B, m); the mean's direction is the sum's
    own_logit = mx.sum(e * unit(sums[y] - e), axis=-1)
    logits = mx.where(onehot > 0, own_logit[:, None], logits)
    logits = mx.where(counts[None, :] > 0, scale * logits, -1e9)  # classes absent from the batch
    return softmax_ce(logits, y)


def supcon_loss(emb: mx.array, y: mx.array, scale: float | mx.array) -> mx.array:
    """Supervised contrastive loss (Khosla et al. 2020, the ``L_out`` form) over a batch
    ``emb (B, d)``, labels ``y (B,)``, with cosine similarities at temperature ``1 / scale``.
    Every other example of the same label is a positive, every other example is in the
    denominator:

        L_i = - mean_{p != i, y_p = y_i} log( exp(s cos(e_i, e_p)) / sum_{a != i} exp(s cos(e_i, e_a)) )
        L = mean of L_i over the anchors that have at least one positive.
    """
    if emb.ndim != 2 or y.shape != emb.shape[:1]:
        raise ValueError(f"y: expected shape ({emb.shape[0]},) for emb {emb.shape}, got {y.shape}")
    e = emb * mx.rsqrt(mx.sum(emb * emb, axis=-1, keepdims=True) + 1e-12)
    n = e.shape[0]
    eye = mx.eye(n, dtype=mx.bool_)
    logits = mx.where(eye, -1e9, scale * (e @ e.T))
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    pos = mx.logical_and(y[:, None] == y[None, :], mx.logical_not(eye))
    n_pos = mx.sum(pos, axis=-1).astype(e.dtype)
    per = -mx.sum(mx.where(pos, logp, 0.0), axis=-1) / mx.maximum(n_pos, 1.0)
    has = (n_pos > 0).astype(e.dtype)
    return mx.sum(per * has) / mx.maximum(mx.sum(has), 1.0)


def simcse_loss(e1: mx.array, e2: mx.array, scale: float | mx.array) -> mx.array:
    """Unsupervised contrastive (SimCSE, Gao et al. 2021; the self-supervised stage of CPFT,
    Zhang et al. 2021) loss between two views ``e1 (B, d)``, ``e2 (B, d)`` of the same ``B``
    utterances (row ``i`` of both is one utterance): the other view of an utterance is its
    positive, the other view of every other utterance in the batch a negative. Cosine
    similarities at temperature ``1 / scale``, symmetric in the two views:

        S_ij = s cos(e1_i, e2_j)                                      (B, B)
        L = (mean_i CE(S_i., i) + mean_j CE(S_.j, j)) / 2

    Needs ``B >= 2``. Invariant to the norms of the rows and to permuting the utterances."""
    if e1.ndim != 2 or e1.shape != e2.shape:
        raise ValueError(f"e2: expected the shape of e1 {e1.shape}, got {e2.shape}")
    if e1.shape[0] < 2:
        raise ValueError(f"e1: expected at least 2 utterances (rows), got {e1.shape[0]}")
    u1 = e1 * mx.rsqrt(mx.sum(e1 * e1, axis=-1, keepdims=True) + 1e-12)
    u2 = e2 * mx.rsqrt(mx.sum(e2 * e2, axis=-1, keepdims=True) + 1e-12)
    sim = scale * (u1 @ u2.T)
    target = mx.arange(e1.shape[0])
    return 0.5 * (softmax_ce(sim, target) + softmax_ce(sim.T, target))


@dataclass(frozen=True)
class SimcseConfig:
    """Self-supervised contrastive pre-training of the adapter on unlabelled utterances
    (:func:`simcse_pretrain`): ``epochs`` passes in shuffled minibatches of ``batch_size``
    utterances, Adam at rate ``lr`` with linear warm-up over ``warmup`` of the steps and cosine
    decay, temperature ``1 / scale``; the two views of an utterance are two independent
    ``token_drop`` masks (each real token but the first hidden with that probability) and, when
    the method has adapter dropout, two dropout draws."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    scale: float = 20.0
    token_drop: float = 0.1
    warmup: float = 0.1

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size: expected >= 2 (in-batch negatives), got {self.batch_size!r}")
        for name in ("lr", "scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected a finite positive number, got {v!r}")
        if not 0.0 <= self.token_drop < 1.0:
            raise ValueError(f"token_drop: expected a probability in [0, 1), got {self.token_drop!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup: expected a fraction in [0, 1), got {self.warmup!r}")


def simcse_pretrain(
    model: TextModel, adapter: PyTree, inputs: mx.array, masks: mx.array, cfg: SimcseConfig,
    key: mx.array, log: Callable[[dict[str, float]], None] | None = None,
    log_every: int = 0,
) -> tuple[PyTree, list[dict[str, float]]]:
    """Pre-train ``adapter`` with :func:`simcse_loss` on unlabelled ``inputs (N, L[, d])`` with
    ``masks (N, L)`` (no labels are read). Each step takes ``cfg.batch_size`` utterances, draws
    two token-drop views of each and descends the SimCSE loss between their embeddings.
    Returns ``(adapter, history)`` (mean loss and seconds per epoch; with ``log_every > 0``
    also a record every ``log_every`` steps). ``key`` drives shuffling, masks and dropout."""
    if not isinstance(cfg, SimcseConfig):
        raise TypeError(f"cfg: expected a SimcseConfig, got {type(cfg).__name__}")
    n = int(inputs.shape[0])
    if masks.shape[0] != n:
        raise ValueError(f"masks: expected {n} rows like inputs, got {masks.shape}")
    if n < cfg.batch_size:
        raise ValueError(f"inputs: expected at least cfg.batch_size={cfg.batch_size} rows, got {n}")
    per_epoch = n // cfg.batch_size  # full batches only (the negatives' count stays fixed)
    total = per_epoch * cfg.epochs
    opt = adam(_schedule(cfg.lr, total, int(cfg.warmup * total)))

    def loss_fn(ad: PyTree, x: mx.array, m1: mx.array, m2: mx.array, k: mx.array) -> mx.array:
        k1, k2 = mx.random.split(k)
        return simcse_loss(model_embed(model, ad, x, m1, k1), model_embed(model, ad, x, m2, k2),
                           cfg.scale)

    grad_fn = mx.value_and_grad(loss_fn)
    np_masks = np.array(masks)
    rng = np.random.default_rng([int(v) for v in np.array(key)])
    state = (adapter, opt.init(adapter))
    history: list[dict[str, float]] = []
    step_no = 0
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        perm = rng.permutation(n)
        losses = []
        for b in range(per_epoch):
            rows = np.sort(perm[b * cfg.batch_size:(b + 1) * cfg.batch_size])
            length = bucket_length(np_masks[rows])
            idx = mx.array(rows.astype(np.int32))
            m = np_masks[rows][:, :length]
            views = []
            for _ in range(2):
                keep = rng.random(m.shape) >= cfg.token_drop
                keep[:, 0] = True
                views.append(mx.array((m * keep).astype(np.int32)))
            ad, st = state
            loss, g = grad_fn(ad, inputs[idx][:, :length], views[0], views[1],
                              mx.random.key(int(rng.integers(2**31))))
            u, st = opt.update(g, st, ad)
            state = (apply_updates(ad, u), st)
            mx.eval(state, loss)
            losses.append(float(loss.item()))
            step_no += 1
            if log_every and step_no % log_every == 0 and log is not None:
                log({"step": step_no, "loss": float(np.mean(losses[-log_every:])),
                     "seconds": time.perf_counter() - t0})
        rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)),
               "seconds": time.perf_counter() - t0}
        history.append(rec)
        if log is not None:
            log(rec)
    return state[0], history


# ----------------------------------------------------------------------------- adaptation


@dataclass(frozen=True)
class AdaptConfig:
    """Adapting ``(adapter, head)`` to one task: ``steps`` steps of ``optimizer`` ("sgd" or
    "adam") with rate ``lr`` on the adapter and ``head_lr`` on the head; ``label_smoothing``
    of the support loss; ``proto_grad=False`` cuts the gradient through the prototype
    initialization (only matters for meta-gradients)."""

    steps: int = 10
    lr: float = 1e-3
    head_lr: float = 1e-2
    optimizer: str = "adam"
    label_smoothing: float = 0.0
    proto_grad: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps: expected a non-negative int, got {self.steps!r}")
        for name in ("lr", "head_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: expected a finite non-negative rate, got {v!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer: expected 'sgd' or 'adam', got {self.optimizer!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1), got {self.label_smoothing!r}")


def _opt(name: str, lr: float) -> GradientTransformation:
    return adam(lr) if name == "adam" else sgd(lr)


def adapt_text(
    model: TextModel, adapter: PyTree, log_scale: mx.array, x: mx.array, mask: mx.array,
    y: mx.array, n_way: int, cfg: AdaptConfig, first_order: bool = False,
) -> tuple[PyTree, dict[str, mx.array]]:
    """Adapt to one task with support inputs ``x (N, L[, d])``, ``mask (N, L)``, labels
    ``y (N,)`` in ``[0, n_way)``: head from prototypes, then ``cfg.steps`` optimizer steps on
    cross-entropy. Returns ``(adapter', head')``. Differentiable in ``adapter`` and
    ``log_scale`` (second order unless ``first_order``; use ``optimizer="sgd"`` for MAML)."""
    if not isinstance(cfg, AdaptConfig):
        raise TypeError(f"cfg: expected an AdaptConfig, got {type(cfg).__name__}")
    scale = mx.exp(log_scale)
    head = proto_head(model_embed(model, adapter, x, mask), y, n_way)
    if not cfg.proto_grad:
        head = tree_map(mx.stop_gradient, head)
    if cfg.steps == 0:
        return adapter, head
    opt_a, opt_h = _opt(cfg.optimizer, cfg.lr), _opt(cfg.optimizer, cfg.head_lr)
    state_a, state_h = opt_a.init(adapter), opt_h.init(head)

    def loss(ad: PyTree, hd: dict[str, mx.array]) -> mx.array:
        return text_loss(model, ad, hd, scale, x, mask, y, cfg.label_smoothing)

    grad_fn = mx.grad(loss, argnums=(0, 1))
    for _ in range(cfg.steps):
        g_a, g_h = grad_fn(adapter, head)
        if first_order:
            g_a, g_h = tree_map(mx.stop_gradient, (g_a, g_h))
        u_a, state_a = opt_a.update(g_a, state_a, adapter)
        u_h, state_h = opt_h.update(g_h, state_h, head)
        adapter, head = apply_updates(adapter, u_a), apply_updates(head, u_h)
    return adapter, head


# ----------------------------------------------------------------------------- meta-learning


class MetaParams(NamedTuple):
    """What meta-learning learns: the adapter's initialization and the head's log temperature
    (a scalar array)."""

    adapter: PyTree
    log_scale: mx.array


def meta_init(model: TextModel, key: mx.array, scale: float = 10.0) -> MetaParams:
    """The method's own adapter initialization (LoRA: ``B = 0``, so the model starts as the
    frozen encoder) and ``log_scale = log(scale)``."""
    if not scale > 0:
        raise ValueError(f"scale: expected a positive temperature, got {scale!r}")
    return MetaParams(model.method.init(key, model.top), mx.array(math.log(scale)))


class TextBatch(NamedTuple):
    """Episodes with a leading task axis ``T``: support inputs ``(T, Ns, L[, d])``, masks
    ``(T, Ns, L)``, labels ``(T, Ns)``, and the same for the query set (``Nq``)."""

    support_x: mx.array
    support_mask: mx.array
    support_y: mx.array
    query_x: mx.array
    query_mask: mx.array
    query_y: mx.array


def text_batch(
    inputs: mx.array, masks: mx.array, support_rows: np.ndarray, support_y: np.ndarray,
    query_rows: np.ndarray, query_y: np.ndarray, multiple: int = 8,
) -> TextBatch:
    """Gather episodes from cached rows: ``inputs (N, L[, d])`` (:func:`precompute_inputs`),
    ``masks (N, L)``, row indices ``support_rows (T, Ns)`` / ``query_rows (T, Nq)`` with labels
    of the same shapes; trimmed to one bucketed length for the whole batch."""
    support_rows, query_rows = np.asarray(support_rows), np.asarray(query_rows)
    if support_rows.ndim != 2 or query_rows.ndim != 2:
        raise ValueError(f"support_rows, query_rows: expected (T, N) index arrays, got "
                         f"{support_rows.shape} and {query_rows.shape}")
    if np.shape(support_y) != support_rows.shape or np.shape(query_y) != query_rows.shape:
        raise ValueError("support_y, query_y: expected the shapes of support_rows, query_rows")
    m = np.asarray(masks)
    length = bucket_length(np.concatenate([m[support_rows.ravel()], m[query_rows.ravel()]]),
                           multiple)

    def take(rows: np.ndarray) -> tuple[mx.array, mx.array]:
        idx = mx.array(rows.ravel().astype(np.int32))
        x = inputs[idx][:, :length]
        m = masks[idx][:, :length]
        return x.reshape(*rows.shape, *x.shape[1:]), m.reshape(*rows.shape, length)

    sx, sm = take(support_rows)
    qx, qm = take(query_rows)
    return TextBatch(sx, sm, mx.array(np.asarray(support_y, np.int32)), qx, qm,
                     mx.array(np.asarray(query_y, np.int32)))


def episode_query_loss(
    model: TextModel, meta: MetaParams, sx: mx.array, sm: mx.array, sy: mx.array,
    qx: mx.array, qm: mx.array, qy: mx.array, n_way: int, cfg: AdaptConfig,
    first_order: bool = False,
) -> tuple[mx.array, mx.array]:
    """One task's meta-objective: adapt on the support set, then ``(CE, accuracy)`` on the
    query set with the adapted adapter and head."""
    adapter, head = adapt_text(model, meta.adapter, meta.log_scale, sx, sm, sy, n_way, cfg,
                               first_order)
    logits = head_logits(head, model_embed(model, adapter, qx, qm), mx.exp(meta.log_scale))
    acc = mx.mean((mx.argmax(logits, axis=-1) == qy).astype(mx.float32))
    return softmax_ce(logits, qy), acc


def _vmapped(fn: Callable[..., Any], batch: TextBatch) -> Any:
    return mx.vmap(fn, in_axes=(0, 0, 0, 0, 0, 0))(*batch)


def text_maml_outer(
    model: TextModel, meta: MetaParams, batch: TextBatch, n_way: int, cfg: AdaptConfig,
    first_order: bool = False, learn_scale: bool = True,
) -> tuple[mx.array, MetaParams, mx.array]:
    """(FO)MAML over the adapter (and log temperature): ``(L_meta, grad L_meta, acc)`` with
    ``L_meta = mean_t CE_query_t(adapt_t(meta))`` over the ``T`` tasks of ``batch`` (vmapped).

    Second order by default (nested ``mx.grad`` through ``cfg.steps`` inner steps; use
    ``cfg.optimizer="sgd"``); ``first_order=True`` is FOMAML. ``acc (T,)`` is each task's query
    accuracy after adaptation. ``learn_scale=False`` zeroes the temperature's gradient.
    """
    if not isinstance(batch, TextBatch):
        raise TypeError(f"batch: expected a TextBatch, got {type(batch).__name__}")

    def objective(m: MetaParams) -> tuple[mx.array, mx.array]:
        def task(sx, sm, sy, qx, qm, qy):  # noqa: ANN001, ANN202
            return episode_query_loss(model, m, sx, sm, sy, qx, qm, qy, n_way, cfg, first_order)

        losses, accs = _vmapped(task, batch)
        return mx.mean(losses), accs

    (loss, acc), grads = mx.value_and_grad(objective)(meta)
    if not learn_scale:
        grads = MetaParams(grads.adapter, mx.zeros_like(grads.log_scale))
    return loss, grads, acc


def text_reptile_grad(
    model: TextModel, meta: MetaParams, batch: TextBatch, n_way: int, cfg: AdaptConfig,
) -> tuple[mx.array, MetaParams, mx.array]:
    """Reptile over the adapter: each task adapts on support + query together (from the
    meta-initialization, head from the prototypes of all its examples); returns the query loss
    after adaptation, the pseudo-gradient ``(phi - mean_t phi'_t, 0)`` (the temperature is not
    adapted, so it does not move) and the per-task query accuracy (training accuracy here)."""
    if not isinstance(batch, TextBatch):
        raise TypeError(f"batch: expected a TextBatch, got {type(batch).__name__}")

    def task(sx, sm, sy, qx, qm, qy):  # noqa: ANN001, ANN202
        x = mx.concatenate([sx, qx], axis=0)
        m = mx.concatenate([sm, qm], axis=0)
        y = mx.concatenate([sy, qy], axis=0)
        adapter, head = adapt_text(model, meta.adapter, meta.log_scale, x, m, y, n_way, cfg,
                                   first_order=True)
        logits = head_logits(head, model_embed(model, adapter, qx, qm), mx.exp(meta.log_scale))
        acc = mx.mean((mx.argmax(logits, axis=-1) == qy).astype(mx.float32))
        return adapter, softmax_ce(logits, qy), acc

    adapted, losses, accs = _vmapped(task, batch)
    adapted = tree_map(mx.stop_gradient, adapted)
    pseudo = tree_sub(meta.adapter, tree_mean_axis0(adapted))
    return mx.mean(losses), MetaParams(pseudo, mx.zeros_like(meta.log_scale)), accs


# ----------------------------------------------------------------------------- evaluation


def episode_accuracy(
    model: TextModel, meta: MetaParams, batch: TextBatch, n_way: int, cfg: AdaptConfig,
    vmap: bool = True,
) -> np.ndarray:
    """Query accuracy ``(T,)`` of each task after adapting from ``meta`` on its support set
    (``cfg.steps = 0``: the nearest-prototype classifier of the current encoder)."""

    def task(sx, sm, sy, qx, qm, qy):  # noqa: ANN001, ANN202
        return episode_query_loss(model, meta, sx, sm, sy, qx, qm, qy, n_way, cfg, True)[1]

    if vmap:
        acc = _vmapped(task, batch)
        mx.eval(acc)
        return np.array(acc)
    out = []
    for t in range(batch.support_x.shape[0]):
        a = task(*(f[t] for f in batch))
        mx.eval(a)
        out.append(float(a.item()))
    return np.array(out)


def proto_accuracy(
    support_emb: np.ndarray, support_y: np.ndarray, query_emb: np.ndarray, query_y: np.ndarray,
    n_way: int,
) -> np.ndarray:
    """Nearest-prototype (cosine) query accuracy per task from fixed embeddings:
    ``support_emb (T, Ns, d)``, ``query_emb (T, Nq, d)``, labels ``(T, Ns)`` / ``(T, Nq)``;
    returns ``(T,)``. The frozen-encoder baseline (no gradient step)."""
    s, q = np.asarray(support_emb, np.float64), np.asarray(query_emb, np.float64)
    if s.ndim != 3 or q.ndim != 3:
        raise ValueError(f"support_emb, query_emb: expected (T, N, d), got {s.shape}, {q.shape}")
    onehot = (np.asarray(support_y)[..., None] == np.arange(n_way)).astype(np.float64)
    protos = np.einsum("tnc,tnd->tcd", onehot, s) / np.maximum(onehot.sum(1), 1)[..., None]
    protos /= np.maximum(np.linalg.norm(protos, axis=-1, keepdims=True), 1e-12)
    qn = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    pred = np.einsum("tqd,tcd->tqc", qn, protos).argmax(-1)
    return (pred == np.asarray(query_y)).mean(axis=1)


# ----------------------------------------------------------------------------- standard protocol


@dataclass(frozen=True)
class FinetuneConfig:
    """Supervised fine-tuning of ``(adapter, head)`` on a labelled few-shot set (the standard
    150-way protocol): ``epochs`` passes in shuffled minibatches of ``batch_size``, Adam with
    rate ``lr`` (adapter) / ``head_lr`` (head), linear warm-up over ``warmup`` of the steps and
    cosine decay; cosine head with temperature ``scale``; ``label_smoothing``; decoupled
    ``weight_decay`` of the adapter; adapter dropout when the method has it (a key is passed).

    ``token_drop`` (augmentation): each real token of a training utterance is hidden from the
    adapted layers and the pooling with this probability (attention mask set to 0; the first
    token is always kept), a fresh mask every step.

    ``proto_weight > 0`` adds ``proto_weight *`` :func:`loo_proto_loss` (same temperature) and
    makes the minibatches class-balanced: ``classes_per_batch`` classes with all their
    examples (``batch_size`` is then unused; needs at least 2 examples per class).
    ``con_weight > 0`` adds ``con_weight *`` :func:`supcon_loss` (same temperature) with the
    same class-balanced minibatches; ``ce_weight`` scales the head's cross-entropy (``0``
    with ``con_weight > 0``: a purely contrastive stage that leaves the head as it is, as in
    SetFit / CPFT before the classifier is fitted)."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    head_lr: float = 1e-2
    scale: float = 20.0
    label_smoothing: float = 0.0
    warmup: float = 0.1
    weight_decay: float = 0.0
    token_drop: float = 0.0
    proto_weight: float = 0.0
    classes_per_batch: int = 16
    con_weight: float = 0.0
    ce_weight: float = 1.0

    @property
    def balanced(self) -> bool:
        """Whether minibatches are class-balanced (a prototypical or contrastive term)."""
        return bool(self.proto_weight or self.con_weight)

    def __post_init__(self) -> None:
        for name in ("con_weight", "ce_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: expected a non-negative number, got {v!r}")
        if not (self.ce_weight or self.proto_weight or self.con_weight):
            raise ValueError("ce_weight, proto_weight, con_weight: at least one must be positive")
        if not (math.isfinite(self.proto_weight) and self.proto_weight >= 0):
            raise ValueError(f"proto_weight: expected a non-negative number, got {self.proto_weight!r}")
        if isinstance(self.classes_per_batch, bool) or not isinstance(self.classes_per_batch, int) \
                or self.classes_per_batch < 2:
            raise ValueError(f"classes_per_batch: expected an int >= 2, got {self.classes_per_batch!r}")
        if not 0.0 <= self.token_drop < 1.0:
            raise ValueError(f"token_drop: expected a probability in [0, 1), got {self.token_drop!r}")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        for name in ("lr", "head_lr", "scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: expected a finite non-negative number, got {v!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup: expected a fraction in [0, 1), got {self.warmup!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1), got {self.label_smoothing!r}")


def _schedule(peak: float, total: int, warmup: int) -> Callable[[mx.array], mx.array]:
    from metafn.optim import warmup_cosine_schedule

    return warmup_cosine_schedule(peak, warmup, max(total - warmup, 1), 0.0)


def finetune(
    model: TextModel, adapter: PyTree, head: dict[str, mx.array], inputs: mx.array,
    masks: mx.array, y: mx.array, cfg: FinetuneConfig, key: mx.array,
    log: Callable[[dict[str, float]], None] | None = None,
) -> tuple[PyTree, dict[str, mx.array], list[dict[str, float]]]:
    """Fine-tune ``(adapter, head)`` on ``inputs (N, L[, d])``, ``masks (N, L)``, ``y (N,)``.

    Returns ``(adapter, head, history)``; history holds the mean training loss and seconds per
    epoch. ``key`` drives shuffling and dropout. The update ``state -> state`` of each
    minibatch is pure; this loop only draws the batches.
    """
    if not isinstance(cfg, FinetuneConfig):
        raise TypeError(f"cfg: expected a FinetuneConfig, got {type(cfg).__name__}")
    n = int(inputs.shape[0])
    if masks.shape[0] != n or y.shape != (n,):
        raise ValueError(f"masks, y: expected {n} rows like inputs, got {masks.shape}, {y.shape}")
    np_y = np.array(y)
    classes = np.unique(np_y)
    if cfg.balanced:
        counts = np.bincount(np_y)[classes]
        if counts.min() < 2:
            raise ValueError("cfg.proto_weight / con_weight: the prototypical and contrastive "
                             "losses need >= 2 examples per class")
        per_epoch = -(-len(classes) // cfg.classes_per_batch)
    else:
        per_epoch = -(-n // cfg.batch_size)
    total = per_epoch * cfg.epochs
    warm = int(cfg.warmup * total)
    opt_a = adam(_schedule(cfg.lr, total, warm))
    opt_h = adam(_schedule(cfg.head_lr, total, warm))
    state = (adapter, head, opt_a.init(adapter), opt_h.init(head))

    def loss_fn(ad: PyTree, hd: dict[str, mx.array], x: mx.array, m: mx.array, yy: mx.array,
                k: mx.array, local: mx.array) -> mx.array:
        emb = model_embed(model, ad, x, m, k)
        loss = mx.array(0.0)
        if cfg.ce_weight:
            loss = cfg.ce_weight * softmax_ce(head_logits(hd, emb, cfg.scale), yy,
                                              cfg.label_smoothing)
        if cfg.con_weight:
            loss = loss + cfg.con_weight * supcon_loss(emb, yy, cfg.scale)
        if cfg.proto_weight:
            loss = loss + cfg.proto_weight * loo_proto_loss(emb, local, cfg.classes_per_batch,
                                                            cfg.scale)
        return loss

    grad_fn = mx.value_and_grad(loss_fn, argnums=(0, 1))

    def step(st: tuple, x: mx.array, m: mx.array, yy: mx.array, k: mx.array,
             local: mx.array) -> tuple[tuple, mx.array]:
        ad, hd, sa, sh = st
        loss, (ga, gh) = grad_fn(ad, hd, x, m, yy, k, local)
        ua, sa = opt_a.update(ga, sa, ad)
        uh, sh = opt_h.update(gh, sh, hd)
        if cfg.weight_decay:
            ua = tree_map(lambda u, p: u - cfg.lr * cfg.weight_decay * p, ua, ad)
        return (apply_updates(ad, ua), apply_updates(hd, uh), sa, sh), loss

    np_masks = np.array(masks)
    rng = np.random.default_rng([int(v) for v in np.array(key)])
    history = []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        perm = rng.permutation(len(classes) if cfg.balanced else n)
        losses = []
        for b in range(per_epoch):
            if cfg.balanced:
                chosen = classes[perm[b * cfg.classes_per_batch:(b + 1) * cfg.classes_per_batch]]
                rows = np.flatnonzero(np.isin(np_y, chosen))
                local_np = np.searchsorted(np.sort(chosen), np_y[rows])
            else:
                rows = np.sort(perm[b * cfg.batch_size:(b + 1) * cfg.batch_size])
                local_np = np.zeros(len(rows), np.int64)
            length = bucket_length(np_masks[rows])
            idx = mx.array(rows.astype(np.int32))
            k = mx.random.key(int(rng.integers(2**31)))
            m = masks[idx][:, :length]
            if cfg.token_drop:
                keep = rng.random(m.shape) >= cfg.token_drop
                keep[:, 0] = True
                m = m * mx.array(keep.astype(np.int32))
            state, loss = step(state, inputs[idx][:, :length], m, y[idx], k,
                               mx.array(local_np.astype(np.int32)))
            mx.eval(state, loss)
            losses.append(float(loss.item()))
        rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)),
               "seconds": time.perf_counter() - t0}
        history.append(rec)
        if log is not None:
            log(rec)
    return state[0], state[1], history


def embed_all(
    model: TextModel, adapter: PyTree, inputs: mx.array, masks: mx.array, batch_size: int = 128,
) -> mx.array:
    """Sentence embeddings ``(N, d)`` of every row of ``inputs`` (evaluated; batches of similar
    length, each trimmed to :func:`bucket_length`)."""
    np_masks = np.array(masks)
    order = np.argsort(-np_masks.sum(axis=1), kind="stable")
    out = np.zeros((inputs.shape[0], model.config.hidden_size), np.float32)
    for start in range(0, len(order), batch_size):
        rows = np.sort(order[start:start + batch_size])
        length = bucket_length(np_masks[rows])
        idx = mx.array(rows.astype(np.int32))
        emb = model_embed(model, adapter, inputs[idx][:, :length], masks[idx][:, :length])
        mx.eval(emb)
        out[rows] = np.array(emb)
    return mx.array(out)


def predict_logits(
    model: TextModel, adapter: PyTree, head: dict[str, mx.array], scale: float,
    inputs: mx.array, masks: mx.array, batch_size: int = 128,
) -> np.ndarray:
    """Head logits ``(N, C)`` for every row of ``inputs`` (via :func:`embed_all`)."""
    emb = embed_all(model, adapter, inputs, masks, batch_size)
    return np.array(head_logits(head, emb, scale))


def accuracy_np(logits: np.ndarray, y: np.ndarray | mx.array) -> float:
    """Fraction of rows of ``logits (N, C)`` whose arg-max equals ``y (N,)``."""
    return float((np.asarray(logits).argmax(-1) == np.asarray(y)).mean())


def pseudo_label(prob: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced pseudo-labels for self-training on an unlabelled pool: ``prob (N, C)``
    are a classifier's class probabilities for the ``N`` pool rows; for every class ``c`` keep
    the (at most) ``per_class`` rows whose arg-max is ``c`` with the highest ``max prob``.

    Returns ``(rows (M,), labels (M,))``, ``M <= C * per_class``, grouped by class, each group
    in decreasing confidence (ties by row order). A row is kept at most once."""
    p = np.asarray(prob)
    if p.ndim != 2:
        raise ValueError(f"prob: expected (N, C) probabilities, got shape {p.shape}")
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class: expected a positive int, got {per_class!r}")
    pred, conf = p.argmax(-1), p.max(-1)
    rows = []
    for c in range(p.shape[1]):
        r = np.flatnonzero(pred == c)
        rows.append(r[np.argsort(-conf[r], kind="stable")[:per_class]])
    out = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return out, pred[out]
