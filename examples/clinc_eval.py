"""Cross-domain evaluation on CLINC150's held-out domains (travel, utility, work): N-way K-shot
episodes, Q queries per class, the same episodes for every method (paired comparisons).

Methods:
- ``proto``: frozen all-MiniLM-L6-v2, nearest cosine prototype (no gradient step);
- ``random``: LoRA from its own initialization (B = 0) + prototype-initialized head, adapted
  on the support set;
- ``NAME=PATH``: a meta-learned initialization (``best.safetensors`` of
  ``examples/clinc_meta.py``), adapted the same way.

Adaptation hyperparameters (steps in {0, --steps}, adapter rate in --lrs) are chosen per method
on ``--val-episodes`` episodes of the validation domain ('meta'); with 0 steps the classifier
is nearest-prototype on the (adapted) encoder, computed from one embedding pass over the pool.

    python examples/clinc_eval.py --episodes 600 --shot 1 \
        fomaml=/work/runs/clinc/meta/lora/best.safetensors reptile=/work/runs/clinc/meta_reptile/best.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import metafn  # noqa: E402,F401
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from clinc_common import (CACHED_STATE_METHODS, DEFAULT_CACHE, episode_accuracies,  # noqa: E402
                          episode_rows, load_all, log, peft_method)
from metafn import text_meta as tm  # noqa: E402
from metafn.checkpoint import load_checkpoint  # noqa: E402
from metafn.evaluate import mean_ci  # noqa: E402
from metafn.random import fold_in  # noqa: E402


def pool_rows(data, domains) -> np.ndarray:
    from metafn.tasks.clinc import resolve_domains

    rows = []
    for d in resolve_domains(data, domains):
        for intent in data.domains[d]:
            rows += list(data.by_intent["train"][intent])
    return np.array(sorted(rows))


def proto_from_embeddings(emb: np.ndarray, eps, way: int) -> np.ndarray:
    s, sy, q, qy = eps
    return tm.proto_accuracy(emb[s], sy, emb[q], qy, way)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inits", nargs="*", help="NAME=PATH meta-learned checkpoints")
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--val-episodes", type=int, default=100)
    ap.add_argument("--way", type=int, default=5)
    ap.add_argument("--shot", type=int, default=1)
    ap.add_argument("--query", type=int, default=15)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lrs", default="1e-3,1e-2")
    ap.add_argument("--head-lr", type=float, default=1e-2)
    ap.add_argument("--no-random-adapt", action="store_true",
                    help="evaluate random-init LoRA at 0 steps only (it equals proto there)")
    ap.add_argument("--method", default="lora", choices=CACHED_STATE_METHODS + ("frozen",))
    ap.add_argument("--split", type=int, default=3)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", default="query,value")
    ap.add_argument("--n-tokens", type=int, default=10, help="prefix tuning: virtual tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=Path("/work/runs/clinc/cross_domain.json"))
    args = ap.parse_args(argv)

    data, caches, (cfg, params, _) = load_all((args.split,), args.cache, which=("train",), log=log)
    tr = caches["train"]
    xs, masks = tr.states[args.split], tr.mask
    model = tm.text_model(params, cfg, peft_method(args.method, args.r, args.alpha, args.targets.split(","),
                                      args.n_tokens),
                          args.split)
    root = mx.random.key(args.seed)
    test = episode_rows(fold_in(root, 1000 + args.shot), data, tr, "test", args.episodes, args.way,
                        args.shot, args.query)
    val = episode_rows(fold_in(root, 2000 + args.shot), data, tr, "val", args.val_episodes, args.way,
                       args.shot, args.query)
    pools = {"test": pool_rows(data, "test"), "val": pool_rows(data, "val")}
    results: dict = {"options": {k: str(v) for k, v in vars(args).items()}, "methods": {}}

    acc = proto_from_embeddings(tr.emb, test, args.way)
    results["methods"]["proto"] = {"test": acc.tolist(), "chosen": "0 steps (frozen)"}
    log(f"proto: {100 * mean_ci(acc)[0]:.2f} +- {100 * mean_ci(acc)[1]:.2f}")

    random = tm.meta_init(model, fold_in(root, 3))
    inits = {"random": random}
    for spec in args.inits:
        name, path = spec.split("=", 1)
        meta, md = load_checkpoint(path, random)
        inits[name] = meta
        results["methods"].setdefault(name, {})["checkpoint"] = {"path": path, "metadata": md}
    grid = [tm.AdaptConfig(steps=0)] + [
        tm.AdaptConfig(steps=args.steps, lr=float(lr), head_lr=args.head_lr, optimizer="adam")
        for lr in args.lrs.split(",")]
    for name, meta in inits.items():
        t0 = time.perf_counter()
        emb_full = np.zeros_like(tr.emb)
        for split_name, rows in pools.items():
            ridx = mx.array(rows.astype(np.int32))
            emb_full[rows] = np.array(tm.embed_all(model, meta.adapter, xs[ridx], masks[ridx]))
        cand = grid if not (name == "random" and args.no_random_adapt) else grid[:1]
        scores = []
        for g in cand:
            if g.steps == 0:
                a = proto_from_embeddings(emb_full, val, args.way)
            else:
                a = episode_accuracies(model, meta, xs, masks, val, args.way, g)
            scores.append(float(a.mean()))
            log(f"{name} val steps {g.steps} lr {g.lr}: {100 * scores[-1]:.2f}")
        best = cand[int(np.argmax(scores))]
        if best.steps == 0:
            a = proto_from_embeddings(emb_full, test, args.way)
        else:
            a = episode_accuracies(model, meta, xs, masks, test, args.way, best)
        rec = results["methods"].setdefault(name, {})
        rec.update({"test": a.tolist(), "val_scores": scores, "grid": [vars(g) for g in cand],
                    "chosen": vars(best), "seconds": time.perf_counter() - t0})
        m, ci = mean_ci(a)
        log(f"{name}: test {100 * m:.2f} +- {100 * ci:.2f} (steps {best.steps}, lr {best.lr})")

    base = {n: np.array(r["test"]) for n, r in results["methods"].items()}
    summary = {}
    for n, a in base.items():
        m, ci = mean_ci(a)
        summary[n] = {"mean": m, "ci95": ci, "n": len(a)}
        for ref in ("proto", "random"):
            if n != ref and ref in base:
                dm, dci = mean_ci(a - base[ref])
                summary[n][f"minus_{ref}"] = {"mean": dm, "ci95": dci}
    results["summary"] = summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    for n, s in summary.items():
        extra = "".join(f", {k} {100 * v['mean']:+.2f} +- {100 * v['ci95']:.2f}"
                        for k, v in s.items() if k.startswith("minus_"))
        log(f"== {n}: {100 * s['mean']:.2f} +- {100 * s['ci95']:.2f}{extra}")


if __name__ == "__main__":
    main()
