"""Self-supervised contrastive pre-training (SimCSE / the first stage of CPFT) of the LoRA
adapter on CLINC150 train utterances *without their labels*, for ``clinc_standard.py
--init-adapter``.

The pool is every train utterance except the holdout utterances carved by
``clinc_standard.py --carve C`` for the (shots, draw) pairs given with ``--exclude`` (so the
holdout that selects hyperparameters is never seen, not even unlabelled); val is never read.
Labels are not read either: only the token states of the utterances go into the loss
(:func:`metafn.text_meta.simcse_loss`, two token-drop views of an utterance are positives,
the rest of the batch negatives). One pre-training is shared by every draw of the shots.

    python examples/clinc_pretrain.py --exclude 5:0 10:0 --carve 20 --epochs 1 \\
        --out /work/runs/clinc3/simcse
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


def pool_rows(data, tr, exclude: list[str], carve: int, seed: int = 0) -> np.ndarray:
    """Train rows not in the carved holdout of any ``"K:draw"`` in ``exclude`` (the same keys
    as ``clinc_standard.py --seed seed``)."""
    drop: set[int] = set()
    root = mx.random.key(seed)
    for spec in exclude:
        try:
            k, d = (int(v) for v in spec.split(":"))
        except ValueError:
            raise ValueError(f"--exclude: expected SHOTS:DRAW like 5:0, got {spec!r}") from None
        _, _, c_rows, _ = few_shot_rows(fold_in(fold_in(root, k), d), data, tr, k, carve)
        drop |= set(c_rows.tolist())
    return np.array(sorted(set(range(len(tr.labels))) - drop), np.int64)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exclude", nargs="*", default=[], help="SHOTS:DRAW holdouts left out")
    ap.add_argument("--carve", type=int, default=20)
    ap.add_argument("--split", type=int, default=3)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", default="query,value")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scale", type=float, default=20.0)
    ap.add_argument("--token-drop", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    data, caches, (bcfg, bparams, _) = load_all((args.split,), args.cache, which=("train",), log=log)
    tr = caches["train"]
    rows = pool_rows(data, tr, args.exclude, args.carve, args.seed)
    log(f"pool: {len(rows)} of {len(tr.labels)} train utterances (excluded holdouts {args.exclude})")
    targets = parse_targets(args.targets)
    lcfg = peft.LoraConfig(r=args.r, alpha=args.alpha, target_modules=targets)
    model = tm.text_model(bparams, bcfg, peft.lora_method(lcfg, unmerged=True), args.split)
    adapter = tm.meta_init(model, mx.random.key(args.seed)).adapter
    idx = mx.array(rows.astype(np.int32))
    cfg = tm.SimcseConfig(epochs=args.epochs, batch_size=args.batch, lr=args.lr,
                          scale=args.scale, token_drop=args.token_drop)
    t0 = time.perf_counter()
    adapter, hist = tm.simcse_pretrain(
        model, adapter, tr.states[args.split][idx], tr.mask[idx], cfg,
        fold_in(mx.random.key(args.seed), 7),
        log=lambda r: log(" ".join(f"{k} {v:.4g}" for k, v in r.items())), log_every=25)
    args.out.mkdir(parents=True, exist_ok=True)
    peft.save_tree(args.out / "adapter.safetensors", adapter)
    info = {"command": "python examples/clinc_pretrain.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "pool_size": int(len(rows)), "excluded_holdouts": args.exclude, "carve": args.carve,
            "labels_used": False, "val_used": False, "history": hist,
            "seconds": time.perf_counter() - t0,
            "args": {a: (str(v) if isinstance(v, Path) else v) for a, v in vars(args).items()}}
    (args.out / "pretrain.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"saved {args.out} ({info['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
