"""CLINC150 standard few-shot protocol: all 150 intents, K labelled utterances each from the train
split, accuracy on every in-scope utterance of the val split (3,000), over several draws of the
K shots.

Methods (each fine-tunes from the frozen all-MiniLM-L6-v2):

- ``proto``: nearest class prototype (cosine) on frozen sentence embeddings;
- ``logreg``: multinomial logistic regression on frozen embeddings (L2, full batch);
- ``head``: cosine head initialized from the prototypes, trained on frozen embeddings;
- ``lora`` / ``full`` / ...: a PEFT adapter on encoder layers ``split..5`` plus the
  prototype-initialized cosine head, trained with cross-entropy (metafn.text_meta.finetune).

Hyperparameters are chosen on a validation set carved from train utterances that are not
shots (``--eval carve``, 5 per intent); the reported figures use ``--eval val``.

Every fine-tuned model is scored several ways at once (``scores`` in the output record; the
top-level ``carve`` / ``val`` entries are the first): ``head`` the fine-tuned cosine head;
``proto`` nearest prototype of the tuned shot embeddings; ``lr`` logistic regression on the
tuned shot embeddings; ``head+lr`` their averaged probabilities; ``head+frozenlr@w`` the head's
probabilities mixed with weight ``w`` of the frozen-embedding logistic regression's.
Options: ``--con-epochs`` a supervised contrastive stage (SetFit / CPFT style, pairs of
utterances of one intent as positives) before the classifier; ``--ensemble N`` averages ``N``
fine-tuned models (different seeds); ``--names`` adds each intent's name ("book flight") as
one more training utterance (label semantics: not part of the plain K-shot protocol).

Variants that use the train split's other utterances *without labels* (the unlabelled pool:
train minus the shots minus the carved holdout; never val). Not the plain K-shot protocol;
report them as their own rows:

- ``--self-train M [M ...]`` scorers ``st@M``: the ``lr`` scorer pseudo-labels the pool, the
  ``M`` most confident utterances per predicted intent are kept
  (:func:`metafn.text_meta.pseudo_label`) and logistic regression is refitted on the tuned
  embeddings of shots + pseudo-labels; ``--st-rounds R`` repeats it from the previous fit's
  labels (``st@MrR``); ``--st-finetune M`` also fine-tunes the encoder on them (``stft-*``).
- ``--init-adapter`` starts from an adapter pre-trained by ``clinc_pretrain.py`` (SimCSE on the
  pool, no labels).

    python examples/clinc_standard.py --method proto logreg --shots 5 10 --draws 5
    python examples/clinc_standard.py --method lora --shots 5 --draws 1 --eval carve --lr 1e-3
    python examples/clinc_standard.py --method lora --shots 5 10 --draws 5 --eval val

The configuration chosen on the holdout (results/clinc/standard.json; report the ``lr`` score,
logistic regression on the LoRA-tuned embeddings; add ``--names`` for the label-name variant):

    python examples/clinc_standard.py --method lora --eval both --carve 20 --shots 5 10 \
        --draws 5 --epochs 8 --lr 1e-3 --head-lr 1e-2 --scale 10 --ls 0.1 --token-drop 0.15 \
        --split 3 --r 8 --targets query,value

Self-training variant (unlabelled train utterances; scorer ``st@80r2`` chosen on the holdout,
results/clinc/semi_supervised.json): the same command with ``--self-train 80 --st-rounds 2``.
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

from clinc_common import DEFAULT_CACHE, few_shot_rows, load_all, log, parse_targets  # noqa: E402
from metafn import peft  # noqa: E402
from metafn import text_meta as tm  # noqa: E402
from metafn.random import fold_in  # noqa: E402


def mean_ci(values: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of the normal 95% interval ``1.96 sd / sqrt(n)`` (as
    ``metafn.evaluate.mean_ci``; kept here so the example imports only the text stack)."""
    v = np.asarray(values, np.float64)
    sd = v.std(ddof=1) if v.size > 1 else 0.0
    return float(v.mean()), float(1.96 * sd / np.sqrt(v.size))


def make_method(name: str, args: argparse.Namespace) -> peft.PeftMethod | None:
    targets = parse_targets(args.targets)
    if name == "lora":
        return peft.lora_method(peft.LoraConfig(r=args.r, alpha=args.alpha, dropout=args.dropout,
                                                target_modules=targets), unmerged=True)
    if name == "dora":
        return peft.dora_method(peft.DoraConfig(r=args.r, alpha=args.alpha, target_modules=targets))
    if name == "full":
        return peft.full_method(peft.FullConfig(exclude=args.full_exclude))
    if name == "bitfit":
        return peft.head_method(peft.HeadConfig(modules=r".*\.b"))
    if name == "head":
        return None
    raise ValueError(f"--method: unknown {name!r}")


def logreg(train_x: np.ndarray, train_y: np.ndarray, n: int, l2: float, steps: int = 300) -> tuple:
    """Multinomial logistic regression ``softmax(x W + b)`` with penalty ``l2 ||W||^2 / 2`` (full
    batch Adam)."""
    x, y = mx.array(train_x), mx.array(train_y)
    params = {"w": mx.zeros((x.shape[1], n)), "b": mx.zeros((n,))}

    def loss(p):
        return tm.softmax_ce(x @ p["w"] + p["b"], y) + 0.5 * l2 * mx.sum(p["w"] ** 2)

    from metafn.optim import adam, apply_updates

    opt = adam(0.05)
    st = opt.init(params)
    g = mx.value_and_grad(loss)
    for _ in range(steps):
        _, gr = g(params)
        u, st = opt.update(gr, st, params)
        params = apply_updates(params, u)
        mx.eval(params, st)
    return params


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", nargs="+", default=["proto"])
    ap.add_argument("--shots", type=int, nargs="+", default=[5])
    ap.add_argument("--draws", type=int, default=1)
    ap.add_argument("--first-draw", type=int, default=0)
    ap.add_argument("--eval", choices=("carve", "val", "both"), default="carve")
    ap.add_argument("--carve", type=int, default=5, help="validation utterances per intent")
    ap.add_argument("--split", type=int, default=3, help="adapt encoder layers split..5")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--targets", default="query,value")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--head-lr", type=float, default=1e-2)
    ap.add_argument("--scale", type=float, default=20.0)
    ap.add_argument("--ls", type=float, default=0.0, help="label smoothing")
    ap.add_argument("--wd", type=float, default=0.0)
    ap.add_argument("--token-drop", type=float, default=0.0)
    ap.add_argument("--proto-weight", type=float, default=0.0)
    ap.add_argument("--classes-per-batch", type=int, default=16)
    ap.add_argument("--l2", type=float, default=1e-4, help="logreg penalty")
    ap.add_argument("--full-exclude", default=None, help="--method full: regex of frozen leaves")
    ap.add_argument("--con-epochs", type=int, default=0,
                    help="supervised contrastive epochs before the classifier stage")
    ap.add_argument("--con-lr", type=float, default=None, help="contrastive stage rate (--lr)")
    ap.add_argument("--con-scale", type=float, default=20.0, help="contrastive 1/temperature")
    ap.add_argument("--con-classes", type=int, default=32, help="classes per contrastive batch")
    ap.add_argument("--con-weight", type=float, default=0.0,
                    help="supervised contrastive term added to the classifier stage")
    ap.add_argument("--ensemble", type=int, default=1, help="fine-tuned models averaged")
    ap.add_argument("--names", action="store_true",
                    help="add each intent's name as a training utterance (label semantics)")
    ap.add_argument("--extra-l2", type=float, nargs="*", default=[1e-3, 1e-5],
                    help="more penalties of the tuned-embedding logreg, scored as lr@l2")
    ap.add_argument("--mix", type=float, nargs="+", default=[0.25, 0.5],
                    help="weights of the frozen logreg in the head+frozenlr scores")
    ap.add_argument("--init-adapter", type=Path, default=None,
                    help="start the adapter from this adapter.safetensors (clinc_pretrain.py: "
                         "self-supervised on unlabelled train utterances)")
    ap.add_argument("--self-train", type=int, nargs="*", default=[],
                    help="self-training scorers st@M: pseudo-label the unlabelled train pool "
                         "(train minus shots minus the carved holdout) with the lr scorer, keep "
                         "the M most confident per predicted intent, refit lr on shots + those")
    ap.add_argument("--st-rounds", type=int, default=1,
                    help="self-training rounds (round r > 1 scored as st@MrR, pseudo-labels "
                         "from round r - 1's fit)")
    ap.add_argument("--st-finetune", type=int, default=0,
                    help="self-train the encoder too: fine-tune again (--st-epochs) on the shots "
                         "+ the pseudo-labels of st@M (its last round), scored stft-head / stft-lr")
    ap.add_argument("--st-epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="encoder directory (default all-MiniLM-L6-v2; e.g. the all-mpnet-base-v2 "
                         "of python -m metafn.nn.packaged)")
    ap.add_argument("--out", type=Path, default=Path("/work/runs/clinc/standard.jsonl"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)

    global _MODEL
    data, caches, (bcfg, bparams, tok) = load_all((args.split,), args.cache, log=log,
                                                  model_dir=args.model_dir)
    _MODEL = (bparams, bcfg)
    tr, va = caches["train"], caches["val"]
    n_cls = len(data.intents)
    root = mx.random.key(args.seed)
    names = None
    if args.names:
        table = tm.pretokenize(tok, [t.replace("_", " ") for t in data.intents], 32)
        st, _ = tm.precompute_layers(bparams, bcfg, table, (args.split,))
        names = (st[args.split], table.mask, np.arange(n_cls))
    for method_name in args.method:
        for k in args.shots:
            accs: dict[str, list[float]] = {"carve": [], "val": []}
            scores: dict[str, dict[str, list[float]]] = {}
            times = []
            for d in range(args.first_draw, args.first_draw + args.draws):
                key = fold_in(fold_in(root, k), d)
                carve = args.carve if args.eval in ("carve", "both") else 0
                s_rows, s_y, c_rows, c_y = few_shot_rows(key, data, tr, k, carve)
                evals = {}
                if carve:
                    evals["carve"] = ("train", c_rows, c_y)
                if args.eval in ("val", "both"):
                    evals["val"] = ("val", np.arange(len(va.labels)), va.labels)
                t0 = time.perf_counter()
                frozen_lr = logreg(tr.emb[s_rows], s_y, n_cls, args.l2)
                if method_name in ("proto", "logreg"):
                    x = tr.emb[s_rows]
                    if method_name == "proto":
                        head = tm.proto_head(mx.array(x), mx.array(s_y), n_cls)
                        score = lambda e: np.array(tm.head_logits(head, mx.array(e), 1.0))  # noqa: E731
                    else:
                        p = frozen_lr
                        score = lambda e: np.array(mx.array(e) @ p["w"] + p["b"])  # noqa: E731
                    for name, (split, rows, y) in evals.items():
                        emb = (tr if split == "train" else va).emb[rows]
                        accs[name].append(tm.accuracy_np(score(emb), y))
                else:
                    probs = {name: {} for name in evals}
                    for member in range(args.ensemble):
                        mkey = key if member == 0 else fold_in(key, 100 + member)
                        pool = None
                        if args.self_train:
                            pool = np.setdiff1d(np.arange(len(tr.labels)),
                                                np.concatenate([s_rows, c_rows]))
                        got = fit_and_score(method_name, args, tr, va, s_rows, s_y, evals, n_cls,
                                            mkey, names, log, pool)
                        for name, sc in got.items():
                            for sname, pr in sc.items():
                                probs[name][sname] = probs[name].get(sname, 0.0) + pr / args.ensemble
                    for name, (split, rows, yy) in evals.items():
                        emb = (tr if split == "train" else va).emb[rows]
                        flr = _softmax(emb @ np.array(frozen_lr["w"]) + np.array(frozen_lr["b"]))
                        pr = probs[name]
                        pr["frozenlr"] = flr
                        pr["head+lr"] = 0.5 * (pr["head"] + pr["lr"])
                        for w in args.mix:
                            pr[f"head+frozenlr@{w:g}"] = (1 - w) * pr["head"] + w * flr
                            pr[f"head+lr+frozenlr@{w:g}"] = (1 - w) * pr["head+lr"] + w * flr
                        for sname, p_ in pr.items():
                            scores.setdefault(name, {}).setdefault(sname, []).append(
                                tm.accuracy_np(p_, yy))
                        accs[name].append(scores[name]["head"][-1])
                        log(f"  {name}: " + ", ".join(f"{sn} {v[-1]:.4f}"
                                                     for sn, v in scores[name].items()))
                times.append(time.perf_counter() - t0)
                log(f"{method_name} K={k} draw {d}: " + ", ".join(
                    f"{n} {accs[n][-1]:.4f}" for n in evals) + f" ({times[-1]:.0f}s)")
            rec = {"method": method_name, "shots": k, "draws": args.draws,
                   "first_draw": args.first_draw, "tag": args.tag, "seconds": times,
                   "args": {a: (str(v) if isinstance(v, Path) else v) for a, v in vars(args).items()}}
            for name, v in accs.items():
                if v:
                    m_, ci = mean_ci(np.array(v))
                    rec[name] = {"mean": m_, "ci95": ci, "values": v}
                    log(f"== {method_name} K={k} {name}: {100 * m_:.2f} +- {100 * ci:.2f}")
            if scores:
                rec["scores"] = {}
                for name, per in scores.items():
                    rec["scores"][name] = {}
                    for sname, v in per.items():
                        m_, ci = mean_ci(np.array(v))
                        rec["scores"][name][sname] = {"mean": m_, "ci95": ci, "values": v}
                    log(f"== {method_name} K={k} {name} scores: " + ", ".join(
                        f"{sn} {100 * r['mean']:.2f}" for sn, r in rec["scores"][name].items()))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def fit_and_score(method_name: str, args: argparse.Namespace, tr, va, s_rows: np.ndarray,
                  s_y: np.ndarray, evals: dict, n_cls: int, key: mx.array, names, log,
                  pool: np.ndarray | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Fine-tune one model on the shots (optional contrastive stage, then the prototype-
    initialized cosine head with cross-entropy) and return, per evaluation set, the class
    probabilities of each scorer (``head``, ``proto``, ``lr``)."""
    method = make_method(method_name, args)
    model = tm.text_model(*_params(), method, args.split)
    x_all = tr.states[args.split]
    idx = mx.array(s_rows.astype(np.int32))
    x, m, y = x_all[idx], tr.mask[idx], mx.array(s_y.astype(np.int32))
    if names is not None:
        nx, nm, ny = names
        x = mx.concatenate([x, nx.astype(x.dtype)], axis=0)
        m = mx.concatenate([m, nm.astype(m.dtype)], axis=0)
        y = mx.concatenate([y, mx.array(ny.astype(np.int32))], axis=0)
    adapter = tm.meta_init(model, fold_in(key, 1)).adapter
    if args.init_adapter is not None:
        loaded, _ = peft.load_tree(args.init_adapter)
        if set(loaded) != set(adapter):
            raise ValueError(f"--init-adapter: {args.init_adapter} adapts {sorted(loaded)[:3]}..., "
                             f"this model {sorted(adapter)[:3]}... (--split / --targets differ?)")
        adapter = loaded
    ep_log = lambda r: log(f"  epoch {r['epoch']} loss {r['loss']:.4f} {r['seconds']:.0f}s")  # noqa: E731
    if args.con_epochs:
        ccfg = tm.FinetuneConfig(epochs=args.con_epochs, lr=args.con_lr or args.lr, head_lr=0.0,
                                 scale=args.con_scale, weight_decay=args.wd,
                                 token_drop=args.token_drop, con_weight=1.0, ce_weight=0.0,
                                 classes_per_batch=args.con_classes)
        dummy = tm.proto_head(mx.zeros((1, x.shape[-1])), mx.zeros((1,), mx.int32), n_cls)
        adapter, _, _ = tm.finetune(model, adapter, dummy, x, m, y, ccfg, fold_in(key, 3),
                                    log=ep_log)
    head = tm.proto_head(tm.embed_all(model, adapter, x, m), y, n_cls)
    if args.epochs:
        cfg = tm.FinetuneConfig(epochs=args.epochs, batch_size=args.batch, lr=args.lr,
                                head_lr=args.head_lr, scale=args.scale,
                                label_smoothing=args.ls, weight_decay=args.wd,
                                token_drop=args.token_drop, proto_weight=args.proto_weight,
                                con_weight=args.con_weight,
                                classes_per_batch=args.classes_per_batch)
        adapter, head, _ = tm.finetune(model, adapter, head, x, m, y, cfg, fold_in(key, 2),
                                       log=ep_log)
    shot_emb = tm.embed_all(model, adapter, x, m)
    proto = tm.proto_head(shot_emb, y, n_cls)
    lr = logreg(np.array(shot_emb), np.array(y), n_cls, args.l2)
    extra = {v: logreg(np.array(shot_emb), np.array(y), n_cls, v) for v in args.extra_l2}
    st_fits = {}
    if pool is not None and args.self_train:
        pidx = mx.array(pool.astype(np.int32))
        p_emb = np.array(tm.embed_all(model, adapter, tr.states[args.split][pidx], tr.mask[pidx]))
        p_prob = _softmax(p_emb @ np.array(lr["w"]) + np.array(lr["b"]))
        for m_ in args.self_train:
            prob = p_prob
            for rnd in range(args.st_rounds):
                sel_rows, sel_y = tm.pseudo_label(prob, m_)
                xx = np.concatenate([np.array(shot_emb), p_emb[sel_rows]])
                yy = np.concatenate([np.array(y), sel_y])
                fit = logreg(xx, yy, n_cls, args.l2)
                prob = _softmax(p_emb @ np.array(fit["w"]) + np.array(fit["b"]))
                acc = float((sel_y == tr.labels[pool[sel_rows]]).mean())  # diagnostic only
                log(f"  self-train M={m_} round {rnd + 1}: {len(sel_rows)} pseudo-labels, "
                    f"{100 * acc:.1f}% correct")
                st_fits[m_ if rnd == 0 else f"{m_}r{rnd + 1}"] = fit
            if m_ == args.st_finetune:
                ft_rows, ft_y = tm.pseudo_label(prob, m_)
    ft = None
    if args.st_finetune:
        # self-training of the encoder: fine-tune on the shots + the pseudo-labelled pool rows
        if args.st_finetune not in args.self_train:
            raise ValueError(f"--st-finetune: {args.st_finetune} must be one of --self-train")
        prow = mx.array(pool[ft_rows].astype(np.int32))
        fx = mx.concatenate([x, tr.states[args.split][prow].astype(x.dtype)], axis=0)
        fm = mx.concatenate([m, tr.mask[prow].astype(m.dtype)], axis=0)
        fy = mx.concatenate([y, mx.array(ft_y.astype(np.int32))], axis=0)
        cfg2 = tm.FinetuneConfig(epochs=args.st_epochs, batch_size=args.batch, lr=args.lr,
                                 head_lr=args.head_lr, scale=args.scale,
                                 label_smoothing=args.ls, weight_decay=args.wd,
                                 token_drop=args.token_drop)
        ad2, head2, _ = tm.finetune(model, adapter, head, fx, fm, fy, cfg2, fold_in(key, 4),
                                    log=ep_log)
        f_emb = np.array(tm.embed_all(model, ad2, fx, fm))
        ft = (ad2, head2, logreg(f_emb, np.array(fy), n_cls, args.l2))
    out = {}
    for name, (split, rows, _) in evals.items():
        sc = tr if split == "train" else va
        ridx = mx.array(np.asarray(rows).astype(np.int32))
        emb = tm.embed_all(model, adapter, sc.states[args.split][ridx], sc.mask[ridx])
        out[name] = {
            "head": _softmax(np.array(tm.head_logits(head, emb, args.scale))),
            "proto": _softmax(np.array(tm.head_logits(proto, emb, args.scale))),
            "lr": _softmax(np.array(emb @ lr["w"] + lr["b"])),
        }
        for v, p in extra.items():
            out[name][f"lr@{v:g}"] = _softmax(np.array(emb @ p["w"] + p["b"]))
        for m_, p in st_fits.items():
            out[name][f"st@{m_}"] = _softmax(np.array(emb @ p["w"] + p["b"]))
        if ft is not None:
            ad2, head2, lr2 = ft
            emb2 = tm.embed_all(model, ad2, sc.states[args.split][ridx], sc.mask[ridx])
            out[name]["stft-head"] = _softmax(np.array(tm.head_logits(head2, emb2, args.scale)))
            out[name]["stft-lr"] = _softmax(np.array(emb2 @ lr2["w"] + lr2["b"]))
    return out



_MODEL = None


def _params():
    global _MODEL
    if _MODEL is None:
        from metafn.nn import bert

        cfg, params, _ = bert.bert_load(with_tokenizer=False)
        _MODEL = (params, cfg)
    return _MODEL


if __name__ == "__main__":
    main()
