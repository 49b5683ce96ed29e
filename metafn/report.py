"""Final held-out evaluation of a run, with its baselines, written to ``results.json``.

Methods compared on the *same* test tasks:

- the meta-learned initialization (fine-tuned from it; nearest prototypes for ProtoNets);
- ``random_init``: a fresh random initialization fine-tuned with the same budget;
- ``pooled``: the model pre-trained on all training tasks pooled, for ``eval.pooled_steps``
  steps (default: as many as the meta-training), then fine-tuned. Toy families: the query loss
  at theta on meta-batches of episodes (no inner loop; labels are each task's own). Omniglot:
  conv4 trained with plain cross-entropy over all meta-train classes under global labels
  (:func:`train_pooled_omniglot`); for evaluation its ``n_classes``-way head is replaced by a
  zero-initialized N-way head (:func:`metafn.experiment.with_zero_head`) and the whole network is
  fine-tuned on each episode's support set like the other methods.

For each adaptation budget (``eval.budgets``, a number of fine-tuning steps) each method's rate
is chosen on validation tasks from ``eval.finetune_lrs`` (plus the trained inner rate) by its
score after that many steps; Meta-SGD and mamlpp adapt with their learned rates (mamlpp's rate of
step ``k`` at step ``k``, its last learned step's rates beyond). Batch norm (conv4) always uses
the statistics of the batch it is given: the support set while fine-tuning, the query set when
scoring, for every method alike. Test figures are mean and 95% CI.

A conv4 algorithm evaluated at another number of ways than it was meta-trained on (``eval.n_way``)
starts from its body with a zero N-way head (:func:`metafn.experiment.with_n_way_head`), as the
pooled baseline does; ``results["head"]`` says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

from metafn.checkpoint import atomic_write_text, load_checkpoint, read_metadata, save_checkpoint
from metafn.config import Config, config_to_dict
from metafn.evaluate import curve_over_tasks, select_lr, summarize_curve
from metafn.experiment import (
    LEARNED_RATE_ALGORITHMS, Experiment, build_experiment, build_pooled_task, init_meta,
    inner_rule, pooled_update, with_n_way_head, with_zero_head,
)
from metafn.random import fold_in, key as make_key
from metafn.train import TrainState, TrainingDiverged, make_optimizer, train
from metafn.tree import PyTree

__all__ = ["evaluate_methods", "pooled_config", "run_evaluation", "load_meta", "episode_config",
           "train_pooled_omniglot"]

RANDOM_INIT_STREAM, SELECT_STREAM, TEST_STREAM, POOLED_INIT_STREAM, POOLED_DATA_STREAM = 3, 4, 5, 6, 7


def pooled_config(config: Config) -> Config:
    """The pooled pre-training baseline's config: same tasks and budget, no inner loop."""
    algo = dataclasses.replace(config.algorithm, name="pooled", inner_steps=0, step_weights=None,
                               multi_step_loss=False, first_order=False)
    steps = config.eval.pooled_steps or config.train.steps
    train_config = dataclasses.replace(config.train, steps=steps)
    eval_config = dataclasses.replace(config.eval, soft_kmeans_steps=0)
    return dataclasses.replace(config, name=f"{config.name}-pooled", algorithm=algo, train=train_config,
                               eval=eval_config)


def episode_config(config: Config) -> Config:
    """``config`` with its task replaced by the evaluation episodes (``eval.n_way`` etc.)."""
    ev = config.eval
    changes = {k: getattr(ev, k) for k in ("n_way", "k_shot", "n_query", "within_alphabet") if getattr(ev, k) is not None}
    return dataclasses.replace(config, task=dataclasses.replace(config.task, **changes)) if changes else config


def load_meta(config: Config, path: str | Path) -> PyTree:
    """Meta-parameters of ``config`` from a ``best`` (parameters) or ``last`` (state) checkpoint."""
    template = init_meta(build_experiment(config), config.algorithm, make_key(0))
    if read_metadata(path).get("kind") == "last":
        optimizer = make_optimizer(config)
        state = TrainState(template, optimizer.init(template), mx.array(0, dtype=mx.int32))
        return load_checkpoint(path, state)[0].meta
    return load_checkpoint(path, template)[0]


def evaluate_methods(
    exp: Experiment,
    config: Config,
    methods: dict[str, tuple[PyTree, str]],
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate each ``name -> (meta, kind)``; kind ``adapt`` (fine-tune at a rate chosen on
    validation tasks), ``metasgd`` or ``mamlpp`` (fine-tune with ``meta``'s learned rates),
    ``protonet`` (nearest prototypes) or ``soft_kmeans`` (nearest prototypes refined on the
    queries by ``eval.soft_kmeans_steps`` steps).

    Every ``adapt`` method (the meta-learned model and the baselines alike) fine-tunes with the
    inner rule of ``config.algorithm`` (:func:`metafn.experiment.inner_rule`: SGD, or Reptile's
    inner Adam), so a model is tested with the update it was meta-trained with.

    Per method: ``budgets``, one entry per adaptation budget with the rate chosen on validation
    tasks and the test mean and 95% CI after that many steps; ``curves``, the test curve
    (0..eval.steps) at each chosen rate, scored after step 0 and the budgets (every step with
    ``eval.full_curves``).
    """
    ev = config.eval
    run_key = make_key(config.seed)
    budgets = ev.budgets or (ev.steps,)
    select_at = frozenset(budgets)
    test_at = None if ev.full_curves else frozenset({0, *budgets})
    metric = "accuracy" if exp.classification else "loss"
    rule = inner_rule(config.algorithm)
    results: dict[str, Any] = {}
    for name, (meta, kind) in methods.items():
        t0 = time.perf_counter()
        if kind in ("protonet", "soft_kmeans"):
            chosen = {0: (None, {})}
            steps = 0
        elif kind in LEARNED_RATE_ALGORITHMS:
            chosen = {b: (None, {}) for b in budgets}
            steps = ev.steps
        else:
            candidates = tuple(sorted(set(ev.finetune_lrs) | {config.algorithm.inner_lr}))
            val_curves = {
                lr: curve_over_tasks(exp, meta, fold_in(run_key, SELECT_STREAM), "val",
                                     ev.select_tasks, ev.steps, lr, ev.chunk, score_at=select_at,
                                     rule=rule)
                for lr in candidates
            }
            chosen = {b: select_lr(val_curves, b, exp.classification) for b in budgets}
            steps = ev.steps
        scorer = "protonet" if kind in ("protonet", "soft_kmeans") else "adapt"
        refine = ev.soft_kmeans_steps if kind == "soft_kmeans" else 0
        method_rule = rule if kind == "adapt" else None
        curves: dict[str, Any] = {}
        entries = []
        for budget, (lr, table) in chosen.items():
            if repr(lr) not in curves:
                score_at = None if test_at is None or scorer == "protonet" else test_at
                loss, acc = curve_over_tasks(exp, meta, fold_in(run_key, TEST_STREAM), "test",
                                             ev.n_tasks, steps, lr, ev.chunk, scorer, score_at,
                                             method_rule, refine)
                curves[repr(lr)] = summarize_curve(loss, acc, score_at)
            curve = curves[repr(lr)]
            entries.append({
                "steps": budget, "finetune_lr": lr, "val_scores": table,
                f"{metric}_mean": curve[f"{metric}_mean"][budget],
                f"{metric}_ci95": curve[f"{metric}_ci95"][budget],
                **({"loss_mean": curve["loss_mean"][budget]} if metric == "accuracy" else {}),
            })
            log(f"{name}: {metric} after {budget} steps {entries[-1][f'{metric}_mean']:.4f} "
                f"+- {entries[-1][f'{metric}_ci95']:.4f} (lr {lr}, {curve['n_tasks']} test tasks)")
        results[name] = {"kind": kind, "budgets": entries, "curves": curves,
                         "eval_seconds": time.perf_counter() - t0}
    return results


def _pooled_settings(config: Config, batch_size: int) -> dict[str, Any]:
    """What determines a pooled pre-training run (a saved run is reused only if they match)."""
    t, tr = config.task, config.train
    return {
        "seed": config.seed, "data_dir": t.data_dir, "image_size": t.image_size,
        "rotations": t.rotations, "channels": config.model.channels,
        "steps": pooled_config(config).train.steps, "batch_size": batch_size,
        "optimizer": tr.optimizer, "outer_lr": tr.outer_lr, "schedule": tr.schedule,
        "clip_norm": tr.clip_norm,
    }


def train_pooled_omniglot(
    config: Config,
    out_dir: str | Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[PyTree, dict[str, Any]]:
    """Pre-train conv4 on all of Omniglot's meta-train classes pooled; returns ``(params, summary)``.

    Minimizes the mean cross-entropy over global class labels (:class:`~metafn.experiment.PooledTask`,
    ``n_classes``-way head, e.g. 688 = 172 characters x 4 rotations on the minimal sets) with
    the outer optimizer of ``config.train`` (``outer_lr``, ``schedule`` over the pooled steps,
    ``clip_norm``) for ``eval.pooled_steps`` steps (default ``train.steps``) of
    ``eval.pooled_batch_size`` images; the step count is not tuned on meta-val. Step ``t``'s
    batch comes from ``fold_in(data key, t)``, and the state is saved to
    ``out_dir/last.safetensors`` every ``train.save_interval`` steps and at the end, so an
    interrupted run resumes to the same parameters and a finished one is reused (its settings
    must match). ``summary``: ``n_classes``, ``steps``, ``batch_size``, ``train_seconds``,
    ``seconds_per_step``, ``final_loss`` and ``loss_log`` (``[step, loss]`` every
    ``train.log_interval`` steps, loss before that step's update).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pcfg = pooled_config(config)
    total = pcfg.train.steps
    task = build_pooled_task(config)
    optimizer = make_optimizer(pcfg)
    run_key = make_key(config.seed)
    params = task.init_params(fold_in(run_key, POOLED_INIT_STREAM))
    state = TrainState(params, optimizer.init(params), mx.array(0, dtype=mx.int32))
    settings = _pooled_settings(config, task.batch_size)
    path = out / "last.safetensors"
    elapsed, loss_log = 0.0, []
    if path.exists():
        state, meta = load_checkpoint(path, state)
        if meta.get("pooled") != settings:
            raise ValueError(f"out_dir: {out} holds a pooled pre-training with other settings "
                             f"({meta.get('pooled')}); remove it or evaluate into another --out")
        elapsed, loss_log = float(meta["train_seconds"]), meta["loss_log"]
        done = int(state.step.item())
        log(f"pooled pre-training: {'reusing the finished run' if done == total else 'resuming'} "
            f"in {path} (step {done} of {total})")
    update = pooled_update(task.loss, optimizer)
    update_fn = mx.compile(update) if config.train.compile else update
    data_key = fold_in(run_key, POOLED_DATA_STREAM)
    start = int(state.step.item())

    def save(st: TrainState) -> None:
        save_checkpoint(path, st, {"kind": "pooled", "pooled": settings, "step": int(st.step.item()),
                                   "train_seconds": elapsed, "loss_log": loss_log})

    bar = None
    if progress and start < total:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=f"{config.name}-pooled", unit="it", dynamic_ncols=True)
    t_mark = time.perf_counter()
    for t in range(start, total):
        x, y = task.sample(fold_in(data_key, t))
        new_params, new_opt, loss = update_fn(state.meta, state.opt_state, x, y)
        mx.eval(new_params, new_opt, loss)
        value = float(loss.item())
        if not math.isfinite(value):
            elapsed += time.perf_counter() - t_mark
            save(state)
            raise TrainingDiverged(f"pooled pre-training loss is {value} at step {t}; stopped (state "
                                   f"of step {t} in {path}). Lower train.outer_lr or set train.clip_norm.")
        state = TrainState(new_params, new_opt, state.step + 1)
        step = t + 1
        if step % config.train.log_interval == 0 or step == total:
            loss_log.append([step, value])
        if step % config.train.save_interval == 0 or step == total:
            elapsed += time.perf_counter() - t_mark
            t_mark = time.perf_counter()
            save(state)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=round(value, 4))
    if bar is not None:
        bar.close()
    done = int(state.step.item())
    summary = {
        "n_classes": task.n_classes, "steps": done, "batch_size": task.batch_size,
        "train_seconds": elapsed, "seconds_per_step": elapsed / max(done, 1),
        "final_loss": loss_log[-1][1] if loss_log else None, "loss_log": loss_log,
        "head": f"{task.n_classes}-way head replaced by a zero-initialized N-way head for fine-tuning",
    }
    return state.meta, summary


def run_evaluation(
    config: Config,
    out_dir: str | Path,
    meta: PyTree,
    train_summary: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate ``meta`` and the baselines; write and return ``out_dir/results.json``."""
    out = Path(out_dir)
    eval_config = episode_config(config)
    exp = build_experiment(eval_config)
    algo = config.algorithm.name
    kind = algo if algo in ("protonet", *LEARNED_RATE_ALGORITHMS) else "adapt"
    same_way = eval_config.task.n_way == config.task.n_way
    head_note = None
    if not same_way and kind != "protonet":
        if config.task.family != "omniglot":
            raise ValueError(
                f"eval.n_way: {algo} on {config.task.family} has a {config.task.n_way}-way head; "
                f"only protonet, or conv4 on omniglot (re-headed), can be evaluated at another "
                f"number of ways ({eval_config.task.n_way})"
            )
        meta = with_n_way_head(meta, eval_config.task.n_way)
        head_note = (f"meta-trained {config.task.n_way}-way head replaced by a zero "
                     f"{eval_config.task.n_way}-way head"
                     + (" (learned head rates: their class mean)" if algo == "metasgd" else ""))
        log(f"evaluating {algo} at {eval_config.task.n_way} ways: {head_note}")
    methods: dict[str, tuple[PyTree, str]] = {algo: (meta, kind)}
    if config.eval.soft_kmeans_steps:
        methods["protonet_soft_kmeans"] = (meta, "soft_kmeans")
    pooled_summary: dict[str, Any] | None = None
    if config.eval.baselines:
        random_params = exp.init_params(fold_in(make_key(config.seed), RANDOM_INIT_STREAM))
        methods["random_init"] = (random_params, "adapt")
        if config.task.family == "omniglot" and algo != "pooled":
            steps = pooled_config(config).train.steps
            log(f"pre-training the pooled baseline over all meta-train classes ({steps} steps) "
                f"in {out / 'pooled'}")
            pooled_params, pooled_summary = train_pooled_omniglot(config, out / "pooled", progress, log)
            methods["pooled"] = (with_zero_head(pooled_params, eval_config.task.n_way), "adapt")
        elif algo != "pooled" and same_way:
            pcfg = pooled_config(config)
            log(f"training the pooled pre-training baseline ({pcfg.train.steps} steps) in {out / 'pooled'}")
            pstate, pooled_summary = train(pcfg, out / "pooled", progress=progress, log=log)
            methods["pooled"] = (pstate.meta, "adapt")
    results = {
        "name": config.name,
        "config": config_to_dict(config),
        "protocol": (
            f"{config.eval.n_tasks} held-out test tasks; for each budget (fine-tuning steps) the "
            f"rate per method is chosen on {config.eval.select_tasks} validation tasks; mean and "
            f"95% CI (1.96 sd / sqrt(n))"
        ),
        "train": train_summary,
        "head": head_note,
        "pooled_train": pooled_summary,
        "methods": evaluate_methods(exp, eval_config, methods, log),
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    return results
