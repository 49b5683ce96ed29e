"""Omniglot through the config / trainer / evaluation path (small conv4; real shared data, and
tiny generated zips for the pooled baseline and mamlpp)."""

from __future__ import annotations

import dataclasses
import json
import math

import metafn  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest

from helpers import assert_trees_close
from metafn.config import ConfigError, config_from_dict
from metafn.evaluate import adaptation_curve
from metafn.experiment import (
    build_experiment, build_pooled_task, init_meta, learned_inner_rates, pooled_update,
    task_losses, with_zero_head,
)
from metafn.nn import conv4_loss
from metafn.optim import adam
from metafn.outer import LSLRParams, batched_adapt, lslr_rates
from metafn.report import run_evaluation
from metafn.tasks.omniglot import load_omniglot, sample_omniglot_batch, split_omniglot
from metafn.train import train
from metafn.tree import tree_broadcast, tree_leaves, tree_map
from test_omniglot import _layout, _write_zip

# Five alphabets of 3 characters x 4 drawings: the default split for alphabets without an
# evaluation zip puts sorted indices 0-2 in train (Alpha, Beta, Delta), 3 in val (Epsilon) and
# 4 in test (Gamma); with rotations, 3 x 3 x 4 = 36 meta-train classes.
TINY_ALPHABETS = {"Alpha": 3, "Beta": 3, "Gamma": 3, "Delta": 3, "Epsilon": 3}
TINY_TRAIN_CLASSES = 36


@pytest.fixture
def tiny_omniglot(tmp_path):
    return _write_zip(tmp_path / "tiny_background.zip", _layout(TINY_ALPHABETS))


def tiny_config(zip_path, tmp_path, algorithm="maml", algo_overrides=None, **eval_overrides):
    return config_from_dict({
        "name": f"tiny-{algorithm}",
        "task": {"family": "omniglot", "n_way": 3, "k_shot": 1, "n_query": 2, "rotations": True,
                 "image_size": 16, "data_dir": str(zip_path), "cache_dir": str(tmp_path / "cache")},
        "model": {"channels": 4},
        "algorithm": {"name": algorithm, "inner_lr": 0.4, "inner_steps": 1, **(algo_overrides or {})},
        "train": {"steps": 2, "meta_batch_size": 2, "compile": False, "log_interval": 1,
                  "eval_interval": 2, "save_interval": 2, "val_tasks": 2},
        "eval": {"n_tasks": 4, "steps": 2, "select_tasks": 2, "chunk": 2, "finetune_lrs": [0.1],
                 "pooled_steps": 3, "pooled_batch_size": 8, **eval_overrides},
    })


def omniglot_config(shared_data, tmp_path, algorithm="protonet", **eval_overrides):
    return config_from_dict({
        "name": f"omni-{algorithm}",
        "task": {"family": "omniglot", "n_way": 5, "k_shot": 1, "n_query": 2, "rotations": True,
                 "data_dir": str(shared_data / "omniglot"), "cache_dir": str(tmp_path / "cache")},
        "model": {"channels": 8},
        "algorithm": {"name": algorithm, "inner_lr": 0.4, "inner_steps": 1},
        "train": {"steps": 4, "meta_batch_size": 2, "compile": False, "log_interval": 2,
                  "eval_interval": 2, "save_interval": 2, "val_tasks": 4},
        "eval": {"n_tasks": 6, "steps": 1, "select_tasks": 4, "chunk": 3, "finetune_lrs": [0.4],
                 **eval_overrides},
    })


def test_omniglot_episodes_come_from_disjoint_alphabet_splits(shared_data, tmp_path):
    exp = build_experiment(omniglot_config(shared_data, tmp_path))
    eps = {s: exp.sample(mx.random.key(0), s, 3) for s in ("train", "val", "test")}
    for ep in eps.values():
        assert ep.support_x.shape == (3, 5, 28, 28, 1) and ep.query_x.shape == (3, 10, 28, 28, 1)
        assert ep.support_y.dtype == mx.int32
    assert not np.array_equal(np.array(eps["train"].support_x), np.array(eps["test"].support_x))
    with pytest.raises(ValueError, match="split"):
        exp.sample(mx.random.key(0), "dev", 1)


@pytest.mark.parametrize("algorithm", ["protonet", "maml"])
def test_omniglot_train_and_evaluate(shared_data, tmp_path, algorithm):
    cfg = omniglot_config(shared_data, tmp_path, algorithm)
    state, summary = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert summary["step"] == 4 and (tmp_path / "run" / "best.safetensors").exists()
    results = run_evaluation(cfg, tmp_path / "run", state.meta, summary, progress=False, log=lambda s: None)
    assert set(results["methods"]) == {algorithm, "random_init", "pooled"}
    pooled = results["pooled_train"]
    assert pooled["steps"] == 4 and pooled["n_classes"] == 688 and pooled["batch_size"] == 2 * 5 * 3
    acc = results["methods"][algorithm]["budgets"][0]["accuracy_mean"]
    assert 0.0 <= acc <= 1.0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["name"] == cfg.name


def test_protonet_and_reheaded_maml_can_be_tested_at_more_ways(shared_data, tmp_path):
    cfg = omniglot_config(shared_data, tmp_path, "protonet", n_way=20, within_alphabet=True)
    meta = build_experiment(cfg).init_params(mx.random.key(0))
    res = run_evaluation(cfg, tmp_path / "p", meta, progress=False, log=lambda s: None)
    assert res["methods"]["protonet"]["budgets"][0]["accuracy_mean"] >= 0.0
    assert res["head"] is None
    # MAML meta-trained 5-way, tested 20-way: its body with a zero 20-way head, so before
    # fine-tuning every logit is equal (loss log 20, first-index prediction right 1 time in 20).
    cfg = omniglot_config(shared_data, tmp_path, "maml", n_way=20)
    meta = build_experiment(omniglot_config(shared_data, tmp_path, "maml")).init_params(mx.random.key(0))
    logs = []
    res = run_evaluation(cfg, tmp_path / "m", meta, progress=False, log=logs.append)
    assert "zero 20-way head" in res["head"] and any("zero 20-way head" in line for line in logs)
    (curve,) = res["methods"]["maml"]["curves"].values()
    assert curve["loss_mean"][0] == pytest.approx(math.log(20), rel=1e-5)
    assert curve["accuracy_mean"][0] == pytest.approx(1 / 20)
    assert curve["loss_mean"][1] < curve["loss_mean"][0]  # one fine-tuning step learns a head


def test_soft_kmeans_evaluation_scores_the_same_test_episodes(shared_data, tmp_path):
    from metafn.evaluate import curve_over_tasks, protonet_scores
    from metafn.random import fold_in, key as make_key
    from metafn.report import TEST_STREAM

    cfg = omniglot_config(shared_data, tmp_path, "protonet", n_way=20, soft_kmeans_steps=2, baselines=False)
    exp = build_experiment(cfg)
    meta = exp.init_params(mx.random.key(0))
    res = run_evaluation(cfg, tmp_path / "p", meta, progress=False, log=lambda s: None)
    assert set(res["methods"]) == {"protonet", "protonet_soft_kmeans"}
    losses = [res["methods"][m]["budgets"][0]["loss_mean"] for m in ("protonet", "protonet_soft_kmeans")]
    assert losses[0] != pytest.approx(losses[1])
    ev = cfg.eval
    key = fold_in(make_key(cfg.seed), TEST_STREAM)
    for name, steps in (("protonet", 0), ("protonet_soft_kmeans", 2)):
        loss, acc = curve_over_tasks(build_experiment(dataclasses.replace(
            cfg, task=dataclasses.replace(cfg.task, n_way=20))), meta, key, "test", ev.n_tasks, 0, None,
            ev.chunk, "protonet", soft_kmeans_steps=steps)
        assert res["methods"][name]["budgets"][0]["accuracy_mean"] == pytest.approx(float(acc.mean()))
        assert res["methods"][name]["budgets"][0]["loss_mean"] == pytest.approx(float(loss.mean()))
    eps = exp.sample(mx.random.key(1), "test", 2)
    plain, refined = protonet_scores(exp, meta, eps), protonet_scores(exp, meta, eps, 2)
    assert not np.allclose(plain[0], refined[0])  # the refinement changes the query losses
    with pytest.raises(ConfigError, match="eval.soft_kmeans_steps"):
        omniglot_config(shared_data, tmp_path, "maml", soft_kmeans_steps=1)
    with pytest.raises(ConfigError, match="eval.soft_kmeans_steps"):
        omniglot_config(shared_data, tmp_path, "protonet", soft_kmeans_steps=-1)


def test_other_ways_need_protonet_or_conv4():
    cfg = config_from_dict({"task": {"family": "xor", "n_way": 2}, "algorithm": {"name": "maml"},
                            "eval": {"n_way": 3, "n_tasks": 2, "select_tasks": 2}})
    meta = build_experiment(cfg).init_params(mx.random.key(0))
    with pytest.raises(ValueError, match="eval.n_way"):
        run_evaluation(cfg, "/nonexistent", meta, progress=False, log=lambda s: None)


def test_n_way_head_for_every_meta_parameter_kind(tiny_omniglot, tmp_path):
    from metafn.experiment import with_n_way_head
    from metafn.outer import MetaSGDParams

    for algorithm in ("maml", "metasgd", "mamlpp"):
        cfg = tiny_config(tiny_omniglot, tmp_path, algorithm)
        meta = init_meta(build_experiment(cfg), cfg.algorithm, mx.random.key(0))
        if isinstance(meta, MetaSGDParams):  # distinct rates per head column
            rng = np.random.default_rng(1)
            meta = meta._replace(lr=tree_map(lambda a: mx.array(rng.uniform(0.1, 0.5, a.shape),
                                                                dtype=a.dtype), meta.lr))
        new = with_n_way_head(meta, 7)
        params, old = (new, meta) if algorithm == "maml" else (new.params, meta.params)
        assert params["head"]["w"].shape == (4, 7) and float(mx.abs(params["head"]["w"]).max()) == 0
        assert_trees_close(params["blocks"], old["blocks"], 0, 0)
        if algorithm == "metasgd":
            w, b = meta.lr["head"]["w"], meta.lr["head"]["b"]
            assert new.lr["head"]["w"].shape == (4, 7) and new.lr["head"]["b"].shape == (7,)
            np.testing.assert_allclose(np.array(new.lr["head"]["w"]),
                                       np.repeat(np.array(w).mean(-1, keepdims=True), 7, -1), rtol=1e-6)
            np.testing.assert_allclose(np.array(new.lr["head"]["b"]), np.full(7, np.array(b).mean()), rtol=1e-6)
            assert_trees_close(new.lr["blocks"], meta.lr["blocks"], 0, 0)
        if algorithm == "mamlpp":
            assert_trees_close(new.lr, meta.lr, 0, 0)
    for bad in (0, -3, True):  # a named error for every kind, before any rate is shaped
        for algorithm in ("maml", "metasgd", "mamlpp"):
            cfg = tiny_config(tiny_omniglot, tmp_path, algorithm)
            with pytest.raises(ValueError, match="n_way: expected an int >= 1"):
                with_n_way_head(init_meta(build_experiment(cfg), cfg.algorithm, mx.random.key(0)), bad)
    # Meta-SGD meta-trained 3-way and tested 4-way: the evaluation runs from the zero head.
    cfg = tiny_config(tiny_omniglot, tmp_path, "metasgd", n_way=4)
    meta = init_meta(build_experiment(cfg), cfg.algorithm, mx.random.key(0))
    res = run_evaluation(cfg, tmp_path / "sgd", meta, progress=False, log=lambda s: None)
    assert res["head"].endswith("(learned head rates: their class mean)")
    (curve,) = res["methods"]["metasgd"]["curves"].values()
    assert curve["accuracy_mean"][0] == pytest.approx(1 / 4)


# ----------------------------------------------------------------------------- pooled baseline


def test_pooled_batch_labels_are_global_class_ids(tiny_omniglot):
    train_split = split_omniglot(load_omniglot(tiny_omniglot, image_size=16), rotations=True).train
    assert train_split.n_classes == TINY_TRAIN_CLASSES
    x, y = sample_omniglot_batch(mx.random.key(0), train_split, 40)
    assert x.shape == (40, 16, 16, 1) and x.dtype == mx.float32 and y.dtype == mx.int32
    x, y = np.rint(np.array(x)[..., 0] * 255).astype(np.uint8), np.array(y)
    # Every image of every class k = 4 c + r: character c's drawings rotated by r * 90 degrees.
    images = np.stack([np.rot90(train_split.images[k // 4], k % 4, axes=(-2, -1))
                       for k in range(TINY_TRAIN_CLASSES)])
    pairs = set()
    for img, label in zip(x, y):
        matches = np.nonzero(np.all(images == img, axis=(-2, -1)))  # (class, drawing) equal to img
        assert set(matches[0]) == {label}, "an image must match drawings of its own label only"
        pairs.add((int(label), int(matches[1][0])))
    assert len(pairs) == 40  # distinct (class, drawing) pairs
    x2, y2 = sample_omniglot_batch(mx.random.key(0), train_split, 40)
    np.testing.assert_array_equal(np.array(y2), y)
    with pytest.raises(ValueError, match="batch_size: 145 exceeds the 144 images"):
        sample_omniglot_batch(mx.random.key(0), train_split, 145)
    with pytest.raises(ValueError, match="batch_size"):
        sample_omniglot_batch(mx.random.key(0), train_split, 0)


def test_pooled_step_lowers_the_loss_on_a_fixed_batch(tiny_omniglot, tmp_path):
    task = build_pooled_task(tiny_config(tiny_omniglot, tmp_path))
    assert task.n_classes == TINY_TRAIN_CLASSES and task.batch_size == 8
    params = task.init_params(mx.random.key(0))
    assert params["head"]["w"].shape == (4, TINY_TRAIN_CLASSES)
    x, y = task.sample(mx.random.key(1))
    assert int(np.array(y).max()) < TINY_TRAIN_CLASSES
    optimizer = adam(0.01)
    update = pooled_update(task.loss, optimizer)
    opt_state = optimizer.init(params)
    first = task.loss(params, x, y).item()
    np.testing.assert_allclose(first, conv4_loss(params, x, y).item(), rtol=1e-6)
    losses = []
    for _ in range(5):
        params, opt_state, loss = update(params, opt_state, x, y)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(first, rel=1e-6)  # the loss before the update
    assert task.loss(params, x, y).item() < first


def test_zero_head_keeps_the_body():
    from metafn.nn import conv4_init

    params = conv4_init(mx.random.key(0), 10, hidden=4, image_size=16)
    swapped = with_zero_head(params, 3)
    assert swapped["head"]["w"].shape == (4, 3) and swapped["head"]["b"].shape == (3,)
    assert all(float(mx.abs(a).max()) == 0.0 for a in tree_leaves(swapped["head"]))
    assert_trees_close(swapped["blocks"], params["blocks"], 0, 0)
    assert params["head"]["w"].shape == (4, 10)  # the input is not modified
    with pytest.raises(ValueError, match="params"):
        with_zero_head([{"w": mx.zeros((2, 2)), "b": mx.zeros(2)}], 3)


def test_run_evaluation_pretrains_pooled_and_fine_tunes_an_n_way_head(tiny_omniglot, tmp_path):
    cfg = tiny_config(tiny_omniglot, tmp_path)
    meta = build_experiment(cfg).init_params(mx.random.key(0))
    out = tmp_path / "run"
    res = run_evaluation(cfg, out, meta, progress=False, log=lambda s: None)
    assert set(res["methods"]) == {"maml", "random_init", "pooled"}
    summary = res["pooled_train"]
    assert summary["n_classes"] == TINY_TRAIN_CLASSES and summary["steps"] == 3
    assert summary["batch_size"] == 8 and summary["train_seconds"] > 0
    assert [s for s, _ in summary["loss_log"]] == [1, 2, 3]
    pooled = res["methods"]["pooled"]
    assert pooled["kind"] == "adapt" and pooled["budgets"][0]["finetune_lr"] in (0.1, 0.4)
    # A zero 3-way head: before fine-tuning every logit is equal, so the query loss is log 3
    # and the (first-index) prediction is right for exactly one class in three.
    (curve,) = pooled["curves"].values()
    assert curve["loss_mean"][0] == pytest.approx(math.log(3), rel=1e-5)
    assert curve["accuracy_mean"][0] == pytest.approx(1 / 3)
    assert curve["accuracy_mean"][2] >= 0.0 and len(curve["loss_mean"]) == 3
    stored = mx.load(str(out / "pooled" / "last.safetensors"))
    assert stored["0.head.w"].shape == (4, TINY_TRAIN_CLASSES)
    # A second evaluation reuses the finished pre-training: same figures.
    logs = []
    again = run_evaluation(cfg, out, meta, progress=False, log=logs.append)
    assert any("reusing the finished run" in line for line in logs)
    assert again["methods"]["pooled"]["curves"] == pooled["curves"]
    # Other pre-training settings in the same directory are refused.
    other = tiny_config(tiny_omniglot, tmp_path, pooled_steps=4)
    with pytest.raises(ValueError, match="other settings"):
        run_evaluation(other, out, meta, progress=False, log=lambda s: None)


def test_pooled_config_errors_name_the_key(tiny_omniglot, tmp_path):
    with pytest.raises(ConfigError, match="eval.pooled_batch_size"):
        config_from_dict({"task": {"family": "sine"}, "eval": {"pooled_batch_size": 8}})
    with pytest.raises(ConfigError, match="eval.pooled_batch_size"):
        tiny_config(tiny_omniglot, tmp_path, pooled_batch_size=0)
    with pytest.raises(ValueError, match="eval.pooled_batch_size: 500 exceeds"):
        build_pooled_task(tiny_config(tiny_omniglot, tmp_path, pooled_batch_size=500))


# ----------------------------------------------------------------------------- mamlpp (LSLR)


def test_mamlpp_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="algorithm.inner_steps"):
        config_from_dict({"algorithm": {"name": "mamlpp", "inner_steps": 0}})
    with pytest.raises(ConfigError, match="algorithm.first_order"):
        config_from_dict({"algorithm": {"name": "maml", "first_order": True}})
    with pytest.raises(ConfigError, match=r"algorithm.inner_batches.*1 for maml \(only reptile"):
        config_from_dict({"algorithm": {"name": "maml", "inner_batches": 5}})
    with pytest.raises(ConfigError, match="algorithm.inner_batches.*an int >= 1"):
        config_from_dict({"algorithm": {"name": "reptile", "inner_batches": 0}})


def test_lslr_evaluation_uses_each_steps_rates_then_the_last(tiny_omniglot, tmp_path):
    cfg = tiny_config(tiny_omniglot, tmp_path, "mamlpp", {"inner_steps": 2})
    exp = build_experiment(cfg)
    meta = init_meta(exp, cfg.algorithm, mx.random.key(0))
    assert isinstance(meta, LSLRParams)
    rng = np.random.default_rng(0)
    meta = meta._replace(lr=tree_map(lambda a: mx.array(rng.uniform(0.05, 0.5, a.shape), dtype=a.dtype),
                                     meta.lr))
    assert learned_inner_rates(meta, 3) is not None
    eps = exp.sample(mx.random.key(1), "test", 2)
    loss, _ = adaptation_curve(exp, meta, eps, 3, None)
    params_t = tree_broadcast(meta.params, 2)
    for k in range(3):  # steps 0, 1 use their own rates; step 2 reuses step 1's
        params_t = batched_adapt(task_losses(exp), params_t, eps.support_x, eps.support_y, 1,
                                 lslr_rates(meta, min(k, 1)))
    direct = task_losses(exp).fn(params_t, eps.query_x, eps.query_y)
    np.testing.assert_allclose(loss[3], np.array(direct), rtol=1e-4, atol=1e-6)


def test_mamlpp_trains_and_evaluates_with_learned_rates(tiny_omniglot, tmp_path):
    cfg = tiny_config(tiny_omniglot, tmp_path, "mamlpp",
                      {"inner_steps": 2, "multi_step_loss": True, "first_order": True})
    state, summary = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert isinstance(state.meta, LSLRParams) and summary["step"] == 2
    # The rates were meta-learned: no longer all equal to inner_lr.
    assert any(float(mx.abs(a - 0.4).max()) > 0 for a in tree_leaves(state.meta.lr))
    res = run_evaluation(cfg, tmp_path / "run", state.meta, summary, progress=False, log=lambda s: None)
    assert set(res["methods"]) == {"mamlpp", "random_init", "pooled"}
    m = res["methods"]["mamlpp"]
    assert m["kind"] == "mamlpp" and all(b["finetune_lr"] is None for b in m["budgets"])


def test_train_on_val_adds_the_validation_alphabets_to_meta_train_only(shared_data, tmp_path):
    from metafn.experiment import _omniglot_splits

    cfg = omniglot_config(shared_data, tmp_path)
    plain = _omniglot_splits(cfg)
    fit = _omniglot_splits(dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, train_on_val=True)))
    assert fit["train"].alphabets == tuple(sorted(plain["train"].alphabets + plain["val"].alphabets))
    assert fit["train"].n_classes == plain["train"].n_classes + plain["val"].n_classes
    assert fit["val"].alphabets == plain["val"].alphabets and fit["test"].alphabets == plain["test"].alphabets
    assert not set(fit["train"].alphabets) & set(fit["test"].alphabets)
    with pytest.raises(ConfigError, match="task.train_on_val"):
        config_from_dict({"task": {"family": "sine", "train_on_val": True}})


def test_alphabet_lists_in_the_config_choose_the_split(shared_data, tmp_path):
    from metafn.experiment import _omniglot_splits

    cfg = omniglot_config(shared_data, tmp_path)
    plain = _omniglot_splits(cfg)
    one = _omniglot_splits(dataclasses.replace(cfg, task=dataclasses.replace(
        cfg.task, test_alphabets=("Balinese",))))
    assert one["test"].alphabets == ("Balinese",)
    assert one["train"].alphabets == plain["train"].alphabets and one["val"].alphabets == plain["val"].alphabets
    parsed = config_from_dict({"task": {"family": "omniglot", "n_way": 5, "test_alphabets": ["Balinese"]}})
    assert parsed.task.test_alphabets == ("Balinese",)
    with pytest.raises(ConfigError, match="task.test_alphabets"):
        config_from_dict({"task": {"family": "sine", "test_alphabets": ["Balinese"]}})
    with pytest.raises(ValueError, match="'Greek' is already in the val"):
        _omniglot_splits(dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, test_alphabets=("Greek",))))
