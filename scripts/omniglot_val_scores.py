"""Validation-only scores of a fine-tuned (e.g. Reptile) checkpoint at the test-time budgets (no test tasks touched).

    python scripts/omniglot_val_scores.py CONFIG CHECKPOINT OUT_JSON [lr ...]

Scores the 100 validation (Greek) episodes that `metafn eval` uses to choose fine-tuning rates
(fold_in(run_key, SELECT_STREAM), eval episode shape: 5-way 1-shot, 15 queries) after 1/5/10/50
fine-tuning steps with the config's inner rule, for each rate (default eval.finetune_lrs + inner_lr).
"""
import json, sys, time
import metafn  # noqa: F401  (BLAS before mlx)
from metafn.config import load_config
from metafn.evaluate import curve_over_tasks
from metafn.experiment import build_experiment, inner_rule
from metafn.random import fold_in, key as make_key
from metafn.report import SELECT_STREAM, episode_config, load_meta

cfg_path, ckpt, out = sys.argv[1:4]
config = load_config(cfg_path)
ev = config.eval
lrs = [float(x) for x in sys.argv[4:]] or sorted(set(ev.finetune_lrs) | {config.algorithm.inner_lr})
exp = build_experiment(episode_config(config))
meta = load_meta(config, ckpt)
budgets = (1, 5, 10, 50)
res = {"config": cfg_path, "checkpoint": ckpt, "rule": list(inner_rule(config.algorithm)), "scores": {}}
t0 = time.perf_counter()
for lr in lrs:
    loss, acc = curve_over_tasks(exp, meta, fold_in(make_key(config.seed), SELECT_STREAM), "val",
                                 ev.select_tasks, 50, lr, ev.chunk, score_at=frozenset(budgets),
                                 rule=inner_rule(config.algorithm))
    res["scores"][repr(lr)] = {b: float(acc[b].mean()) for b in budgets}
    print(lr, res["scores"][repr(lr)], flush=True)
res["seconds"] = time.perf_counter() - t0
json.dump(res, open(out, "w"), indent=1)
