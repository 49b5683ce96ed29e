"""Meta-training: a pure step and a thin driver around it.

``meta_train_step(state, key) -> (state, metrics)`` samples a meta-batch with ``key``, computes
the algorithm's meta-gradient and applies the outer optimizer; it touches no files. The driver
(:func:`train`) only does I/O around it: the key of step ``t`` is ``fold_in(run_key, t)``,
validation every ``eval_interval`` steps on a fixed set of validation tasks, an atomic checkpoint
every ``save_interval`` (``last.safetensors``) and of the best validation score
(``best.safetensors``), JSON-lines metrics, a progress bar. Because the state (parameters,
optimizer state, step) is saved whole and step keys do not depend on history, a run resumed from
its checkpoint ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import mlx.core as mx

from metafn.checkpoint import load_checkpoint, save_checkpoint
from metafn.config import Config, config_to_dict
from metafn.evaluate import curve_over_tasks
from metafn.experiment import (
    LEARNED_RATE_ALGORITHMS, step_loss_weights, Experiment, build_experiment, init_meta, inner_rule,
    meta_gradient,
)
from metafn.optim import (
    GradientTransformation, adam, apply_updates, chain, clip_by_global_norm,
    cosine_decay_schedule, sgd,
)
from metafn.random import fold_in, key as make_key
from metafn.tree import PyTree, tree_norm

__all__ = ["TrainState", "TrainingDiverged", "make_optimizer", "init_train_state",
           "make_meta_train_step", "train", "validation_config", "validation_score"]

INIT_STREAM, TRAIN_STREAM, EVAL_STREAM = 0, 1, 2


class TrainingDiverged(RuntimeError):
    """The meta-loss became NaN or infinite; the last good state was kept."""


class TrainState(NamedTuple):
    """Everything that evolves during meta-training."""

    meta: PyTree
    opt_state: PyTree
    step: mx.array


def make_optimizer(config: Config) -> GradientTransformation:
    """The outer optimizer of ``config.train``: optional clipping, then Adam or SGD."""
    t = config.train
    lr = cosine_decay_schedule(t.outer_lr, t.steps) if t.schedule == "cosine" else t.outer_lr
    base = adam(lr) if t.optimizer == "adam" else sgd(lr)
    return chain(clip_by_global_norm(t.clip_norm), base) if t.clip_norm else base


def init_train_state(exp: Experiment, config: Config, optimizer: GradientTransformation) -> TrainState:
    """Step 0: meta-parameters from ``fold_in(seed key, INIT_STREAM)`` and a fresh optimizer."""
    meta = init_meta(exp, config.algorithm, fold_in(make_key(config.seed), INIT_STREAM))
    return TrainState(meta, optimizer.init(meta), mx.array(0, dtype=mx.int32))


def make_meta_train_step(
    exp: Experiment, config: Config, optimizer: GradientTransformation
) -> Callable[[TrainState, mx.array], tuple[TrainState, dict[str, mx.array]]]:
    """The pure ``meta_train_step(state, key) -> (state, {"loss", "grad_norm"})``.

    The update (meta-gradient + optimizer) is compiled with ``mx.compile`` when
    ``config.train.compile`` is set; sampling stays outside (it may use NumPy for images).
    """
    grad_fn = meta_gradient(exp, config.algorithm)

    def update(meta: PyTree, opt_state: PyTree, episodes: Any) -> tuple:
        loss, grads = grad_fn(meta, episodes)
        updates, opt_state = optimizer.update(grads, opt_state, meta)
        return apply_updates(meta, updates), opt_state, loss, tree_norm(grads)

    update_fn = mx.compile(update) if config.train.compile else update
    batch = config.train.meta_batch_size

    def meta_train_step(state: TrainState, key: mx.array) -> tuple[TrainState, dict[str, mx.array]]:
        episodes = exp.sample(key, "train", batch)
        meta, opt_state, loss, gnorm = update_fn(state.meta, state.opt_state, episodes)
        return TrainState(meta, opt_state, state.step + 1), {"loss": loss, "grad_norm": gnorm}

    return meta_train_step


def validation_config(config: Config) -> Config:
    """``config`` with its task shaped as the training-time validation episodes.

    ``train.val_n_way`` (protonet) replaces ``task.n_way``, as ``eval.n_way`` reshapes the
    evaluation episodes (:func:`metafn.report.episode_config`); unset, ``config`` itself.
    """
    n_way = config.train.val_n_way
    if n_way is None or n_way == config.task.n_way:
        return config
    return dataclasses.replace(config, task=dataclasses.replace(config.task, n_way=n_way))


def validation_score(exp: Experiment, config: Config, meta: PyTree, run_key: mx.array) -> dict[str, float]:
    """Query loss/accuracy after ``inner_steps`` adaptation on the fixed validation tasks
    (with the inner rule of meta-training, :func:`metafn.experiment.inner_rule`).

    ``exp`` samples the validation episodes: ``build_experiment(validation_config(config))``.
    The tasks depend only on ``config.seed``, the episode shape, ``train.val_tasks`` and
    ``eval.chunk``, so two runs validated at the same shape see the same episodes.

    With a multi-step meta-objective (``step_weights`` / ``multi_step_loss``) ``val_loss`` is that
    objective on the validation tasks, ``sum_s w_s L_s / sum_s w_s`` over the query losses ``L_s``
    after ``s = 1..S`` steps (so the best checkpoint is the one best at what was trained for), and
    ``val_loss_last`` is ``L_S``; otherwise ``val_loss = L_S``.
    """
    algo = config.algorithm
    scorer = "protonet" if algo.name == "protonet" else "adapt"
    lr = None if algo.name in LEARNED_RATE_ALGORITHMS else algo.inner_lr
    steps = max(algo.inner_steps, 1)
    weights = step_loss_weights(algo)
    loss, acc = curve_over_tasks(
        exp, meta, fold_in(run_key, EVAL_STREAM), "val", config.train.val_tasks, steps, lr,
        config.eval.chunk, scorer, None if weights is not None or scorer == "protonet" else frozenset({steps}),
        inner_rule(algo),
    )
    out = {"val_loss": float(loss[-1].mean())}
    if weights is not None:
        per_step = [float(loss[s].mean()) for s in range(1, steps + 1)]
        out = {"val_loss": sum(w * v for w, v in zip(weights, per_step)) / sum(weights),
               "val_loss_last": per_step[-1]}
    if acc is not None:
        out["val_accuracy"] = float(acc[-1].mean())
    return out


def _better(new: dict[str, float], old: dict[str, float] | None) -> bool:
    if old is None:
        return True
    if "val_accuracy" in new:
        return new["val_accuracy"] > old["val_accuracy"]
    return new["val_loss"] < old["val_loss"]


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log records after ``last_step`` (they belong to the part of a run being redone)."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= last_step]
    path.write_text("".join(ln + "\n" for ln in kept))


def train(
    config: Config,
    out_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
) -> tuple[TrainState, dict[str, Any]]:
    """Meta-train ``config`` writing to ``out_dir``; returns the final state and a summary.

    ``out_dir`` receives ``last.safetensors``, ``best.safetensors`` (with ``.json`` metadata),
    ``metrics.jsonl`` and ``config.json``. With ``resume`` an existing ``last.safetensors``
    is continued. ``stop_after`` ends the process-local run after that many steps (used to
    test interruption). A non-finite loss saves the last good state and raises
    :class:`TrainingDiverged`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exp = build_experiment(config)
    val_config = validation_config(config)
    val_exp = exp if val_config is config else build_experiment(val_config)
    optimizer = make_optimizer(config)
    state = init_train_state(exp, config, optimizer)
    run_key = make_key(config.seed)
    train_key = fold_in(run_key, TRAIN_STREAM)
    last_path, best_path, log_path = out / "last.safetensors", out / "best.safetensors", out / "metrics.jsonl"
    config_dict = config_to_dict(config)
    best: dict[str, float] | None = None
    elapsed = cpu = 0.0  # wall-clock and process CPU seconds of the training loop (validation included)
    if resume and last_path.exists():
        state, meta = load_checkpoint(last_path, state)
        if meta.get("config") != config_dict:
            raise ValueError(
                f"out_dir: {out} holds a run with a different config; use another --out or --no-resume"
            )
        best = meta.get("best")
        elapsed = float(meta.get("train_seconds", 0.0))
        cpu = float(meta.get("train_cpu_seconds", 0.0))
        log(f"resuming from {last_path} at step {int(state.step.item())}")
    _truncate_log(log_path, int(state.step.item()))
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))

    def metadata(st: TrainState, extra: dict[str, Any]) -> dict[str, Any]:
        return {"config": config_dict, "step": int(st.step.item()), "best": best,
                "train_seconds": elapsed, "train_cpu_seconds": cpu, **extra}

    step_fn = make_meta_train_step(exp, config, optimizer)
    total = config.train.steps
    start = int(state.step.item())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=config.name, unit="it", dynamic_ncols=True)
    t_mark, c_mark = time.perf_counter(), time.process_time()

    def clock() -> None:
        """Add the wall-clock and CPU time since the last mark to ``elapsed`` / ``cpu``; mark now."""
        nonlocal elapsed, cpu, t_mark, c_mark
        now, now_cpu = time.perf_counter(), time.process_time()
        elapsed, cpu = elapsed + now - t_mark, cpu + now_cpu - c_mark
        t_mark, c_mark = now, now_cpu

    with open(log_path, "a") as logf:
        for t in range(start, total):
            if stop_after is not None and t - start >= stop_after:
                break
            new_state, metrics = step_fn(state, fold_in(train_key, t))
            mx.eval(new_state, metrics)
            loss = float(metrics["loss"].item())
            if not math.isfinite(loss):
                clock()
                save_checkpoint(last_path, state, metadata(state, {"diverged_at": t}))
                raise TrainingDiverged(
                    f"meta-loss is {loss} at step {t}; stopped. The last good state (step {t}) is in "
                    f"{last_path}; lower train.outer_lr or algorithm.inner_lr, or set train.clip_norm."
                )
            state = new_state
            step = t + 1
            if step % config.train.log_interval == 0 or step == total:
                record = {"step": step, "loss": loss, "grad_norm": float(metrics["grad_norm"].item())}
                logf.write(json.dumps(record) + "\n")
                logf.flush()
            if step % config.train.eval_interval == 0 or step == total:
                scores = validation_score(val_exp, config, state.meta, run_key)
                logf.write(json.dumps({"step": step, **scores}) + "\n")
                logf.flush()
                if _better(scores, best):
                    best = {**scores, "step": step}
                    clock()
                    save_checkpoint(best_path, state.meta, metadata(state, {"kind": "best"}))
                if bar is not None:
                    bar.set_postfix({k.replace("val_", ""): round(v, 4) for k, v in scores.items()})
            if step % config.train.save_interval == 0 or step == total:
                clock()
                save_checkpoint(last_path, state, metadata(state, {"kind": "last"}))
            if bar is not None:
                bar.update(1)
    clock()
    if bar is not None:
        bar.close()
    done = int(state.step.item())
    summary = {"step": done, "best": best, "train_seconds": elapsed, "train_cpu_seconds": cpu,
               "seconds_per_step": elapsed / max(done, 1)}
    return state, summary
