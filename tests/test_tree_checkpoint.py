"""Tree utilities and checkpoint round trips."""

from __future__ import annotations

import os

import metafn  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, strategies as st
from typeguard import TypeCheckError

from helpers import assert_trees_equal, small_mlp
from metafn.checkpoint import atomic_write_text, load_checkpoint, read_metadata, save_checkpoint
from metafn.optim import adam
from metafn.random import fold_in, key, named_keys
from metafn.tree import tree_count, tree_dot, tree_lerp, tree_norm, tree_stack, tree_index


@given(seed=st.integers(0, 1000), t=st.floats(0, 1))
def test_tree_lerp_endpoints_and_norm(seed, t):
    a, b = small_mlp(seed), small_mlp(seed + 1)
    assert_trees_equal(tree_lerp(a, b, 0.0), a)
    np.testing.assert_allclose(tree_norm(a).item() ** 2, tree_dot(a, a).item(), rtol=1e-5)
    assert tree_count(a) == 1 * 8 + 8 + 8 * 8 + 8 + 8 + 1


def test_stack_index_round_trip():
    a, b = small_mlp(1), small_mlp(2)
    assert_trees_equal(tree_index(tree_stack([a, b]), 1), b)


def test_fold_in_is_deterministic_and_distinct():
    k = key(3)
    assert np.array_equal(np.array(fold_in(k, 5)), np.array(fold_in(k, 5)))
    assert not np.array_equal(np.array(fold_in(k, 5)), np.array(fold_in(k, 6)))
    ks = named_keys(k, ("a", "b"))
    assert not np.array_equal(np.array(ks["a"]), np.array(ks["b"]))
    with pytest.raises(ValueError, match="data"):
        fold_in(k, -1)
    with pytest.raises((TypeError, TypeCheckError), match="seed"):
        key("3")


@given(seed=st.integers(0, 1000), dtype=st.sampled_from([mx.float32, mx.float16, mx.bfloat16, mx.int32]))
def test_checkpoint_round_trips_bit_for_bit(tmp_path_factory, seed, dtype):
    path = tmp_path_factory.mktemp("ck") / "state.safetensors"
    params = [{k: v.astype(dtype) for k, v in layer.items()} for layer in small_mlp(seed)]
    state = (params, adam(1e-3).init(small_mlp(seed)), mx.array(seed, dtype=mx.int32))
    save_checkpoint(path, state, {"step": seed})
    loaded, meta = load_checkpoint(path, state)
    assert_trees_equal(loaded, state)
    assert type(loaded[1]).__name__ == "ScaleByAdamState"
    assert meta == {"step": seed} and read_metadata(path) == {"step": seed}
    assert sorted(os.listdir(path.parent)) == ["state.json", "state.safetensors"]


def test_checkpoint_errors(tmp_path):
    params = small_mlp(0)
    with pytest.raises(ValueError, match="path"):
        save_checkpoint(tmp_path / "x.npz", params)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors", params)
    save_checkpoint(tmp_path / "p.safetensors", params)
    with pytest.raises(ValueError, match="shape"):
        load_checkpoint(tmp_path / "p.safetensors", small_mlp(0, sizes=(1, 9, 8, 1)))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        load_checkpoint(tmp_path / "bad.safetensors", params)


def test_atomic_write_leaves_no_temp_file(tmp_path):
    atomic_write_text(tmp_path / "a.json", "{}")
    atomic_write_text(tmp_path / "a.json", "[]")
    assert os.listdir(tmp_path) == ["a.json"] and (tmp_path / "a.json").read_text() == "[]"
