"""CLINC150 text tasks: standard few-shot sets and cross-domain episodes."""

from __future__ import annotations

import json
from collections import Counter

import metafn  # noqa: F401  (before mlx)
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from metafn.tasks import clinc


@pytest.fixture(scope="module")
def data(request):
    shared = request.getfixturevalue("shared_data")
    return clinc.load_clinc(shared / "clinc150")


def test_load(data):
    assert len(data.intents) == 150 and len(data.domains) == 10
    assert len(data.splits["train"]) == 15000 and len(data.splits["val"]) == 3000
    assert set(data.oos) == {"oos_train", "oos_val"}
    assert all(len(v) == 100 for v in data.by_intent["train"].values())


def test_default_domain_split_is_a_disjoint_partition(data):
    seen = [d for names in clinc.DOMAIN_SPLITS.values() for d in names]
    assert len(seen) == len(set(seen)) == 10 and set(seen) == set(data.domains)
    train = {t for d in clinc.DOMAIN_SPLITS["train"] for t in data.domains[d]}
    test = {t for d in clinc.DOMAIN_SPLITS["test"] for t in data.domains[d]}
    assert not train & test


def test_few_shot_and_eval_sets(data):
    fs = clinc.sample_few_shot(mx.random.key(0), data, k_shot=5)
    assert len(fs.texts) == 750 and fs.labels.shape == (750,)
    assert set(Counter(fs.labels.tolist()).values()) == {5}
    lookup = dict(data.splits["train"])
    assert all(fs.label_names[c] == lookup[t] for t, c in zip(fs.texts, fs.labels.tolist()))
    again = clinc.sample_few_shot(mx.random.key(0), data, k_shot=5)
    assert again.texts == fs.texts
    assert clinc.sample_few_shot(mx.random.key(1), data, k_shot=5).texts != fs.texts
    ev = clinc.eval_set(data, "val")
    assert len(ev.texts) == 3000 and ev.label_names == data.intents
    with pytest.raises(ValueError, match="k_shot: 101 exceeds"):
        clinc.sample_few_shot(mx.random.key(0), data, k_shot=101)
    with pytest.raises(ValueError, match="split: 'test'"):
        clinc.eval_set(data, "test")


@given(n_way=st.integers(2, 15), k_shot=st.integers(1, 5), n_query=st.integers(0, 5),
       seed=st.integers(0, 2**20), which=st.sampled_from(["train", "val", "test"]))
def test_episode_invariants(data, n_way, k_shot, n_query, seed, which):
    ep = clinc.sample_text_episode(mx.random.key(seed), data, which, n_way, k_shot, n_query)
    assert ep.domain in clinc.DOMAIN_SPLITS[which]
    assert len(ep.intents) == len(set(ep.intents)) == n_way
    assert set(ep.intents) <= set(data.domains[ep.domain])  # one domain per episode
    assert ep.support_y.tolist() == np.repeat(np.arange(n_way), k_shot).tolist()
    assert ep.query_y.tolist() == np.repeat(np.arange(n_way), n_query).tolist()
    lookup = {}
    for u, t in data.splits["train"]:
        lookup.setdefault(u, set()).add(t)
    for texts, ys in ((ep.support_texts, ep.support_y), (ep.query_texts, ep.query_y)):
        assert all(ep.intents[y] in lookup[u] for u, y in zip(texts, ys.tolist()))
    assert not set(ep.support_texts) & set(ep.query_texts)
    same = clinc.sample_text_episode(mx.random.key(seed), data, which, n_way, k_shot, n_query)
    assert same.support_texts == ep.support_texts and same.query_texts == ep.query_texts


def test_episode_batches_and_errors(data):
    eps = clinc.sample_text_episodes(mx.random.key(3), data, "train", 8, 5, 2, 3)
    assert len(eps) == 8 and len({e.support_texts for e in eps}) == 8
    assert {e.domain for e in eps} <= set(clinc.DOMAIN_SPLITS["train"])
    eps_custom = clinc.sample_text_episodes(mx.random.key(3), data, ["meta", "work"], 4, 3, 1, 1)
    assert {e.domain for e in eps_custom} <= {"meta", "work"}
    with pytest.raises(ValueError, match="n_way: 16 exceeds the 15 intents"):
        clinc.sample_text_episode(mx.random.key(0), data, "test", 16, 1, 1)
    with pytest.raises(ValueError, match="unknown domain 'sports'"):
        clinc.sample_text_episode(mx.random.key(0), data, ["sports"], 2, 1, 1)
    with pytest.raises(ValueError, match="k_shot \\+ n_query"):
        clinc.sample_text_episode(mx.random.key(0), data, "test", 2, 60, 60)
    with pytest.raises(TypeError, match="key"):
        clinc.sample_text_episode(mx.array([1, 2, 3]), data, "test", 2, 1, 1)


def test_user_split_file(tmp_path):
    domains = {"d1": ["a", "b"], "d2": ["c"]}
    split = {"train": [[f"a{i}", "a"] for i in range(4)] + [[f"b{i}", "b"] for i in range(4)]
             + [[f"c{i}", "c"] for i in range(4)] + [["x", "oos"]],
             "test": [["a-t", "a"], ["c-t", "c"]], "oos_test": [["y", "oos"]]}
    f = tmp_path / "my_split.json"
    f.write_text(json.dumps(split))
    (tmp_path / "domains.json").write_text(json.dumps(domains))
    data = clinc.load_clinc(f)
    assert data.intents == ("a", "b", "c") and data.oos == {"oos_test": ("y",)}
    assert len(data.splits["train"]) == 12  # the stray oos row is kept out of the in-scope split
    ep = clinc.sample_text_episode(mx.random.key(0), data, ["d1"], 2, 2, 2)
    assert set(ep.intents) == {"a", "b"}
    assert clinc.eval_set(data, "test").labels.tolist() == [0, 2]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": [["only one"]]}))
    with pytest.raises(ValueError, match=r"bad.json\['train'\]\[0\]"):
        clinc.load_clinc(bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        clinc.load_clinc(tmp_path / "nope.json")
    (tmp_path / "domains.json").write_text(json.dumps({"d1": ["a"]}))
    with pytest.raises(ValueError, match="belong to no domain"):
        clinc.load_clinc(f)
