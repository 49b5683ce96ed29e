"""Meta-learn a PEFT adapter on CLINC150 cross-domain episodes (Reptile, FOMAML or MAML),
with the all-MiniLM-L6-v2 base frozen and the head initialized from class prototypes.

Meta-training episodes come from the six train domains (banking, credit_cards,
kitchen_and_dining, home, auto_and_commute, small_talk); the 'meta' domain is validation
(checkpoint selection, evaluation hyperparameters); travel, utility and work are held out
(:mod:`examples.clinc_eval`). Tasks of a meta-batch are vmapped.

    python examples/clinc_meta.py --algo fomaml --minutes 40 --out /work/runs/clinc/meta_fomaml
    python examples/clinc_meta.py --algo maml --inner-steps 2 --minutes 40 --out .../meta_maml
    python examples/clinc_meta.py --algo reptile --inner-steps 4 --minutes 40 --out .../meta_reptile
    python examples/clinc_meta.py --algo pooled --minutes 40 --out .../pooled

``--algo pooled`` is the transfer baseline (DESIGN.md: pre-training on all tasks pooled):
supervised 90-way classification of every train-domain utterance (cosine head initialized
from the frozen prototypes, Adam on adapter + head, minibatches of ``--batch``); only the
adapter is kept. ``--algo protonet`` trains with 0 inner steps (ProtoNet over the adapter).

Writes ``<out>/best.safetensors`` (best validation accuracy), ``<out>/last.safetensors`` and
``<out>/log.jsonl``.
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
from metafn.checkpoint import save_checkpoint  # noqa: E402
from metafn.evaluate import mean_ci  # noqa: E402
from metafn.optim import adam, apply_updates, chain, clip_by_global_norm  # noqa: E402
from metafn.random import fold_in  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algo", choices=("fomaml", "maml", "reptile", "protonet", "pooled"), default="fomaml")
    ap.add_argument("--method", default="lora", choices=CACHED_STATE_METHODS + ("frozen",))
    ap.add_argument("--split", type=int, default=3)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", default="query,value")
    ap.add_argument("--n-tokens", type=int, default=10, help="prefix tuning: virtual tokens")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--way", type=int, default=5)
    ap.add_argument("--shot", type=int, default=1)
    ap.add_argument("--query", type=int, default=5)
    ap.add_argument("--inner-steps", type=int, default=2)
    ap.add_argument("--inner-lr", type=float, default=0.5)
    ap.add_argument("--inner-head-lr", type=float, default=0.5)
    ap.add_argument("--meta-lr", type=float, default=1e-3)
    ap.add_argument("--scale", type=float, default=10.0)
    ap.add_argument("--learn-scale", action="store_true")
    ap.add_argument("--clip", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=32, help="pooled: utterances per step")
    ap.add_argument("--head-lr", type=float, default=1e-2, help="pooled: head learning rate")
    ap.add_argument("--minutes", type=float, default=40.0)
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--val-episodes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logf = open(args.out / "log.jsonl", "a")

    def record(rec: dict) -> None:
        logf.write(json.dumps(rec) + "\n")
        logf.flush()

    data, caches, (cfg, params, _) = load_all((args.split,), args.cache, which=("train",), log=log)
    tr = caches["train"]
    xs, masks = tr.states[args.split], tr.mask
    model = tm.text_model(params, cfg, peft_method(args.method, args.r, args.alpha, args.targets.split(","),
                                      args.n_tokens),
                          args.split)
    root = mx.random.key(args.seed)
    meta = tm.meta_init(model, fold_in(root, 0), args.scale)
    n_params = sum(v.size for _, v in metafn.tree.tree_flatten(meta.adapter))
    log(f"{args.algo} over {model.method.name}: {n_params} adapter parameters")
    opt = chain(clip_by_global_norm(args.clip), adam(args.meta_lr))
    opt_state = opt.init(meta)
    inner_opt = "adam" if args.algo == "reptile" else "sgd"  # Reptile: Adam inside (Nichol et al.)
    train_cfg = tm.AdaptConfig(steps=args.inner_steps, lr=args.inner_lr, head_lr=args.inner_head_lr,
                               optimizer=inner_opt)
    if args.algo == "protonet":
        train_cfg = tm.AdaptConfig(steps=0)
    val_eps = episode_rows(fold_in(root, 99), data, tr, "val", args.val_episodes, args.way,
                           args.shot, 10)
    eval_cfg = tm.AdaptConfig(steps=args.inner_steps, lr=args.inner_lr,
                              head_lr=args.inner_head_lr, optimizer=inner_opt)
    eval0 = tm.AdaptConfig(steps=0)

    def validate(step: int) -> float:
        t0 = time.perf_counter()
        a0 = episode_accuracies(model, meta, xs, masks, val_eps, args.way, eval0)
        a = episode_accuracies(model, meta, xs, masks, val_eps, args.way, eval_cfg) if args.inner_steps else a0
        m0, _ = mean_ci(a0)
        m, ci = mean_ci(a)
        log(f"val step {step}: proto {100 * m0:.2f}, adapted {100 * m:.2f} +- {100 * ci:.2f} "
            f"({time.perf_counter() - t0:.0f}s)")
        record({"step": step, "val_proto": m0, "val_adapted": m, "val_ci95": ci,
                "val_seconds": time.perf_counter() - t0})
        return max(m, m0)

    if args.algo == "pooled":
        from metafn.tasks.clinc import resolve_domains

        intents = [t for d in resolve_domains(data, "train") for t in data.domains[d]]
        pool = np.array(sorted(r for t in intents for r in data.by_intent["train"][t]))
        label = {t: i for i, t in enumerate(intents)}
        pool_y = np.zeros(len(tr.labels), np.int32)
        for t in intents:
            pool_y[list(data.by_intent["train"][t])] = label[t]
        np_masks = np.array(masks)
        pooled_head = tm.proto_head(mx.array(tr.emb[pool]), mx.array(pool_y[pool]), len(intents))
        head_opt = adam(args.head_lr)
        head_state = head_opt.init(pooled_head)
        pool_rng = np.random.default_rng(args.seed)
        scale = args.scale

        def pooled_loss(ad, hd, x, m, y):
            return tm.text_loss(model, ad, hd, scale, x, m, y)

        pooled_grad = mx.value_and_grad(pooled_loss, argnums=(0, 1))
        log(f"pooled: {len(pool)} utterances of {len(intents)} intents")

    best = validate(0)
    save_checkpoint(args.out / "best.safetensors", meta, {"step": 0, "val": best, "args": vars(args) | {"out": str(args.out), "cache": str(args.cache)}})
    start = time.perf_counter()
    train_seconds = 0.0
    step = 0
    hist = []
    while step < args.max_steps and train_seconds < args.minutes * 60:
        step += 1
        t0 = time.perf_counter()
        if args.algo == "pooled":
            rows = np.sort(pool_rng.choice(pool, size=args.batch, replace=False))
            ln = tm.bucket_length(np_masks[rows])
            idx = mx.array(rows.astype(np.int32))
            loss, (ga, gh) = pooled_grad(meta.adapter, pooled_head, xs[idx][:, :ln],
                                         masks[idx][:, :ln], mx.array(pool_y[rows]))
            grads = tm.MetaParams(ga, mx.zeros_like(meta.log_scale))
            uh, head_state = head_opt.update(gh, head_state, pooled_head)
            pooled_head = apply_updates(pooled_head, uh)
            acc = mx.array([0.0])
            mx.eval(pooled_head, head_state)
        else:
            s, sy, q, qy = episode_rows(fold_in(fold_in(root, 1), step), data, tr, "train",
                                        args.tasks, args.way, args.shot, args.query)
            batch = tm.text_batch(xs, masks, s, sy, q, qy)
        if args.algo == "pooled":
            pass
        elif args.algo == "reptile":
            loss, grads, acc = tm.text_reptile_grad(model, meta, batch, args.way, train_cfg)
        else:
            loss, grads, acc = tm.text_maml_outer(model, meta, batch, args.way, train_cfg,
                                                  first_order=args.algo != "maml",
                                                  learn_scale=args.learn_scale)
        updates, opt_state = opt.update(grads, opt_state, meta)
        meta = apply_updates(meta, updates)
        mx.eval(meta, opt_state, loss, acc)
        dt = time.perf_counter() - t0
        train_seconds += dt
        hist.append((float(loss.item()), float(mx.mean(acc).item()), dt))
        if step % 10 == 0:
            h = np.array(hist[-10:])
            log(f"step {step}: loss {h[:, 0].mean():.4f} acc {h[:, 1].mean():.3f} "
                f"{h[:, 2].mean():.2f}s/step scale {float(mx.exp(meta.log_scale).item()):.2f}")
            record({"step": step, "loss": h[:, 0].mean(), "acc": h[:, 1].mean(),
                    "sec_per_step": h[:, 2].mean(), "train_seconds": train_seconds})
        if step % args.val_every == 0:
            v = validate(step)
            if v > best:
                best = v
                save_checkpoint(args.out / "best.safetensors", meta,
                                {"step": step, "val": v, "train_seconds": train_seconds})
    v = validate(step)
    if v > best:
        best = v
        save_checkpoint(args.out / "best.safetensors", meta, {"step": step, "val": v, "train_seconds": train_seconds})
    save_checkpoint(args.out / "last.safetensors", meta, {"step": step, "train_seconds": train_seconds})
    record({"done": True, "steps": step, "train_seconds": train_seconds,
            "wall_seconds": time.perf_counter() - start, "best_val": best})
    log(f"done: {step} steps, {train_seconds / 60:.1f} min of meta-training, best val {100 * best:.2f}")


if __name__ == "__main__":
    main()
