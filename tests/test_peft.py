"""PEFT methods as pure functions: LoRA / DoRA / AdaLoRA / QLoRA / prompt / prefix / baselines."""

from __future__ import annotations

import json
import warnings

import metafn  # noqa: F401  (before mlx)
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from metafn import peft
from metafn.nn import bert
from metafn.nn.mlp import mlp_apply, mlp_init
from metafn.tree import tree_count, tree_flatten, tree_leaves

TINY = bert.BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=24, max_seq_length=24)


@pytest.fixture(scope="module")
def tiny_bert():
    params = bert.bert_init(mx.random.key(0), TINY)
    ids = mx.random.randint(1, 50, (3, 6), key=mx.random.key(1))
    mask = mx.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]], dtype=mx.int32)
    return params, ids, mask


def embed(p, *args, **kw):
    return bert.sentence_embed(p, TINY, *args, **kw)


def close(a, b, tol=1e-5):
    return float(mx.max(mx.abs(a - b)).item()) <= tol


# ----------------------------------------------------------------------------- LoRA


@given(
    sizes=st.lists(st.integers(2, 9), min_size=2, max_size=4),
    r=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    init=st.sampled_from(["kaiming", "gaussian"]),
)
def test_lora_invariants_mlp(sizes, r, seed, init):
    r = min(r, min(sizes))
    params = mlp_init(mx.random.key(seed), sizes)
    cfg = peft.LoraConfig(r=r, alpha=2.0 * r + 1, target_modules="all-linear", init=init)
    ad = peft.lora_init(mx.random.key(seed + 1), params, cfg)
    x = mx.random.normal((5, sizes[0]), key=mx.random.key(seed + 2))
    # B = 0 is the identity
    assert mx.array_equal(peft.lora_apply(params, ad, cfg, mlp_apply, x), mlp_apply(params, x))
    # trainable count r (d_in + d_out) per target
    assert peft.lora_num_params(ad) == sum(r * (a + b) for a, b in zip(sizes[:-1], sizes[1:]))
    assert all(v["a"].shape == (a, r) and v["b"].shape == (r, b)
               for v, (a, b) in zip(ad.values(), zip(sizes[:-1], sizes[1:])))
    # with B != 0: merge-then-apply equals apply, and equals the explicit formula per layer
    ad2 = {n: {"a": v["a"], "b": 0.3 * mx.random.normal(v["b"].shape, key=mx.random.key(seed + 3))}
           for n, v in ad.items()}
    y = peft.lora_apply(params, ad2, cfg, mlp_apply, x)
    assert close(y, mlp_apply(peft.lora_merge(params, ad2, cfg), x), 0.0)
    h = x
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"] + cfg.scale * (h @ ad2[str(i)]["a"]) @ ad2[str(i)]["b"]
        if i < len(params) - 1:
            h = mx.maximum(h, 0.0)
    assert close(y, h, 1e-4)


def test_lora_gradients_reach_adapter_only(tiny_bert):
    params, ids, mask = tiny_bert
    cfg = peft.LoraConfig(r=4, target_modules=("query", "value"))
    ad = peft.lora_init(mx.random.key(2), params, cfg)
    assert sorted(ad) == [f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
    g = mx.grad(lambda a: mx.sum(peft.lora_apply(params, a, cfg, embed, ids, mask) * mx.arange(64)))(ad)
    assert sorted(g) == sorted(ad)
    assert all(float(mx.abs(v["b"]).max()) > 0 for v in g.values())  # B = 0: only B moves first


def test_lora_unmerged_equals_merged_on_bert(tiny_bert):
    params, ids, mask = tiny_bert
    cfg = peft.LoraConfig(r=4, target_modules=("query", "value", "output.dense"))
    ad = peft.lora_init(mx.random.key(3), params, cfg)
    ad = {n: {"a": v["a"], "b": 0.05 * mx.random.normal(v["b"].shape, key=mx.random.key(9))}
          for n, v in ad.items()}
    merged = peft.lora_apply(params, ad, cfg, embed, ids, mask)
    unmerged = peft.lora_apply(params, ad, cfg, embed, ids, mask, unmerged=True)
    assert close(merged, unmerged, 1e-5)
    assert not close(merged, embed(params, ids, mask), 1e-4)
    f = lambda a, um: mx.sum(peft.lora_apply(params, a, cfg, embed, ids, mask, unmerged=um) ** 3)
    g1, g2 = mx.grad(lambda a: f(a, False))(ad), mx.grad(lambda a: f(a, True))(ad)
    for x, y in zip(tree_leaves(g1), tree_leaves(g2)):
        assert close(x, y, 1e-4)


def test_lora_dropout_needs_key_and_is_deterministic(tiny_bert):
    params, ids, mask = tiny_bert
    cfg = peft.LoraConfig(r=4, dropout=0.5)
    ad = peft.lora_init(mx.random.key(3), params, cfg)
    ad = {n: {"a": v["a"], "b": 0.1 * mx.ones_like(v["b"])} for n, v in ad.items()}
    for um in (False, True):
        run = lambda k: peft.lora_apply(params, ad, cfg, embed, ids, mask, key=k, unmerged=um)
        assert mx.array_equal(run(None), run(None))
        assert mx.array_equal(run(mx.random.key(5)), run(mx.random.key(5)))
        assert not close(run(mx.random.key(5)), run(None), 1e-6)


def test_lora_on_conv_weights():
    w = mx.random.normal((8, 3, 3, 4), key=mx.random.key(0))  # MLX conv layout (C_out, kh, kw, C_in)
    params = {"conv": {"w": w, "b": mx.zeros((8,))}, "head": {"w": mx.zeros((8, 2)), "b": mx.zeros((2,))}}
    cfg = peft.LoraConfig(r=2, target_modules=("conv",))
    ad = peft.lora_init(mx.random.key(1), params, cfg)
    assert ad["conv"]["a"].shape == (36, 2) and ad["conv"]["b"].shape == (2, 8)
    assert peft.lora_num_params(ad) == 2 * (36 + 8)
    b = mx.random.normal((2, 8), key=mx.random.key(2))
    merged = peft.lora_merge(params, {"conv": {"a": ad["conv"]["a"], "b": b}}, cfg)
    delta = merged["conv"]["w"] - w
    assert delta.shape == w.shape
    assert close(delta.reshape(8, -1).T, cfg.scale * ad["conv"]["a"] @ b, 1e-5)
    x = mx.random.normal((1, 5, 5, 4), key=mx.random.key(3))
    # the update acts on image patches exactly as the matrix view says
    y = mx.conv2d(x, delta)
    patches = mx.stack([x[0, i:i + 3, j:j + 3, :].reshape(-1) for i in range(3) for j in range(3)])
    assert close(y.reshape(9, 8), patches @ (delta.reshape(8, -1).T), 1e-4)


def test_unknown_target_lists_available(tiny_bert):
    params, _, _ = tiny_bert
    with pytest.raises(ValueError, match=r"target_modules: 'qurey' matches no module.*query"):
        peft.lora_init(mx.random.key(0), params, peft.LoraConfig(target_modules=("qurey",)))
    with pytest.raises(ValueError, match=r"regex .* matches no module; available names"):
        peft.lora_init(mx.random.key(0), params, peft.LoraConfig(target_modules=r".*\.nope"))
    ad = peft.lora_init(mx.random.key(0), params,
                        peft.LoraConfig(target_modules=r"encoder\.layer\.1\.attention\.self\.(query|key)"))
    assert sorted(ad) == ["encoder.layer.1.attention.self.key", "encoder.layer.1.attention.self.query"]


def test_rank_too_large_and_bad_config():
    params = mlp_init(mx.random.key(0), [3, 8, 2])
    with pytest.raises(ValueError, match=r"r: rank 3 exceeds min\(d_in, d_out\) = 2"):
        peft.lora_init(mx.random.key(0), params, peft.LoraConfig(r=3, target_modules="all-linear"))
    for bad in (dict(r=0), dict(alpha=-1.0), dict(dropout=1.0), dict(init="xavier"),
                dict(target_modules=()), dict(target_modules="(")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            peft.LoraConfig(**bad)


# ----------------------------------------------------------------------------- DoRA


def test_dora_init_is_base_and_decomposes(tiny_bert):
    params, ids, mask = tiny_bert
    cfg = peft.DoraConfig(r=4, target_modules=("query", "value", "dense"))
    ad = peft.dora_init(mx.random.key(1), params, cfg)
    assert close(peft.dora_apply(params, ad, cfg, embed, ids, mask), embed(params, ids, mask), 1e-5)
    n = "encoder.layer.0.attention.self.query"
    assert peft.lora_num_params({n: ad[n]}) == 4 * (64 + 64) + 64
    b = mx.random.normal(ad[n]["b"].shape, key=mx.random.key(2))
    m = ad[n]["m"] * 1.5
    w = peft.dora_weight(params["encoder"]["layer"][0]["attention"]["self"]["query"]["w"],
                         ad[n]["a"], b, m, cfg.scale)
    assert close(mx.linalg.norm(w, axis=0), m, 1e-4)  # column norms are the magnitudes
    g = mx.grad(lambda a: mx.sum(peft.dora_apply(params, a, cfg, embed, ids, mask) * mx.arange(64)))(ad)
    assert float(mx.abs(g[n]["m"]).max()) > 0 and float(mx.abs(g[n]["b"]).max()) > 0


# ----------------------------------------------------------------------------- QLoRA


def test_qlora_dequantized_within_bound(tiny_bert):
    params, ids, mask = tiny_bert
    cfg = peft.QLoraConfig(lora=peft.LoraConfig(r=4), bits=4, group_size=64)
    q = peft.qlora_quantize(params, cfg)
    node = q["encoder"]["layer"][0]["intermediate"]["dense"]
    assert set(node) == {"wq", "scales", "biases", "b"} and node["wq"].dtype == mx.uint32
    deq = peft.qlora_dequantize(q, cfg)
    for name in peft.dense_modules(params):
        parts = name.split(".")
        w0, w1, qn = params, deq, q
        for p in parts:
            w0, w1, qn = (t[int(p)] if isinstance(t, list) else t[p] for t in (w0, w1, qn))
        err = np.abs(np.array(w0["w"] - w1["w"])).T  # (d_out, d_in)
        scales = np.abs(np.array(qn["scales"]))
        bound = np.repeat(scales, 64, axis=1)
        assert (err <= bound * (1 + 1e-5) + 1e-7).all(), name
        rng = np.array(w0["w"]).T.reshape(scales.shape[0], -1, 64)
        assert (scales <= 1.25 * (rng.max(-1) - rng.min(-1)) / 15 + 1e-7).all(), name
    ad = peft.qlora_init(mx.random.key(1), q, cfg)
    ad = {n: {"a": v["a"], "b": 0.05 * mx.random.normal(v["b"].shape, key=mx.random.key(7))}
          for n, v in ad.items()}
    y_merged = peft.qlora_apply(q, ad, cfg, embed, ids, mask)
    y_qmm = peft.qlora_apply(q, ad, cfg, embed, ids, mask, unmerged=True)
    assert close(y_merged, y_qmm, 1e-4)
    g = mx.grad(lambda a: mx.sum(peft.qlora_apply(q, a, cfg, embed, ids, mask, unmerged=True) ** 2))(ad)
    assert sorted(g) == sorted(ad)


def test_quantized_linear_fused_equals_dequantized_in_value_and_gradient():
    x = mx.random.normal((3, 5, 128), key=mx.random.key(0))
    w = mx.random.normal((96, 128), key=mx.random.key(1))
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    ct = mx.random.normal((3, 5, 96), key=mx.random.key(2))
    outs = []
    for fused in (True, False):
        f = lambda x: mx.sum(bert.quantized_linear(x, wq, scales, biases, 64, 4, fused=fused) * ct)
        y = bert.quantized_linear(x, wq, scales, biases, 64, 4, fused=fused)
        outs.append((y, mx.grad(f)(x)))
    deq = mx.dequantize(wq, scales, biases, group_size=64, bits=4)
    assert close(outs[0][0], x @ deq.T, 1e-4) and close(outs[1][0], x @ deq.T, 1e-4)
    assert close(outs[0][1], outs[1][1], 1e-4)
    assert not close(outs[0][0], x @ w.T, 1e-3)  # the quantized weight, not the float one


def test_qlora_skips_unquantizable_layers():
    params = mlp_init(mx.random.key(0), [4, 64, 3])
    cfg = peft.QLoraConfig(lora=peft.LoraConfig(r=2, target_modules="all-linear"))
    with pytest.warns(UserWarning, match="cannot be quantized"):
        q = peft.qlora_quantize(params, cfg)
    assert "w" in q[0] and "wq" in q[1]
    ad = peft.qlora_init(mx.random.key(1), q, cfg)
    x = mx.random.normal((2, 4))
    assert close(peft.qlora_apply(q, ad, cfg, mlp_apply, x),
                 mlp_apply(peft.qlora_dequantize(q, cfg), x), 1e-6)
    with pytest.raises(ValueError, match="cannot be quantized"):
        peft.qlora_quantize(params, peft.QLoraConfig(quantize_modules=("0",)))


# ----------------------------------------------------------------------------- AdaLoRA


@given(
    init_r=st.integers(2, 6), target_frac=st.floats(0.0, 1.0), total=st.integers(7, 30),
    tinit=st.integers(0, 3), tfinal=st.integers(0, 3), delta_t=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_adalora_budget_respected(init_r, target_frac, total, tinit, tfinal, delta_t, seed):
    target_r = max(1, int(round(init_r * target_frac)))
    cfg = peft.AdaLoraConfig(init_r=init_r, target_r=target_r, total_step=total, tinit=tinit,
                             tfinal=tfinal, delta_t=delta_t, target_modules="all-linear")
    params = mlp_init(mx.random.key(seed), [6, 7, 6])
    ad = peft.adalora_init(mx.random.key(seed + 1), params, cfg)
    st_ = peft.adalora_init_state(ad)
    n = len(ad)
    budgets = [peft.adalora_budget(t, cfg, n)[0] for t in range(total + 3)]
    assert budgets[0] == init_r * n and budgets[-1] == target_r * n
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # never increases
    rng = np.random.default_rng(seed)
    for t in range(1, total + 2):
        grads = {k: {m: mx.array(rng.normal(size=v.shape).astype(np.float32)) for m, v in d.items()}
                 for k, d in ad.items()}
        ad = {k: {m: v - 0.1 * grads[k][m] for m, v in d.items()} for k, d in ad.items()}  # "SGD"
        ad, st_, budget = peft.adalora_update(ad, st_, grads, t, cfg)
        assert budget == budgets[t]
        assert sum(peft.adalora_ranks(ad).values()) <= budget
    assert sum(peft.adalora_ranks(ad).values()) <= target_r * n


def test_adalora_identity_at_init_and_orth_reg(tiny_bert):
    params, ids, mask = tiny_bert
    cfg = peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10)
    ad = peft.adalora_init(mx.random.key(0), params, cfg)
    assert close(peft.adalora_apply(params, ad, cfg, embed, ids, mask), embed(params, ids, mask), 0.0)
    reg = peft.adalora_orth_reg(ad)
    assert reg.shape == () and float(reg) > 0
    masks = peft.adalora_allocate({"a": mx.array([3.0, 1.0, 2.0]), "b": mx.array([5.0, 0.0])}, 2)
    assert masks["a"].tolist() == [1.0, 0.0, 0.0] and masks["b"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="target_r"):
        peft.AdaLoraConfig(init_r=2, target_r=3)
    with pytest.raises(ValueError, match="total_step"):
        peft.AdaLoraConfig(total_step=5, tinit=3, tfinal=2)


# ----------------------------------------------------------------------------- prompt / prefix


def test_prompt_and_prefix(tiny_bert):
    params, ids, mask = tiny_bert
    base = bert.bert_apply(params, TINY, ids, mask)
    pc = peft.PromptConfig(n_tokens=3)
    pr = peft.prompt_init(mx.random.key(0), params, pc)
    table = np.array(params["embeddings"]["word_embeddings"]["weight"])
    assert all((np.abs(table - row).sum(1) == 0).any() for row in np.array(pr["prompt"]))
    h = peft.prompt_apply(params, pr, pc, bert.bert_apply, TINY, ids, mask)
    assert h.shape == base.shape and not close(h, base, 1e-3)
    g = mx.grad(lambda a: mx.sum(peft.prompt_apply(params, a, pc, embed, ids, mask) ** 2))(pr)
    assert g["prompt"].shape == (3, 64) and float(mx.abs(g["prompt"]).max()) > 0
    for proj in (False, True):
        fc = peft.PrefixConfig(n_tokens=2, projection=proj, projection_hidden=16)
        pf = peft.prefix_init(mx.random.key(1), params, fc)
        assert peft.prefix_kv(pf, 2).shape == (2, 2, 2, 64)
        y = peft.prefix_apply(params, pf, fc, embed, ids, mask)
        assert y.shape == (3, 64)
        g = mx.grad(lambda a: mx.sum(peft.prefix_apply(params, a, fc, embed, ids, mask) * mx.arange(64)))(pf)
        assert all(float(mx.abs(v).max()) > 0 for v in tree_leaves(g))
    assert tree_count(peft.prefix_init(mx.random.key(1), params, peft.PrefixConfig(n_tokens=5))) == 2 * 2 * 5 * 64
    # an all-zero prefix key/value only adds attention mass on zero values: outputs still finite
    zero = {"prefix": mx.zeros((2, 2, 2, 64))}
    assert bool(mx.all(mx.isfinite(peft.prefix_apply(params, zero, peft.PrefixConfig(n_tokens=2), embed, ids, mask))))


# ----------------------------------------------------------------------------- baselines


def test_full_and_head_baselines(tiny_bert):
    params, ids, mask = tiny_bert
    full = peft.full_init(None, params)
    assert tree_count(full) == tree_count(params)
    assert close(peft.full_apply(params, full, None, embed, ids, mask), embed(params, ids, mask), 0.0)
    frozen_emb = peft.full_init(None, params, peft.FullConfig(exclude=r"embeddings\..*"))
    assert not any(k.startswith("embeddings.") for k in frozen_emb)
    head = peft.head_init(None, params, peft.HeadConfig(modules=("output.LayerNorm",)))
    assert sorted(head) == sorted(f"encoder.layer.{i}.{p}output.LayerNorm.{w}" for i in range(2)
                                  for p in ("", "attention.") for w in ("weight", "bias"))
    bitfit = peft.select_leaves(params, r".*\.b")
    assert bitfit and all(k.endswith(".b") for k in bitfit)
    with pytest.raises(ValueError, match="modules: 'classifier' matches no module"):
        peft.head_init(None, params)
    with pytest.raises(KeyError, match="not leaves"):
        peft.merge_leaves(params, {"nope.w": mx.zeros((1,))})


def test_peft_method_bundles(tiny_bert):
    params, ids, mask = tiny_bert
    methods = [
        peft.lora_method(peft.LoraConfig(r=2)), peft.lora_method(peft.LoraConfig(r=2), unmerged=True),
        peft.dora_method(peft.DoraConfig(r=2)), peft.adalora_method(peft.AdaLoraConfig(init_r=2, target_r=1)),
        peft.qlora_method(peft.QLoraConfig(lora=peft.LoraConfig(r=2))), peft.prompt_method(peft.PromptConfig(n_tokens=2)),
        peft.prefix_method(peft.PrefixConfig(n_tokens=2)), peft.full_method(),
        peft.method_for(peft.HeadConfig(modules=("pooler_free_name_does_not_exist",))),
    ]
    for m in methods[:-1]:
        base = m.prepare(params)
        ad = m.init(mx.random.key(0), base)
        y = m.apply(base, ad, embed, ids, mask, key=mx.random.key(1))
        assert y.shape == (3, 64)
        if m.merge is not None:
            assert close(embed(m.merge(base, ad), ids, mask), m.apply(base, ad, embed, ids, mask), 1e-5)
        else:
            assert m.name in ("prompt", "prefix")
    with pytest.raises(ValueError, match="matches no module"):
        methods[-1].init(mx.random.key(0), params)


# ----------------------------------------------------------------------------- io


def _bits(tree):
    return [(k, str(v.dtype), v.shape, np.array(v.view(mx.uint8) if v.dtype != mx.bool_ else v).tobytes())
            for k, v in tree_flatten(tree)]


def test_adapter_save_load_roundtrip_bit_for_bit(tiny_bert, tmp_path):
    params, _, _ = tiny_bert
    cases = [
        (peft.LoraConfig(r=3, alpha=7.5, target_modules=("query", "value")), peft.lora_init),
        (peft.DoraConfig(r=2, target_modules=r".*\.dense"), peft.dora_init),
        (peft.AdaLoraConfig(init_r=3, target_r=2, total_step=9, tinit=1), peft.adalora_init),
        (peft.PrefixConfig(n_tokens=2, projection=True, projection_hidden=8), peft.prefix_init),
        (peft.PromptConfig(n_tokens=4, init="normal"), peft.prompt_init),
        (peft.HeadConfig(modules=("embeddings.LayerNorm",)), peft.head_init),
    ]
    for i, (cfg, init) in enumerate(cases):
        ad = init(mx.random.key(i), params, cfg)
        ad = tree_map_random(ad, i)
        d = peft.save_adapter(tmp_path / f"ad{i}", ad, cfg, metadata={"base_model": "tiny"})
        assert sorted(p.name for p in d.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
        doc = json.loads((d / "adapter_config.json").read_text())
        assert doc["base_model"] == "tiny" and doc["config"]
        ad2, cfg2, _ = peft.load_adapter(d)
        assert cfg2 == cfg
        assert _bits(ad2) == _bits(ad)
        assert type(ad2) is type(ad)
    # QLoRA's nested config, bfloat16 leaves and tuples survive too
    qcfg = peft.QLoraConfig(lora=peft.LoraConfig(r=2, target_modules=("key",)), bits=8, group_size=32)
    odd = {"x": (mx.arange(5).astype(mx.bfloat16), [mx.array([True, False])]), "y": {"z": mx.ones((2, 3))}}
    peft.save_adapter(tmp_path / "q", odd, qcfg)
    odd2, qcfg2, _ = peft.load_adapter(tmp_path / "q")
    assert qcfg2 == qcfg and isinstance(odd2["x"], tuple) and _bits(odd2) == _bits(odd)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        peft.load_adapter(tmp_path / "missing")


def tree_map_random(tree, seed):
    from metafn.tree import tree_map

    k = [mx.random.key(seed)]

    def f(x):
        k[0] = mx.random.split(k[0], 2)[0]
        return mx.random.normal(x.shape, key=k[0]).astype(x.dtype)

    return tree_map(f, tree)


def test_merged_model_saves_as_plain_checkpoint(tiny_bert, tmp_path):
    params, ids, mask = tiny_bert
    cfg = peft.LoraConfig(r=2)
    ad = tree_map_random(peft.lora_init(mx.random.key(0), params, cfg), 3)
    merged = peft.lora_merge(params, ad, cfg)
    peft.save_tree(tmp_path / "model.safetensors", merged, {"note": "merged"})
    back, meta = peft.load_tree(tmp_path / "model.safetensors")
    assert meta == {"note": "merged"} and _bits(back) == _bits(merged)
    assert isinstance(back["encoder"]["layer"], list)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    out = bert.bert_save(tmp_path / "hf", TINY, merged)
    cfg2, p2, tok = bert.bert_load(out, with_tokenizer=False)
    assert tok is None and cfg2 == TINY and _bits(p2) == _bits(merged)
    with pytest.raises(ValueError, match="merge adapters"):
        bert.bert_save(tmp_path / "bad", TINY, peft.lora_inject(params, ad, cfg))


def test_no_hidden_state_inputs_unchanged(tiny_bert):
    params, ids, mask = tiny_bert
    before = _bits(params)
    cfg = peft.LoraConfig(r=2)
    ad = tree_map_random(peft.lora_init(mx.random.key(0), params, cfg), 1)
    ad_before = _bits(ad)
    peft.lora_merge(params, ad, cfg)
    peft.lora_apply(params, ad, cfg, embed, ids, mask, unmerged=True, key=mx.random.key(0))
    peft.qlora_quantize(params, peft.QLoraConfig())
    assert _bits(params) == before and _bits(ad) == ad_before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft.lora_init(mx.random.key(0), params, cfg)


def test_lora_vmap_over_tasks_and_second_order(tiny_bert):
    """What meta-learning the adapter needs: vmap over a task axis and MAML's nested grad."""
    from metafn.tree import tree_add, tree_broadcast, tree_dot, tree_map, tree_scale

    params, _, _ = tiny_bert
    cfg = peft.LoraConfig(r=2)
    ad = tree_map_random(peft.lora_init(mx.random.key(0), params, cfg), 4)
    ad = tree_scale(ad, 0.1)
    ids = mx.random.randint(1, 50, (3, 4, 5), key=mx.random.key(5))
    mask = mx.ones((3, 4, 5), dtype=mx.int32)
    w = mx.random.normal((64,), key=mx.random.key(6))

    def f(a, i, m):
        return mx.sum(peft.lora_apply(params, a, cfg, embed, i, m, unmerged=True) @ w)

    batched = mx.vmap(f)(tree_broadcast(ad, 3), ids, mask)
    loop = mx.stack([f(ad, ids[t], mask[t]) for t in range(3)])
    assert close(batched, loop, 1e-5)

    def maml(a):
        g = mx.grad(lambda a: f(a, ids[0], mask[0]))(a)
        return f(tree_map(lambda x, y: x - 0.05 * y, a, g), ids[1], mask[1])

    d = tree_map_random(ad, 7)
    analytic = tree_dot(mx.grad(maml)(ad), d).item()
    eps = 1e-3
    fd = ((maml(tree_add(ad, tree_scale(d, eps))) - maml(tree_add(ad, tree_scale(d, -eps)))) / (2 * eps)).item()
    assert abs(fd - analytic) <= 1e-2 * max(1.0, abs(analytic))
