"""Meta-training driver: exact resume (also after SIGKILL), NaN handling, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import metafn  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
import yaml

from helpers import assert_trees_equal
from metafn.checkpoint import load_checkpoint, read_metadata
from metafn.config import config_from_dict
from metafn.train import TrainingDiverged, train
from metafn.tree import tree_all_finite

SMALL = {
    "name": "tiny",
    "seed": 3,
    "task": {"family": "sine", "k_shot": 5, "n_query": 5},
    "model": {"hidden": [16, 16]},
    "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1},
    "train": {"steps": 20, "meta_batch_size": 4, "log_interval": 2, "eval_interval": 5,
              "save_interval": 5, "val_tasks": 8, "compile": False},
    "eval": {"n_tasks": 20, "steps": 2, "select_tasks": 10, "chunk": 10, "finetune_lrs": [0.01]},
}


def small_config(**train_overrides):
    data = json.loads(json.dumps(SMALL))
    data["train"].update(train_overrides)
    return config_from_dict(data)


def strip_times(lines):
    return [json.loads(ln) for ln in lines]


@pytest.mark.parametrize("algorithm", ["maml", "reptile", "metasgd"])
def test_interrupted_run_resumes_to_identical_parameters(tmp_path, algorithm):
    data = json.loads(json.dumps(SMALL))
    data["algorithm"]["name"] = algorithm
    config = config_from_dict(data)
    full, _ = train(config, tmp_path / "full", progress=False, log=lambda s: None)
    part, first = train(config, tmp_path / "part", progress=False, stop_after=8, log=lambda s: None)
    assert int(part.step.item()) == 8
    resumed, summary = train(config, tmp_path / "part", progress=False, log=lambda s: None)
    assert int(resumed.step.item()) == 20
    # the resumed run's times continue the first part's (wall clock and process CPU)
    assert summary["train_seconds"] > first["train_seconds"] > 0
    assert summary["train_cpu_seconds"] > first["train_cpu_seconds"] > 0
    assert_trees_equal(resumed.meta, full.meta)
    assert_trees_equal(resumed.opt_state, full.opt_state)
    logs = [strip_times((tmp_path / d / "metrics.jsonl").read_text().splitlines()) for d in ("full", "part")]
    assert logs[0] == logs[1]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    data = json.loads(json.dumps(SMALL))
    data["train"].update(steps=400, save_interval=20, eval_interval=100, log_interval=20)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "metafn.cli", "train", "--config", str(cfg_path), "--no-eval",
           "--no-progress"]
    full = subprocess.run(cmd + ["--out", str(tmp_path / "full")], capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "last.safetensors"
    deadline = time.time() + 120
    while time.time() < deadline and not last.exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = read_metadata(last)["step"]
    assert 0 < step_at_kill <= 400
    again = subprocess.run(cmd + ["--out", str(tmp_path / "killed")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    a = mx.load(str(tmp_path / "full" / "last.safetensors"))
    b = mx.load(str(tmp_path / "killed" / "last.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = small_config(optimizer="sgd", outer_lr=1e6, steps=50)
    with pytest.raises(TrainingDiverged, match="step"):
        train(config, tmp_path, progress=False, log=lambda s: None)
    meta = read_metadata(tmp_path / "last.safetensors")
    assert "diverged_at" in meta and meta["step"] == meta["diverged_at"]
    from metafn.experiment import build_experiment
    from metafn.optim import sgd
    from metafn.train import TrainState, init_train_state, make_optimizer

    template = init_train_state(build_experiment(config), config, make_optimizer(config))
    state, _ = load_checkpoint(tmp_path / "last.safetensors", template)
    assert tree_all_finite(state.meta)


def test_resume_with_a_different_config_is_refused(tmp_path):
    train(small_config(steps=5), tmp_path, progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="different config"):
        train(small_config(steps=6), tmp_path, progress=False, log=lambda s: None)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "metafn.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_cli_train_eval_writes_results(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "run"
    res = run_cli("train", "--config", str(cfg), "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"maml", "random_init", "pooled"}
    m = results["methods"]["maml"]
    (budget,) = m["budgets"]
    assert budget["steps"] == 2 and budget["finetune_lr"] == 0.01 and budget["loss_ci95"] >= 0
    (curve,) = m["curves"].values()
    assert len(curve["loss_mean"]) == 3 and curve["n_tasks"] == 20
    assert (out / "metrics.jsonl").exists() and (out / "best.json").exists()
    res = run_cli("eval", "--checkpoint", str(out / "best.safetensors"), "--out", str(tmp_path / "ev"),
                  "--n-tasks", "10", "--no-progress")
    assert res.returncode == 0, res.stderr
    ev_results = json.loads((tmp_path / "ev" / "results.json").read_text())
    ev = ev_results["methods"]["maml"]
    assert next(iter(ev["curves"].values()))["n_tasks"] == 10
    # The training summary is the whole run's (last checkpoint); the evaluated checkpoint's own
    # step and training time are recorded beside it.
    best = json.loads((out / "best.json").read_text())
    train = ev_results["train"]
    assert train["step"] == SMALL["train"]["steps"]
    assert train["checkpoint"] == {"file": "best.safetensors", "step": best["step"],
                                   "train_seconds": best["train_seconds"]}
    assert 0 < train["checkpoint"]["train_seconds"] <= train["train_seconds"]


def test_cli_bench_reports_what_the_figure_depends_on(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "bench.json"
    res = run_cli("bench", "--config", str(cfg), "--warmup", "1", "--repeats", "3", "--out", str(out),
                  "--set", "train.meta_batch_size=2")
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report == json.loads(res.stdout)
    assert report["algorithm"] == SMALL["algorithm"]["name"] and report["repeats"] == 3
    assert report["overrides"] == ["train.meta_batch_size=2"]
    assert 0 < report["ms_min"] <= report["ms_per_meta_step_median"] <= report["ms_max"]
    assert {"blas", "malloc", "mlx", "device", "openblas_num_threads"} <= set(report)


@pytest.mark.parametrize(
    "text, message",
    [
        ("task: {family: sine, k_shot: 0}", "task.k_shot"),
        ("task: {family: sinus}", "task.family"),
        ("algorithm: {name: mamal}", "algorithm.name"),
        ("algorithm: {inner_lr: .nan}", "algorithm.inner_lr"),
        ("train: {stepz: 3}", "train.stepz: unknown key"),
        ("train: {steps: ten}", "train.steps"),
        ("task: [unclosed", "not valid YAML"),
        ("task: {family: sine, translation_range: [-1, 1]}", "task.translation_range"),
        ("task: {family: linear2d, n_way: 2, translation_range: [1, -1]}", "task.translation_range"),
        ("task: {family: linear2d, n_way: 2, translation_range: [0, 1, 2]}", "task.translation_range"),
        ("- just\n- a list", "expected a mapping"),
    ],
)
def test_cli_bad_config_gets_clear_error(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    res = run_cli("validate", "--config", str(cfg))
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_cli_validate_shipped_configs():
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        res = run_cli("validate", "--config", str(path))
        assert res.returncode == 0, (path, res.stdout, res.stderr)


def test_translation_range_reaches_the_task_family():
    from metafn.experiment import build_experiment

    data = {"task": {"family": "linear2d", "n_way": 2, "k_shot": 2, "n_query": 2,
                     "translation_range": [3.0, 3.0]}}
    episodes = build_experiment(config_from_dict(data)).sample(mx.random.key(0), "train", 4)
    # A fixed translation of (3, 3) moves every point of [-1.25, 1.25]^2 (plus noise) there.
    assert float(episodes.support_x.mean()) == pytest.approx(3.0, abs=0.5)


def test_pooled_baseline_config_drops_the_inner_loop_settings():
    from metafn.report import pooled_config

    data = json.loads(json.dumps(SMALL))
    data["algorithm"].update(inner_steps=3, step_weights=[2.0, 1.0, 1.0])
    pooled = pooled_config(config_from_dict(data))
    assert pooled.algorithm.name == "pooled" and pooled.algorithm.inner_steps == 0
    assert pooled.algorithm.step_weights is None and pooled.train.steps == data["train"]["steps"]


def test_validation_score_is_the_weighted_multi_step_objective():
    from metafn.evaluate import curve_over_tasks
    from metafn.experiment import build_experiment, init_meta
    from metafn.random import fold_in
    from metafn.train import EVAL_STREAM, validation_score

    data = json.loads(json.dumps(SMALL))
    data["algorithm"].update(inner_steps=2, step_weights=[3.0, 1.0])
    config = config_from_dict(data)
    exp = build_experiment(config)
    meta = init_meta(exp, config.algorithm, mx.random.key(1))
    run_key = mx.random.key(2)
    scores = validation_score(exp, config, meta, run_key)
    loss, _ = curve_over_tasks(exp, meta, fold_in(run_key, EVAL_STREAM), "val",
                               config.train.val_tasks, 2, config.algorithm.inner_lr,
                               config.eval.chunk, "adapt")
    l1, l2 = float(loss[1].mean()), float(loss[2].mean())
    assert scores["val_loss"] == pytest.approx((3 * l1 + l2) / 4, rel=1e-6)
    assert scores["val_loss_last"] == pytest.approx(l2, rel=1e-6)


def protonet_config(n_way, val_n_way=None, algorithm="protonet"):
    """A tiny linear2d config (``n_way`` classes) validated at ``val_n_way`` ways if given."""
    data = json.loads(json.dumps(SMALL))
    data["task"] = {"family": "linear2d", "n_way": n_way, "k_shot": 2, "n_query": 3}
    data["algorithm"] = {"name": algorithm}
    data["train"].update(steps=4, eval_interval=4, save_interval=4)
    if val_n_way is not None:
        data["train"]["val_n_way"] = val_n_way
    return config_from_dict(data)


def logged_validation(out_dir):
    return [r for r in strip_times((out_dir / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]


def test_val_n_way_validates_on_episodes_of_that_many_ways(tmp_path):
    from metafn.experiment import build_experiment
    from metafn.random import key
    from metafn.train import validation_config, validation_score

    config = protonet_config(6, val_n_way=3)
    val_config = validation_config(config)
    assert (val_config.task.n_way, config.task.n_way) == (3, 6)
    episodes = build_experiment(val_config).sample(key(0), "val", 2)
    assert episodes.support_y.shape == (2, 3 * 2) and set(np.array(episodes.support_y).ravel()) == {0, 1, 2}
    state, _ = train(config, tmp_path / "run", progress=False, log=lambda s: None)
    (logged,) = logged_validation(tmp_path / "run")
    # the episodes and scores of a run trained and validated 3-way, not those of 6-way episodes
    three_way = protonet_config(3)
    at_three = validation_score(build_experiment(three_way), three_way, state.meta, key(config.seed))
    at_six = validation_score(build_experiment(config), config, state.meta, key(config.seed))
    assert logged["val_loss"] == pytest.approx(at_three["val_loss"], rel=1e-6)
    assert logged["val_accuracy"] == pytest.approx(at_three["val_accuracy"], rel=1e-6)
    assert logged["val_loss"] != pytest.approx(at_six["val_loss"], rel=1e-3)


def test_without_val_n_way_validation_uses_the_training_ways(tmp_path):
    from metafn.experiment import build_experiment
    from metafn.random import key
    from metafn.train import validation_config, validation_score

    config = protonet_config(6)
    assert validation_config(config) is config
    assert validation_config(protonet_config(6, val_n_way=6)).task == config.task
    state, _ = train(config, tmp_path / "run", progress=False, log=lambda s: None)
    (logged,) = logged_validation(tmp_path / "run")
    at_six = validation_score(build_experiment(config), config, state.meta, key(config.seed))
    assert logged["val_loss"] == pytest.approx(at_six["val_loss"], rel=1e-6)


@pytest.mark.parametrize("value, algorithm, expected", [
    (1, "protonet", "null or an int >= 2"),
    ("20", "protonet", "int or null"),
    (3, "maml", "null for maml"),
    (3, "metasgd", "null for metasgd"),
])
def test_bad_val_n_way_errors_name_the_key(value, algorithm, expected):
    from metafn.config import ConfigError

    with pytest.raises(ConfigError, match=r"^train\.val_n_way: ") as info:
        protonet_config(6, val_n_way=value, algorithm=algorithm)
    assert expected in str(info.value)
