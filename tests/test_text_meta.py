"""Text meta-learning (metafn.text_meta) on a tiny random encoder: split encoder equals the whole,
prototype head, (FO)MAML / Reptile invariants, finite-difference meta-gradient, vmap = loop."""

from __future__ import annotations

import metafn  # noqa: F401  (before mlx)
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typeguard import TypeCheckError

from metafn import peft
from metafn import text_meta as tm
from metafn.nn import bert
from metafn.tree import tree_flatten, tree_map

CFG = bert.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=16, max_seq_length=12,
                      pooling="mean", normalize=True)
N_WAY = 3


@pytest.fixture(scope="module")
def params():
    return bert.bert_init(mx.random.key(0), CFG)


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    n, width = 36, 12
    lens = rng.integers(3, width + 1, n)
    ids = rng.integers(5, 40, (n, width)).astype(np.int32)
    mask = (np.arange(width)[None] < lens[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0)
    return tm.TokenTable(mx.array(ids), mx.array(mask))


def _lora(r: int = 2) -> peft.PeftMethod:
    return peft.lora_method(peft.LoraConfig(r=r, alpha=2.0 * r), unmerged=True)


def _nonzero_lora(model: tm.TextModel, key: int = 1) -> tm.MetaParams:
    meta = tm.meta_init(model, mx.random.key(key), scale=5.0)
    ks = iter(mx.random.split(mx.random.key(key + 100), 64))
    ad = {n: {"a": v["a"], "b": 0.3 * mx.random.normal(v["b"].shape, key=next(ks))}
          for n, v in meta.adapter.items()}
    return tm.MetaParams(ad, meta.log_scale)


def _batch(model: tm.TextModel, table: tm.TokenTable, tasks: int = 2, k: int = 2, q: int = 2) -> tm.TextBatch:
    x = tm.precompute_inputs(model, table)
    per = N_WAY * (k + q)
    s_rows, q_rows = [], []
    for t in range(tasks):
        base = t * per
        s_rows.append([base + c * (k + q) + i for c in range(N_WAY) for i in range(k)])
        q_rows.append([base + c * (k + q) + k + i for c in range(N_WAY) for i in range(q)])
    sy = np.tile(np.repeat(np.arange(N_WAY), k), (tasks, 1))
    qy = np.tile(np.repeat(np.arange(N_WAY), q), (tasks, 1))
    return tm.text_batch(x, table.mask, np.array(s_rows), sy, np.array(q_rows), qy)


def _close(a, b, tol=1e-5):
    for (ka, va), (_, vb) in zip(tree_flatten(a), tree_flatten(b)):
        np.testing.assert_allclose(np.array(va), np.array(vb), atol=tol, rtol=tol, err_msg=ka)


# ----------------------------------------------------------------------------- encoder split


@pytest.mark.parametrize("split", [0, 1, 2, None])
def test_split_encoder_equals_whole(params, table, split):
    model = tm.text_model(params, CFG, None, split)
    x = tm.precompute_inputs(model, table)
    got = tm.model_embed(model, {}, x, table.mask)
    want = bert.sentence_embed(params, CFG, table.ids, table.mask)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)


def test_precompute_layers_matches_bottom(params, table):
    states, emb = tm.precompute_layers(params, CFG, table, (1, 2), batch_size=7)
    mask = np.array(table.mask)[..., None].astype(bool)
    for k in (1, 2):
        model = tm.text_model(params, CFG, None, k)
        want = np.array(tm.precompute_inputs(model, table))
        np.testing.assert_allclose(np.where(mask, np.array(states[k]), 0), np.where(mask, want, 0),
                                   atol=1e-5)
    np.testing.assert_allclose(np.array(emb), np.array(bert.sentence_embed(
        params, CFG, table.ids, table.mask)), atol=1e-5)


def test_lora_init_is_the_frozen_encoder(params, table):
    model = tm.text_model(params, CFG, _lora(), 1)
    meta = tm.meta_init(model, mx.random.key(3))
    x = tm.precompute_inputs(model, table)
    frozen = tm.text_model(params, CFG, None, 1)
    np.testing.assert_allclose(np.array(tm.model_embed(model, meta.adapter, x, table.mask)),
                               np.array(tm.model_embed(frozen, {}, x, table.mask)), atol=1e-6)


def test_text_model_errors(params):
    with pytest.raises(ValueError, match="split"):
        tm.text_model(params, CFG, _lora(), 3)
    with pytest.raises(ValueError, match="split"):
        tm.text_model(params, CFG, peft.prompt_method(peft.PromptConfig(n_tokens=2)), 1)
    with pytest.raises((TypeError, TypeCheckError), match="method"):
        tm.text_model(params, CFG, "lora", 1)
    with pytest.raises(ValueError, match="steps"):
        tm.AdaptConfig(steps=-1)
    with pytest.raises(ValueError, match="optimizer"):
        tm.AdaptConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="support_rows"):
        tm.text_batch(mx.zeros((4, 8, 16)), mx.ones((4, 8)), np.zeros(3, int), np.zeros(3, int),
                      np.zeros((1, 3), int), np.zeros((1, 3), int))


@given(st.lists(st.integers(1, 32), min_size=1, max_size=6), st.sampled_from([4, 8]))
def test_bucket_length_keeps_every_token(lengths, multiple):
    mask = (np.arange(32)[None] < np.array(lengths)[:, None]).astype(np.int32)
    b = tm.bucket_length(mask, multiple)
    assert max(lengths) <= b <= 32
    assert b % multiple == 0 or b == 32


# ----------------------------------------------------------------------------- head


def test_proto_head_is_nearest_prototype(params, table):
    model = tm.text_model(params, CFG, None, 1)
    batch = _batch(model, table)
    cfg0 = tm.AdaptConfig(steps=0)
    meta = tm.meta_init(model, mx.random.key(0))
    acc = tm.episode_accuracy(model, meta, batch, N_WAY, cfg0)
    emb = lambda x, m: np.array(tm.model_embed(model, {}, x.reshape(-1, *x.shape[2:]),  # noqa: E731
                                               m.reshape(-1, m.shape[-1]))).reshape(*x.shape[:2], -1)
    want = tm.proto_accuracy(emb(batch.support_x, batch.support_mask), np.array(batch.support_y),
                             emb(batch.query_x, batch.query_mask), np.array(batch.query_y), N_WAY)
    np.testing.assert_allclose(acc, want)
    e = mx.array(np.random.default_rng(1).normal(size=(6, 16)).astype(np.float32))
    head = tm.proto_head(e, mx.array([0, 0, 1, 1, 2, 2]), N_WAY)
    np.testing.assert_allclose(np.linalg.norm(np.array(head["w"]), axis=1), 1.0, atol=1e-6)
    assert np.all(np.array(head["b"]) == 0)


def test_softmax_ce_label_smoothing():
    logits = mx.array([[2.0, 0.0, -1.0]])
    y = mx.array([0])
    logp = np.log(np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum())
    assert abs(float(tm.softmax_ce(logits, y).item()) + logp[0]) < 1e-6
    want = -(0.9 * logp[0] + 0.1 * logp.mean())
    assert abs(float(tm.softmax_ce(logits, y, 0.1).item()) - want) < 1e-6


# ----------------------------------------------------------------------------- meta-gradients


def test_maml_zero_steps_is_query_gradient(params, table):
    model = tm.text_model(params, CFG, _lora(), 1)
    meta = _nonzero_lora(model)
    batch = _batch(model, table, tasks=1)
    cfg = tm.AdaptConfig(steps=0, optimizer="sgd")
    loss, grads, _ = tm.text_maml_outer(model, meta, batch, N_WAY, cfg)

    def direct(m):
        sx, sm, sy, qx, qm, qy = (f[0] for f in batch)
        head = tm.proto_head(tm.model_embed(model, m.adapter, sx, sm), sy, N_WAY)
        return tm.text_loss(model, m.adapter, head, mx.exp(m.log_scale), qx, qm, qy)

    want_loss, want = mx.value_and_grad(direct)(meta)
    assert abs(float(loss.item()) - float(want_loss.item())) < 1e-5
    _close(grads, want, 1e-4)


def test_maml_meta_gradient_matches_finite_differences(params, table):
    model = tm.text_model(params, CFG, _lora(), 1)
    meta = _nonzero_lora(model)
    batch = _batch(model, table, tasks=2)
    cfg = tm.AdaptConfig(steps=2, lr=0.5, head_lr=0.5, optimizer="sgd")
    _, grads, _ = tm.text_maml_outer(model, meta, batch, N_WAY, cfg)
    direction = tree_map(lambda g: mx.random.normal(g.shape, key=mx.random.key(g.size)), grads)

    def f(eps: float) -> float:
        m = tree_map(lambda p, d: p + eps * d, meta, direction)
        return float(tm.text_maml_outer(model, m, batch, N_WAY, cfg)[0].item())

    eps = 1e-2
    fd = (f(eps) - f(-eps)) / (2 * eps)
    analytic = sum(float(mx.sum(g * d).item()) for (_, g), (_, d)
                   in zip(tree_flatten(grads), tree_flatten(direction)))
    assert abs(fd - analytic) <= 2e-2 * abs(analytic) + 1e-4, (fd, analytic)
    _, fo, _ = tm.text_maml_outer(model, meta, batch, N_WAY, cfg, first_order=True)
    diff = max(float(mx.max(mx.abs(a - b)).item()) for (_, a), (_, b)
               in zip(tree_flatten(grads), tree_flatten(fo)))
    assert diff > 1e-6  # the second-order term is not zero


def test_vmap_over_tasks_equals_loop(params, table):
    model = tm.text_model(params, CFG, _lora(), 1)
    meta = _nonzero_lora(model)
    batch = _batch(model, table, tasks=3)
    cfg = tm.AdaptConfig(steps=1, lr=0.3, head_lr=0.3, optimizer="sgd")
    loss, grads, acc = tm.text_maml_outer(model, meta, batch, N_WAY, cfg)
    per = [tm.text_maml_outer(model, meta, tm.TextBatch(*(f[t:t + 1] for f in batch)), N_WAY, cfg)
           for t in range(3)]
    assert abs(float(loss.item()) - np.mean([float(p[0].item()) for p in per])) < 1e-5
    _close(grads, tree_map(lambda *g: sum(g) / 3, *[p[1] for p in per]), 1e-4)
    np.testing.assert_allclose(np.array(acc), [float(p[2][0].item()) for p in per])
    acfg = tm.AdaptConfig(steps=2, lr=1e-2, head_lr=1e-2, optimizer="adam")
    np.testing.assert_allclose(tm.episode_accuracy(model, meta, batch, N_WAY, acfg),
                               tm.episode_accuracy(model, meta, batch, N_WAY, acfg, vmap=False))


def test_reptile_pseudo_gradient(params, table):
    model = tm.text_model(params, CFG, _lora(), 1)
    meta = _nonzero_lora(model)
    batch = _batch(model, table, tasks=2)
    _, g0, _ = tm.text_reptile_grad(model, meta, batch, N_WAY, tm.AdaptConfig(steps=0))
    assert all(float(mx.max(mx.abs(v)).item()) == 0.0 for _, v in tree_flatten(g0))
    cfg = tm.AdaptConfig(steps=1, lr=0.1, head_lr=0.1, optimizer="sgd")
    _, g, _ = tm.text_reptile_grad(model, meta, batch, N_WAY, cfg)
    # one SGD step: phi - phi' = lr * mean_t grad L_t(phi) on support + query
    def task_grad(t):
        f = [v[t] for v in batch]
        x = mx.concatenate([f[0], f[3]]); m = mx.concatenate([f[1], f[4]])  # noqa: E702
        y = mx.concatenate([f[2], f[5]])
        head = tm.proto_head(tm.model_embed(model, meta.adapter, x, m), y, N_WAY)
        return mx.grad(lambda ad: tm.text_loss(model, ad, head, mx.exp(meta.log_scale), x, m, y))(
            meta.adapter)
    want = tree_map(lambda a, b: 0.1 * (a + b) / 2, task_grad(0), task_grad(1))
    _close(g.adapter, want, 1e-4)
    assert float(g.log_scale.item()) == 0.0


# ----------------------------------------------------------------------------- fine-tuning


def test_finetune_fits_and_is_deterministic(params, table):
    model = tm.text_model(params, CFG, _lora(), 1)
    x = tm.precompute_inputs(model, table)
    y = mx.array(np.arange(36) % N_WAY, dtype=mx.int32)
    ad0 = tm.meta_init(model, mx.random.key(0)).adapter
    head = tm.proto_head(tm.model_embed(model, ad0, x, table.mask), y, N_WAY)
    cfg = tm.FinetuneConfig(epochs=4, batch_size=12, lr=1e-2, head_lr=5e-2, scale=10.0)
    ad, hd, hist = tm.finetune(model, ad0, head, x, table.mask, y, cfg, mx.random.key(5))
    assert hist[-1]["loss"] < hist[0]["loss"]
    before = tm.accuracy_np(tm.predict_logits(model, ad0, head, 10.0, x, table.mask), y)
    after = tm.accuracy_np(tm.predict_logits(model, ad, hd, 10.0, x, table.mask), y)
    assert after >= before
    ad2, _, _ = tm.finetune(model, ad0, head, x, table.mask, y, cfg, mx.random.key(5))
    _close(ad, ad2, 0.0)


def test_loo_proto_loss_matches_explicit():
    rng = np.random.default_rng(3)
    e = rng.normal(size=(8, 5)).astype(np.float32)
    y = np.array([0, 0, 1, 1, 1, 2, 2, 0])
    got = float(tm.loo_proto_loss(mx.array(e), mx.array(y), 3, 4.0).item())
    en = e / np.linalg.norm(e, axis=1, keepdims=True)
    total = 0.0
    for i in range(8):
        logits = []
        for c in range(3):
            members = [j for j in range(8) if y[j] == c and j != i]
            p = en[members].mean(0)
            p /= np.linalg.norm(p)
            logits.append(4.0 * en[i] @ p)
        logits = np.array(logits)
        total += np.log(np.exp(logits).sum()) - logits[y[i]]
    assert abs(got - total / 8) < 1e-4


def test_finetune_with_proto_loss_runs(params, table):
    model = tm.text_model(params, CFG, _lora(), 1)
    x = tm.precompute_inputs(model, table)
    y = mx.array(np.arange(36) % N_WAY, dtype=mx.int32)
    ad0 = tm.meta_init(model, mx.random.key(0)).adapter
    head = tm.proto_head(tm.model_embed(model, ad0, x, table.mask), y, N_WAY)
    cfg = tm.FinetuneConfig(epochs=3, lr=1e-2, head_lr=5e-2, scale=10.0, proto_weight=1.0,
                            classes_per_batch=2, token_drop=0.1)
    _, _, hist = tm.finetune(model, ad0, head, x, table.mask, y, cfg, mx.random.key(5))
    assert len(hist) == 3 and all(np.isfinite(h["loss"]) for h in hist)
    with pytest.raises(ValueError, match="proto_weight"):
        tm.finetune(model, ad0, head, x[:4], table.mask[:4], mx.array([0, 1, 2, 0], dtype=mx.int32),
                    cfg, mx.random.key(5))


def test_supcon_loss_matches_explicit():
    rng = np.random.default_rng(4)
    e = rng.normal(size=(9, 5)).astype(np.float32)
    y = np.array([0, 0, 1, 1, 1, 2, 0, 3, 2])  # class 3 has no positive: not an anchor
    s = 5.0
    got = float(tm.supcon_loss(mx.array(e), mx.array(y), s).item())
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = s * u @ u.T
    total, anchors = 0.0, 0
    for i in range(9):
        others = [a for a in range(9) if a != i]
        lse = np.log(np.exp(sim[i, others]).sum())
        pos = [p for p in others if y[p] == y[i]]
        if not pos:
            continue
        total += np.mean([lse - sim[i, p] for p in pos])
        anchors += 1
    assert abs(got - total / anchors) < 1e-4
    # well separated classes give a lower loss than shuffled ones
    sep = np.eye(5, dtype=np.float32)[y % 5] + 0.01 * e
    assert tm.supcon_loss(mx.array(sep), mx.array(y), s).item() < got


def test_finetune_contrastive_stage(params, table):
    model = tm.text_model(params, CFG, _lora(), 1)
    x = tm.precompute_inputs(model, table)
    y = mx.array(np.arange(36) % N_WAY, dtype=mx.int32)
    ad0 = tm.meta_init(model, mx.random.key(0)).adapter
    head = tm.proto_head(tm.model_embed(model, ad0, x, table.mask), y, N_WAY)
    cfg = tm.FinetuneConfig(epochs=3, lr=1e-2, head_lr=5e-2, scale=10.0, con_weight=1.0,
                            ce_weight=0.0, classes_per_batch=2)
    ad, hd, hist = tm.finetune(model, ad0, head, x, table.mask, y, cfg, mx.random.key(5))
    assert len(hist) == 3 and all(np.isfinite(h["loss"]) for h in hist)
    _close(hd, head, 0.0)  # no cross-entropy: the head does not move
    assert any(float(mx.abs(v["b"]).max().item()) > 0 for v in ad.values())
    with pytest.raises(ValueError, match="at least one"):
        tm.FinetuneConfig(ce_weight=0.0)
    with pytest.raises(ValueError, match="con_weight"):
        tm.FinetuneConfig(con_weight=-1.0)


def test_simcse_loss_matches_numpy_and_invariances():
    rng = np.random.default_rng(7)
    e1 = rng.normal(size=(6, 5)).astype(np.float32)
    e2 = (e1 + 0.3 * rng.normal(size=(6, 5))).astype(np.float32)
    s = 4.0
    got = float(tm.simcse_loss(mx.array(e1), mx.array(e2), s).item())
    u1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    u2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    sim = s * u1 @ u2.T
    row = np.mean([np.log(np.exp(sim[i]).sum()) - sim[i, i] for i in range(6)])
    col = np.mean([np.log(np.exp(sim[:, j]).sum()) - sim[j, j] for j in range(6)])
    assert abs(got - 0.5 * (row + col)) < 1e-4
    # invariant to row norms, to permuting the utterances and to swapping the views
    perm = rng.permutation(6)
    norms = rng.uniform(0.5, 3.0, (6, 1)).astype(np.float32)
    for a, b in ((e1 * norms, e2), (e1[perm], e2[perm]), (e2, e1)):
        assert abs(float(tm.simcse_loss(mx.array(a), mx.array(b), s).item()) - got) < 1e-4
    # matched views score lower than mismatched ones
    assert float(tm.simcse_loss(mx.array(e1), mx.array(e1), s).item()) < got
    assert float(tm.simcse_loss(mx.array(e1), mx.array(e2[::-1].copy()), s).item()) > got
    with pytest.raises(ValueError, match="e2"):
        tm.simcse_loss(mx.array(e1), mx.array(e2[:5]), s)
    with pytest.raises(ValueError, match="e1"):
        tm.simcse_loss(mx.array(e1[:1]), mx.array(e2[:1]), s)


def test_simcse_pretrain_lowers_loss_and_uses_no_labels(params, table):
    model = tm.text_model(params, CFG, _lora(), 1)
    x = tm.precompute_inputs(model, table)
    ad0 = tm.meta_init(model, mx.random.key(0)).adapter
    cfg = tm.SimcseConfig(epochs=8, batch_size=12, lr=3e-2, scale=10.0, token_drop=0.2)
    ad, hist = tm.simcse_pretrain(model, ad0, x, table.mask, cfg, mx.random.key(3))
    assert len(hist) == 8 and all(np.isfinite(h["loss"]) for h in hist)
    # the loss on two fixed token-drop views of all 36 utterances goes down
    rng = np.random.default_rng(11)
    m = np.array(table.mask)
    views = [mx.array(m * np.where(np.arange(m.shape[1]) == 0, 1, rng.random(m.shape) >= 0.2))
             for _ in range(2)]

    def fixed_loss(a):
        return float(tm.simcse_loss(tm.model_embed(model, a, x, views[0]),
                                    tm.model_embed(model, a, x, views[1]), 10.0).item())

    assert fixed_loss(ad) < fixed_loss(ad0)
    assert any(float(mx.abs(v["b"]).max().item()) > 0 for v in ad.values())
    ad2, _ = tm.simcse_pretrain(model, ad0, x, table.mask, cfg, mx.random.key(3))
    _close(ad, ad2, 0.0)  # deterministic given the key
    with pytest.raises(ValueError, match="batch_size"):
        tm.SimcseConfig(batch_size=1)
    with pytest.raises(ValueError, match="token_drop"):
        tm.SimcseConfig(token_drop=1.0)
    with pytest.raises(ValueError, match="inputs"):
        tm.simcse_pretrain(model, ad0, x[:5], table.mask[:5], cfg, mx.random.key(3))


def test_pseudo_label_is_class_balanced_and_most_confident():
    prob = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.7, 0.2, 0.1], [0.2, 0.7, 0.1],
                     [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    rows, lab = tm.pseudo_label(prob, 2)
    np.testing.assert_array_equal(rows, [0, 2, 3, 4])  # class 0: 0.9, 0.7 (not 0.6, 0.5)
    np.testing.assert_array_equal(lab, [0, 0, 1, 2])
    rows, lab = tm.pseudo_label(prob, 10)
    assert sorted(rows.tolist()) == list(range(6))
    np.testing.assert_array_equal(lab, prob[rows].argmax(-1))
    with pytest.raises(ValueError, match="per_class"):
        tm.pseudo_label(prob, 0)
    with pytest.raises(ValueError, match="prob"):
        tm.pseudo_label(prob[0], 1)
