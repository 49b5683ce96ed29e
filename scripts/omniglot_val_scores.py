"""Validation-only scores of a fine-tuned (e.g. Reptile) checkpoint at the test-time budgets (no test tasks touched).

    python scripts/omniglot_val_scores.py CONFIG CHECKPOINT OUT_JSON [lr ...] [--budgets 1 5 10 50]

Scores the 100 validation (Greek) episodes that `metafn eval` uses to choose fine-tuning rates
(fold_in(run_key, SELECT_STREAM), eval episode shape: 5-way 1-shot, 15 queries) after each budget
of fine-tuning steps (default 1/5/10/50) with the config's inner rule, for each rate (default
eval.finetune_lrs + inner_lr).
"""
import argparse, json, time
import metafn  # noqa: F401  (BLAS before mlx)
from metafn.config import load_config
from metafn.evaluate import curve_over_tasks
from metafn.experiment import build_experiment, inner_rule
from metafn.random import fold_in, key as make_key
from metafn.report import SELECT_STREAM, episode_config, load_meta

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("config")
parser.add_argument("checkpoint")
parser.add_argument("out")
parser.add_argument("lrs", nargs="*", type=float)
parser.add_argument("--budgets", nargs="+", type=int, default=[1, 5, 10, 50])
args = parser.parse_args()
cfg_path, ckpt, out = args.config, args.checkpoint, args.out
config = load_config(cfg_path)
ev = config.eval
lrs = args.lrs or sorted(set(ev.finetune_lrs) | {config.algorithm.inner_lr})
exp = build_experiment(episode_config(config))
meta = load_meta(config, ckpt)
budgets = tuple(sorted(args.budgets))
res = {"config": cfg_path, "checkpoint": ckpt, "rule": list(inner_rule(config.algorithm)), "scores": {}}
t0 = time.perf_counter()
for lr in lrs:
    loss, acc = curve_over_tasks(exp, meta, fold_in(make_key(config.seed), SELECT_STREAM), "val",
                                 ev.select_tasks, budgets[-1], lr, ev.chunk, score_at=frozenset(budgets),
                                 rule=inner_rule(config.algorithm))
    res["scores"][repr(lr)] = {b: float(acc[b].mean()) for b in budgets}
    print(lr, res["scores"][repr(lr)], flush=True)
res["seconds"] = time.perf_counter() - t0
json.dump(res, open(out, "w"), indent=1)
