"""Final held-out evaluation of a run, with its baselines, written to ``results.json``.

Methods compared on the *same* test tasks:

- the meta-learned initialization (fine-tuned from it; nearest prototypes for ProtoNets);
- ``random_init``: a fresh random initialization fine-tuned with the same budget;
- ``pooled``: the model pre-trained on all training tasks pooled (the query loss at theta, no
  inner loop), for as many steps as the meta-training, then fine-tuned.

For each adaptation budget (``eval.budgets``, a number of fine-tuning steps) each method's rate
is chosen on validation tasks from ``eval.finetune_lrs`` (plus the trained inner rate) by its
score after that many steps; Meta-SGD uses its learned rates. Test figures are mean and 95% CI.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

from metafn.checkpoint import atomic_write_text, load_checkpoint, read_metadata
from metafn.config import Config, config_to_dict
from metafn.evaluate import curve_over_tasks, select_lr, summarize_curve
from metafn.experiment import Experiment, build_experiment, init_meta
from metafn.random import fold_in, key as make_key
from metafn.tree import PyTree

__all__ = ["evaluate_methods", "pooled_config", "run_evaluation", "load_meta", "episode_config"]

RANDOM_INIT_STREAM, SELECT_STREAM, TEST_STREAM = 3, 4, 5


def pooled_config(config: Config) -> Config:
    """The pooled pre-training baseline's config: same tasks and budget, no inner loop."""
    algo = dataclasses.replace(config.algorithm, name="pooled", inner_steps=0, step_weights=None,
                               multi_step_loss=False)
    steps = config.eval.pooled_steps or config.train.steps
    train = dataclasses.replace(config.train, steps=steps)
    return dataclasses.replace(config, name=f"{config.name}-pooled", algorithm=algo, train=train)


def episode_config(config: Config) -> Config:
    """``config`` with its task replaced by the evaluation episodes (``eval.n_way`` etc.)."""
    ev = config.eval
    changes = {k: getattr(ev, k) for k in ("n_way", "k_shot", "n_query", "within_alphabet") if getattr(ev, k) is not None}
    return dataclasses.replace(config, task=dataclasses.replace(config.task, **changes)) if changes else config


def load_meta(config: Config, path: str | Path) -> PyTree:
    """Meta-parameters of ``config`` from a ``best`` (parameters) or ``last`` (state) checkpoint."""
    import mlx.core as mx

    from metafn.train import TrainState, make_optimizer

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
    """Evaluate each ``name -> (meta, kind)`` where kind is ``adapt``, ``metasgd`` or ``protonet``.

    Per method: ``budgets``, one entry per adaptation budget with the rate chosen on validation
    tasks and the test mean and 95% CI after that many steps; ``curves``, the whole test
    curve (0..eval.steps) at each chosen rate.
    """
    ev = config.eval
    run_key = make_key(config.seed)
    budgets = ev.budgets or (ev.steps,)
    metric = "accuracy" if exp.classification else "loss"
    results: dict[str, Any] = {}
    for name, (meta, kind) in methods.items():
        t0 = time.perf_counter()
        if kind == "protonet":
            chosen = {0: (None, {})}
            steps = 0
        elif kind == "metasgd":
            chosen = {b: (None, {}) for b in budgets}
            steps = ev.steps
        else:
            candidates = tuple(sorted(set(ev.finetune_lrs) | {config.algorithm.inner_lr}))
            val_curves = {
                lr: curve_over_tasks(exp, meta, fold_in(run_key, SELECT_STREAM), "val",
                                     ev.select_tasks, ev.steps, lr, ev.chunk)
                for lr in candidates
            }
            chosen = {b: select_lr(val_curves, b, exp.classification) for b in budgets}
            steps = ev.steps
        scorer = "protonet" if kind == "protonet" else "adapt"
        curves: dict[str, Any] = {}
        entries = []
        for budget, (lr, table) in chosen.items():
            if repr(lr) not in curves:
                loss, acc = curve_over_tasks(exp, meta, fold_in(run_key, TEST_STREAM), "test",
                                             ev.n_tasks, steps, lr, ev.chunk, scorer)
                curves[repr(lr)] = summarize_curve(loss, acc)
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


def run_evaluation(
    config: Config,
    out_dir: str | Path,
    meta: PyTree,
    train_summary: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate ``meta`` and the baselines; write and return ``out_dir/results.json``."""
    from metafn.train import train

    out = Path(out_dir)
    eval_config = episode_config(config)
    exp = build_experiment(eval_config)
    algo = config.algorithm.name
    kind = {"protonet": "protonet", "metasgd": "metasgd"}.get(algo, "adapt")
    same_way = eval_config.task.n_way == config.task.n_way
    if not same_way and kind != "protonet":
        raise ValueError(
            f"eval.n_way: {algo} has a {config.task.n_way}-way head; only protonet can be "
            f"evaluated at another number of ways ({eval_config.task.n_way})"
        )
    methods: dict[str, tuple[PyTree, str]] = {algo: (meta, kind)}
    pooled_summary: dict[str, Any] | str | None = None
    if config.eval.baselines:
        random_params = exp.init_params(fold_in(make_key(config.seed), RANDOM_INIT_STREAM))
        methods["random_init"] = (random_params, "adapt")
        if config.task.family == "omniglot":
            pooled_summary = ("not run: pooled pre-training over Omniglot's global classes is not "
                              "implemented yet (episode labels are permuted per task)")
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
        "pooled_train": pooled_summary,
        "methods": evaluate_methods(exp, eval_config, methods, log),
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    return results
