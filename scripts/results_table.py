"""Render the README's results tables from the results JSON files (never typed by hand).

    python scripts/results_table.py results/*.json

Each file is a ``results.json`` written by ``metafn train`` / ``metafn eval``: for every method,
one entry per adaptation budget with the test mean and 95% CI at the rate chosen on validation.
"""

import json
import sys
from pathlib import Path


def fmt(entry: dict, metric: str) -> str:
    mean, ci = entry[f"{metric}_mean"], entry[f"{metric}_ci95"]
    if metric == "accuracy":
        return f"{100 * mean:.1f} ± {100 * ci:.1f}"
    return f"{mean:.3f} ± {ci:.3f}"


def table(path: Path) -> str:
    r = json.loads(path.read_text())
    methods = r["methods"]
    first = next(iter(methods.values()))["budgets"][0]
    metric = "accuracy" if "accuracy_mean" in first else "loss"
    budgets = [b["steps"] for b in next(iter(methods.values()))["budgets"]]
    head = "| method | " + " | ".join(f"{'acc. %' if metric == 'accuracy' else 'MSE'} after {s} step{'s' * (s != 1)}" for s in budgets) + " |"
    lines = [head, "|" + " --- |" * (len(budgets) + 1)]
    for name, m in methods.items():
        by_step = {b["steps"]: b for b in m["budgets"]}
        cells = [fmt(by_step[s], metric) + f" (lr {by_step[s]['finetune_lr']})" if s in by_step else "" for s in budgets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    train = r.get("train") or {}
    tasks = next(iter(next(iter(methods.values()))["curves"].values()))["n_tasks"]
    note = f"{tasks} test tasks"
    if train:
        note += f"; meta-training {train['step']} steps in {train['train_seconds'] / 60:.1f} min"
    return f"**{r['name']}** ({note})\n\n" + "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(table(Path(p)) for p in sys.argv[1:]))
