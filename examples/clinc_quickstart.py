"""The text meta-learning API end to end on a few CLINC150 episodes (about a minute on a CPU).

all-MiniLM-L6-v2 is split after layer 3: layers 0-2 run once per utterance (frozen, cached),
a LoRA adapter sits on the query/value projections of layers 3-5, and a cosine head starts
from the class prototypes. We take a few FOMAML steps on train-domain episodes, then compare
nearest-prototype accuracy on held-out-domain episodes before and after.

    python examples/clinc_quickstart.py [--meta-steps 5]
"""

from __future__ import annotations

import argparse

import metafn  # noqa: F401  (before mlx)
import mlx.core as mx
import numpy as np

from metafn import peft
from metafn import text_meta as tm
from metafn.nn import bert
from metafn.optim import adam, apply_updates
from metafn.random import fold_in
from metafn.tasks import clinc


def episodes_to_batch(model: tm.TextModel, tok: bert.BertTokenizer, eps: list) -> tm.TextBatch:
    """Tokenize and run the frozen bottom once for a list of TextEpisodes."""
    texts = [t for e in eps for t in e.support_texts + e.query_texts]
    table = tm.pretokenize(tok, texts, 32)
    xs = tm.precompute_inputs(model, table)
    ns, nq = len(eps[0].support_texts), len(eps[0].query_texts)
    per = ns + nq
    s_rows = np.array([[i * per + j for j in range(ns)] for i in range(len(eps))])
    q_rows = np.array([[i * per + ns + j for j in range(nq)] for i in range(len(eps))])
    sy = np.stack([np.array(e.support_y) for e in eps])
    qy = np.stack([np.array(e.query_y) for e in eps])
    return tm.text_batch(xs, table.mask, s_rows, sy, q_rows, qy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--meta-steps", type=int, default=5)
    args = ap.parse_args()
    config, params, tok = bert.bert_load()
    data = clinc.load_clinc()
    lora = peft.lora_method(peft.LoraConfig(r=8, alpha=16, target_modules=("query", "value")),
                            unmerged=True)
    model = tm.text_model(params, config, lora, split=3)
    meta = tm.meta_init(model, mx.random.key(0), scale=10.0)
    inner = tm.AdaptConfig(steps=1, lr=0.5, head_lr=0.5, optimizer="sgd")
    test = episodes_to_batch(model, tok, clinc.sample_text_episodes(
        mx.random.key(1), data, "test", 8, n_way=5, k_shot=1, n_query=5))
    before = tm.episode_accuracy(model, meta, test, 5, tm.AdaptConfig(steps=0))
    print(f"held-out 5-way 1-shot, frozen encoder + prototypes: {100 * before.mean():.1f}%")
    opt = adam(1e-3)
    state = opt.init(meta)
    for step in range(args.meta_steps):
        batch = episodes_to_batch(model, tok, clinc.sample_text_episodes(
            fold_in(mx.random.key(2), step), data, "train", 4, 5, 1, 5))
        loss, grads, acc = tm.text_maml_outer(model, meta, batch, 5, inner, first_order=True)
        updates, state = opt.update(grads, state, meta)
        meta = apply_updates(meta, updates)
        mx.eval(meta, state)
        print(f"FOMAML step {step + 1}: query loss {loss.item():.3f}, acc {acc.mean().item():.2f}")
    after = tm.episode_accuracy(model, meta, test, 5, tm.AdaptConfig(steps=0))
    print(f"after {args.meta_steps} meta-steps: {100 * after.mean():.1f}% "
          f"(a real run: examples/clinc_meta.py, examples/clinc_eval.py)")


if __name__ == "__main__":
    main()
