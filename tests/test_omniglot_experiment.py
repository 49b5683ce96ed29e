"""Omniglot through the config / trainer / evaluation path (small conv4, real shared data)."""

from __future__ import annotations

import json

import metafn  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest

from metafn.config import config_from_dict
from metafn.experiment import build_experiment
from metafn.report import run_evaluation
from metafn.train import train


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
    assert set(results["methods"]) == {algorithm, "random_init"}
    assert "not run" in results["pooled_train"]
    acc = results["methods"][algorithm]["budgets"][0]["accuracy_mean"]
    assert 0.0 <= acc <= 1.0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["name"] == cfg.name


def test_protonet_can_be_tested_at_more_ways_but_maml_cannot(shared_data, tmp_path):
    cfg = omniglot_config(shared_data, tmp_path, "protonet", n_way=20, within_alphabet=True)
    meta = build_experiment(cfg).init_params(mx.random.key(0))
    res = run_evaluation(cfg, tmp_path / "p", meta, progress=False, log=lambda s: None)
    assert res["methods"]["protonet"]["budgets"][0]["accuracy_mean"] >= 0.0
    cfg = omniglot_config(shared_data, tmp_path, "maml", n_way=20)
    with pytest.raises(ValueError, match="eval.n_way"):
        run_evaluation(cfg, tmp_path / "m", meta, progress=False, log=lambda s: None)
