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

    python examples/clinc_standard.py --method proto logreg --shots 5 10 --draws 5
    python examples/clinc_standard.py --method lora --shots 5 --draws 1 --eval carve --lr 1e-3
    python examples/clinc_standard.py --method lora --shots 5 10 --draws 5 --eval val
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

from clinc_common import DEFAULT_CACHE, few_shot_rows, load_all  # noqa: E402
from metafn import peft  # noqa: E402
from metafn import text_meta as tm  # noqa: E402
from metafn.evaluate import mean_ci  # noqa: E402
from metafn.random import fold_in  # noqa: E402


def make_method(name: str, args: argparse.Namespace) -> peft.PeftMethod | None:
    targets = tuple(args.targets.split(","))
    if name == "lora":
        return peft.lora_method(peft.LoraConfig(r=args.r, alpha=args.alpha, dropout=args.dropout,
                                                target_modules=targets), unmerged=True)
    if name == "dora":
        return peft.dora_method(peft.DoraConfig(r=args.r, alpha=args.alpha, target_modules=targets))
    if name == "full":
        return peft.full_method(peft.FullConfig())
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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=Path("/work/runs/clinc/standard.jsonl"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    data, caches, _ = load_all((args.split,), args.cache, log=log)
    tr, va = caches["train"], caches["val"]
    n_cls = len(data.intents)
    root = mx.random.key(args.seed)
    for method_name in args.method:
        for k in args.shots:
            accs: dict[str, list[float]] = {"carve": [], "val": []}
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
                if method_name in ("proto", "logreg"):
                    x = tr.emb[s_rows]
                    if method_name == "proto":
                        head = tm.proto_head(mx.array(x), mx.array(s_y), n_cls)
                        score = lambda e: np.array(tm.head_logits(head, mx.array(e), 1.0))  # noqa: E731
                    else:
                        p = logreg(x, s_y, n_cls, args.l2)
                        score = lambda e: np.array(mx.array(e) @ p["w"] + p["b"])  # noqa: E731
                    for name, (split, rows, y) in evals.items():
                        emb = (tr if split == "train" else va).emb[rows]
                        accs[name].append(tm.accuracy_np(score(emb), y))
                else:
                    method = make_method(method_name, args)
                    model = tm.text_model(*_params(), method, args.split)
                    x_all = tr.states[args.split]
                    idx = mx.array(s_rows.astype(np.int32))
                    x, m, y = x_all[idx], tr.mask[idx], mx.array(s_y.astype(np.int32))
                    adapter = tm.meta_init(model, fold_in(key, 1)).adapter
                    head = tm.proto_head(tm.embed_all(model, adapter, x, m), y, n_cls)
                    cfg = tm.FinetuneConfig(epochs=args.epochs, batch_size=args.batch, lr=args.lr,
                                            head_lr=args.head_lr, scale=args.scale,
                                            label_smoothing=args.ls, weight_decay=args.wd,
                                            token_drop=args.token_drop,
                                            proto_weight=args.proto_weight,
                                            classes_per_batch=args.classes_per_batch)
                    adapter, head, hist = tm.finetune(
                        model, adapter, head, x, m, y, cfg, fold_in(key, 2),
                        log=lambda r: log(f"  epoch {r['epoch']} loss {r['loss']:.4f} "
                                          f"{r['seconds']:.0f}s"))
                    for name, (split, rows, yy) in evals.items():
                        sc = tr if split == "train" else va
                        ridx = mx.array(np.asarray(rows).astype(np.int32))
                        logits = tm.predict_logits(model, adapter, head, args.scale,
                                                   sc.states[args.split][ridx], sc.mask[ridx])
                        accs[name].append(tm.accuracy_np(logits, yy))
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
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")


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
