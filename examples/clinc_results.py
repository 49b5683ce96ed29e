"""Collect the CLINC150 standard-protocol runs of ``examples/clinc_standard.py`` (JSON lines)
into one results file: the selection table (train-split holdout, "carve", scores only), the
final runs (val, per draw) and the chosen configuration.

    python examples/clinc_results.py --select /work/runs/clinc2/select.jsonl \\
        --final /work/runs/clinc2/final.jsonl --scorer lr --out results/clinc/standard.json

``--scorer`` is the way of scoring the fine-tuned model chosen on the holdout (``head``,
``lr``, ...; see ``clinc_standard.py``). Intervals: ``ci95`` is the normal interval
``1.96 sd / sqrt(n)`` over draws (the repository's convention), ``ci95_t`` the Student-t
interval (wider for few draws).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

REFERENCE_KEYS = ("epochs", "lr", "scale", "ls", "token_drop", "split", "r", "targets",
                  "con_epochs", "names", "ensemble", "proto_weight", "head_lr", "init_adapter",
                  "self_train", "st_rounds", "st_finetune", "st_epochs")


def _t975(n: int) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, n - 1))
    except ImportError:  # pragma: no cover
        return {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}.get(n, 1.96)


def summary(values: list[float]) -> dict:
    v = np.asarray(values, np.float64)
    n = v.size
    sd = float(v.std(ddof=1)) if n > 1 else 0.0
    return {"mean": float(v.mean()), "ci95": 1.96 * sd / math.sqrt(n),
            "ci95_t": (_t975(n) * sd / math.sqrt(n)) if n > 1 else 0.0, "sd": sd, "n": int(n),
            "values": [float(x) for x in v]}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def config_of(rec: dict) -> dict:
    a = rec["args"]
    return {k: a.get(k) for k in REFERENCE_KEYS if k in a}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--select", type=Path, nargs="+", required=True)
    ap.add_argument("--final", type=Path, required=True)
    ap.add_argument("--baselines", type=Path, default=None,
                    help="JSON lines of --method proto logreg runs (val) to quote")
    ap.add_argument("--scorer", default="lr")
    ap.add_argument("--out", type=Path, default=Path("results/clinc/standard.json"))
    ap.add_argument("--command", action="append", default=[],
                    help="a command that produced the runs (repeatable)")
    ap.add_argument("--note", default="",
                    help="appended to the protocol text (e.g. what extra data the rows use)")
    ap.add_argument("--encoder", default="sentence-transformers/all-MiniLM-L6-v2 (frozen base, "
                    "LoRA on layers split..5)", help="the encoder the runs used (recorded)")
    ap.add_argument("--key-shots", action="store_true",
                    help="key final rows by tag and shots (one run of --shots 5 10 per tag)")
    args = ap.parse_args(argv)

    selection = []
    for path in args.select:
        for rec in read(path):
            if "carve" not in rec:
                continue
            row = {"tag": rec["tag"], "method": rec["method"], "shots": rec["shots"],
                   "draws": list(range(rec["first_draw"], rec["first_draw"] + rec["draws"])),
                   "holdout_per_intent": rec["args"].get("carve"), "config": config_of(rec),
                   "holdout": {"head": summary(rec["carve"]["values"])},
                   "seconds_per_draw": float(np.mean(rec["seconds"])), "source": str(path)}
            for sname, r in rec.get("scores", {}).get("carve", {}).items():
                row["holdout"][sname] = summary(r["values"])
            selection.append(row)

    final: dict = {}
    for rec in read(args.final):  # "<tag>_more" records add draws to "<tag>"
        tag = rec["tag"].removesuffix("_more")
        if args.key_shots:
            tag = f"{tag}_{rec['shots']}shot"
        scores = rec.get("scores", {})
        e = final.setdefault(tag, {"tag": tag, "shots": rec["shots"], "config": config_of(rec),
                                   "args": rec["args"], "draws": [], "seconds_per_draw": [],
                                   "_val": {}, "_holdout": {}})
        e["draws"] += list(range(rec["first_draw"], rec["first_draw"] + rec["draws"]))
        e["seconds_per_draw"] += [float(x) for x in rec["seconds"]]
        for split, dst in (("val", "_val"), ("carve", "_holdout")):
            for sname, r in scores.get(split, {}).items():
                e[dst].setdefault(sname, []).extend(r["values"])
    for e in final.values():
        e["val"] = {k: summary(v) for k, v in e.pop("_val").items()}
        e["holdout"] = {k: summary(v) for k, v in e.pop("_holdout").items()}
        e["chosen_scorer"] = args.scorer
        if args.scorer in e["val"]:
            e["val_chosen"] = e["val"][args.scorer]
        e["mean_seconds_per_draw"] = float(np.mean(e["seconds_per_draw"]))

    baselines = {}
    if args.baselines is not None and args.baselines.is_file():
        for rec in read(args.baselines):
            if "val" in rec:
                baselines[f"{rec['method']}_{rec['shots']}shot"] = {
                    "val": summary(rec["val"]["values"]),
                    "holdout": summary(rec["carve"]["values"]) if "carve" in rec else None}

    out = {
        "protocol": ("CLINC150 standard few-shot: K labelled utterances per intent for all 150 "
                     "intents drawn from the train split; accuracy on the 3,000 in-scope val "
                     "utterances; mean over K-shot draws. Hyperparameters and the scorer chosen "
                     "on a holdout carved from the train split (20 non-shot utterances per "
                     "intent), never on val." + (" " + args.note if args.note else "")),
        "encoder": args.encoder,
        "commands": args.command,
        "aggregated_by": "python examples/clinc_results.py " + " ".join(
            a for a in (argv if argv is not None else __import__("sys").argv[1:])),
        "chosen_scorer": args.scorer,
        "final": final,
        "baselines_val": baselines,
        "selection": selection,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for tag, e in final.items():
        v = e.get("val_chosen")
        if v:
            print(f"{tag}: val {args.scorer} {100 * v['mean']:.2f} +- {100 * v['ci95']:.2f} "
                  f"(t: {100 * v['ci95_t']:.2f}) over {v['n']} draws")


if __name__ == "__main__":
    main()
