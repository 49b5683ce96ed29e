"""Random affine augmentation: the warp's exact cases, its range invariant, determinism, and that
only the meta-training split is augmented."""

from __future__ import annotations

import metafn  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metafn.config import ConfigError, config_from_dict, config_to_dict
from metafn.experiment import build_experiment, build_pooled_task
from metafn.tasks.augment import Augment, affine_warp, random_affine
from metafn.tasks.omniglot import sample_omniglot_batch, sample_omniglot_episodes
from test_omniglot import _synthetic
from test_omniglot_experiment import tiny_config, tiny_omniglot  # noqa: F401 (fixture)


def _images(n: int = 3, size: int = 9, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size)).astype(np.float32)


def test_zero_transform_is_the_identity():
    x = _images()
    out = affine_warp(x, np.zeros(3), np.ones(3), np.zeros((3, 2)))
    np.testing.assert_allclose(out, x, atol=1e-6)
    assert out.dtype == np.float32


def test_integer_shift_is_a_zero_filled_translation():
    x = _images(1)
    out = affine_warp(x, np.zeros(1), np.ones(1), np.array([[2.0, -1.0]]))
    expected = np.zeros_like(x)
    expected[:, 2:, :-1] = x[:, :-2, 1:]  # content moves 2 rows down, 1 column left
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("quarter_turns", [1, 2, 3])
def test_right_angle_rotation_is_rot90(quarter_turns: int):
    x = _images(2, size=8)
    out = affine_warp(x, np.full(2, 90.0 * quarter_turns), np.ones(2), np.zeros((2, 2)))
    np.testing.assert_allclose(out, np.rot90(x, quarter_turns, axes=(1, 2)), atol=1e-5)


def test_doubling_the_scale_magnifies_about_the_centre():
    x = np.zeros((1, 9, 9), np.float32)
    x[0, 5, 4] = 1.0  # one pixel below the centre (4, 4)
    out = affine_warp(x, np.zeros(1), np.full(1, 2.0), np.zeros((1, 2)))
    assert out[0, 6, 4] == pytest.approx(1.0)  # now two pixels below
    assert out[0].sum() == pytest.approx(4.0)  # ink mass grows by s^2 (bilinear spreads it)


@settings(max_examples=30, deadline=None)
@given(theta=st.floats(-180, 180), scale=st.floats(0.5, 1.5), dy=st.floats(-4, 4),
       dx=st.floats(-4, 4), seed=st.integers(0, 100))
def test_warp_is_a_convex_combination_of_pixels_and_zero(theta, scale, dy, dx, seed):
    """Bilinear weights are >= 0 and sum to <= 1, so ink never exceeds the input's range."""
    x = _images(1, seed=seed)
    out = affine_warp(x, np.array([theta]), np.array([scale]), np.array([[dy, dx]]))
    assert out.min() >= 0.0
    assert out.max() <= x.max() + 1e-6


def test_random_affine_is_deterministic_and_per_image():
    x = np.repeat(_images(1, size=12), 4, axis=0).reshape(2, 2, 12, 12)
    aug = Augment(rotation=20, shift=2, scale=0.1)
    a = random_affine(np.random.default_rng(7), x, aug)
    b = random_affine(np.random.default_rng(7), x, aug)
    np.testing.assert_array_equal(a, b)
    assert a.shape == x.shape
    flat = a.reshape(4, 12, 12)
    assert not np.allclose(flat[0], flat[1])  # the same image, transformed independently


@pytest.mark.parametrize("field, value", [("rotation", -1.0), ("shift", float("nan")),
                                          ("scale", 1.0)])
def test_bad_ranges_name_the_field(field: str, value: float):
    with pytest.raises(ValueError, match=f"augment.{field}"):
        Augment(**{field: value}).check()


def test_sampling_with_augmentation_is_deterministic_and_inactive_ranges_change_nothing():
    data = _synthetic([5, 5], drawings=6, size=10)
    key = mx.random.key(3)
    plain = sample_omniglot_episodes(key, data, 2, 3, 1, 2)
    same = sample_omniglot_episodes(key, data, 2, 3, 1, 2, augment=Augment())
    for u, v in zip(plain, same):
        np.testing.assert_array_equal(np.array(u), np.array(v))
    aug = Augment(rotation=10, shift=1)
    a = sample_omniglot_episodes(key, data, 2, 3, 1, 2, augment=aug)
    b = sample_omniglot_episodes(key, data, 2, 3, 1, 2, augment=aug)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(np.array(u), np.array(v))
    x1, y1 = sample_omniglot_batch(key, data, 6, augment=aug)
    x2, y2 = sample_omniglot_batch(key, data, 6, augment=aug)
    np.testing.assert_array_equal(np.array(x1), np.array(x2))
    np.testing.assert_array_equal(np.array(y1), np.array(y2))


def test_only_the_meta_training_split_is_augmented(tiny_omniglot, tmp_path):  # noqa: F811
    plain = build_experiment(tiny_config(tiny_omniglot, tmp_path))
    cfg = tiny_config(tiny_omniglot, tmp_path)
    raw = config_to_dict(cfg)
    raw["task"].update(augment_rotation=15.0, augment_shift=2.0)
    augmented_cfg = config_from_dict(raw)
    augmented = build_experiment(augmented_cfg)
    key = mx.random.key(0)
    for split in ("val", "test"):
        for u, v in zip(plain.sample(key, split, 2), augmented.sample(key, split, 2)):
            np.testing.assert_array_equal(np.array(u), np.array(v))
    train_plain = np.array(plain.sample(key, "train", 2).support_x)
    train_aug = np.array(augmented.sample(key, "train", 2).support_x)
    assert train_aug.shape == train_plain.shape
    assert not np.allclose(train_aug, train_plain)
    x_plain, _ = build_pooled_task(cfg).sample(key)
    x_aug, _ = build_pooled_task(augmented_cfg).sample(key)
    assert not np.allclose(np.array(x_plain), np.array(x_aug))


@pytest.mark.parametrize("key, value, match", [
    ("augment_rotation", -5.0, "task.augment_rotation"),
    ("augment_scale", 1.5, "task.augment_scale"),
])
def test_config_rejects_bad_augmentation(key, value, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"task": {"family": "omniglot", "n_way": 5, key: value}})


def test_config_rejects_augmentation_of_toy_tasks():
    with pytest.raises(ConfigError, match="task.augment_shift.*omniglot"):
        config_from_dict({"task": {"family": "sine", "augment_shift": 1.0}})
