"""Choose ProtoNet's soft k-means refinement steps on the validation alphabet (no test episodes).

    python scripts/omniglot_soft_kmeans_val.py CHECKPOINT OUT_JSON [--steps 0 1 2 3 5] [--episodes 300]

Scores the checkpoint on validation episodes (the split of the checkpoint's config: Greek by
default) of the three ProtoNet protocols, 5-way 1-shot, 20-way 1-shot and within-alphabet
20-way 1-shot, 5 queries per class, with the prototypes refined on each episode's queries by
each number of soft k-means steps (:func:`metafn.outer.soft_kmeans_logits`; 0 = plain ProtoNet).
Every step count sees the same episodes (key 7), and the mean accuracy with its 95% CI is
written per protocol and step count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import metafn  # noqa: F401  (BLAS before mlx)
import mlx.core as mx
import numpy as np

from metafn.checkpoint import read_metadata
from metafn.config import config_from_dict
from metafn.evaluate import mean_ci
from metafn.experiment import build_experiment
from metafn.outer import soft_kmeans_logits
from metafn.random import key as make_key
from metafn.report import load_meta

PROTOCOLS = {"5way": (5, False), "20way": (20, False), "20way_within": (20, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--steps", nargs="+", type=int, default=[0, 1, 2, 3, 5])
    parser.add_argument("--episodes", type=int, default=300)
    args = parser.parse_args()
    config = config_from_dict(read_metadata(args.checkpoint)["config"])
    meta = load_meta(config, args.checkpoint)
    res = {"checkpoint": args.checkpoint, "episodes": args.episodes, "queries_per_class": 5, "scores": {}}
    t0 = time.perf_counter()
    for name, (n_way, within) in PROTOCOLS.items():
        task = dataclasses.replace(config.task, n_way=n_way, k_shot=1, n_query=5, within_alphabet=within)
        exp = build_experiment(dataclasses.replace(config, task=task))
        sx, sy, qx, qy = exp.sample(make_key(7), "val", args.episodes)
        hits = {s: [] for s in args.steps}
        for t in range(args.episodes):
            emb = exp.embed(meta, mx.concatenate([sx[t], qx[t]]))
            es, eq = emb[: sx.shape[1]], emb[sx.shape[1]:]
            for s in args.steps:
                pred = mx.argmax(soft_kmeans_logits(es, sy[t], eq, n_way, s), axis=-1)
                hits[s].append(mx.mean(pred == qy[t]).item())
        res["scores"][name] = {}
        for s in args.steps:
            mean, ci = mean_ci(np.array(hits[s]))
            res["scores"][name][str(s)] = {"accuracy": mean, "ci95": ci}
            print(f"{name} soft k-means steps {s}: {100 * mean:.2f} +- {100 * ci:.2f}", flush=True)
    res["seconds"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
