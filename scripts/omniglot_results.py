"""Collect the Omniglot results files into ``bench/results/omniglot.json`` and a README table.

    python scripts/omniglot_results.py            # writes bench/results/omniglot.json, prints the table

Every row is one ``results.json`` written by ``metafn train`` / ``metafn eval`` (copied to
``results/omniglot/``) together with the commands that produced it (:data:`ROWS`). Figures are
read from those files, never typed here: test accuracy (mean and 95% CI over the test episodes,
fine-tuning rate chosen on validation episodes) of the meta-learned model and of each baseline,
the meta-training time and the seconds per meta-iteration.

Seconds per meta-iteration of every algorithm's config, also of those not trained to the end,
come from ``metafn bench`` reports (:data:`BENCH`; each records the BLAS, thread and malloc
settings it ran under) and are listed under ``"speed"``. The cross-validation over alphabets
(``scripts/omniglot_cv.py``) is listed under ``"cross_validation"``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omniglot_cv import collect as collect_cv, table as cv_table

ROOT = Path(__file__).resolve().parents[1]

#: the three ProtoNet test protocols: results-file suffix -> ``metafn eval`` flags
PROTOCOLS: tuple[tuple[str, str], ...] = (
    ("5way", ""), ("20way", " --set eval.n_way=20 --set eval.n_tasks=600"),
    ("20way_within", " --set eval.n_way=20 --set eval.n_tasks=600 --set eval.within_alphabet=true"))

#: results file (under results/omniglot/) -> (algorithm, commands that produced it)
ROWS: dict[str, tuple[str, str]] = {
    "protonet_5way.json": ("protonet", "metafn train --config configs/omniglot_protonet.yaml --out runs/omniglot_protonet --no-eval; "
                           "metafn eval --checkpoint runs/omniglot_protonet/best.safetensors --set eval.pooled_steps=2000"),
    "protonet_20way.json": ("protonet", "metafn eval --checkpoint runs/omniglot_protonet/best.safetensors --no-baselines --set eval.n_way=20 --set eval.n_tasks=600"),
    "protonet_20way_within.json": ("protonet", "metafn eval --checkpoint runs/omniglot_protonet/best.safetensors --no-baselines --set eval.n_way=20 --set eval.n_tasks=600 --set eval.within_alphabet=true"),
    **{f"protonet_within_{name}.json": (
        "protonet", "metafn train --config configs/omniglot_protonet.yaml --out runs/omniglot_protonet_within --no-eval "
                    "--set task.within_alphabet=true; metafn eval --checkpoint runs/omniglot_protonet_within/best.safetensors "
                    f"--no-baselines{flags}")
       for name, flags in (("5way", " --set eval.within_alphabet=false"),
                           ("20way", " --set eval.n_way=20 --set eval.n_tasks=600 --set eval.within_alphabet=false"),
                           ("20way_within", " --set eval.n_way=20 --set eval.n_tasks=600 --set eval.within_alphabet=true"))},
    **{f"protonet_trainval_{name}.json": (
        "protonet", "metafn train --config configs/omniglot_protonet.yaml --out runs/omniglot_protonet_trainval --no-eval "
                    "--set task.train_on_val=true --set train.eval_interval=7000; metafn eval --checkpoint "
                    f"runs/omniglot_protonet_trainval/last.safetensors --no-baselines{flags}")
       for name, flags in PROTOCOLS},
    **{f"protonet_60way_{name}.json": (
        "protonet", "taskset -c 0 env OPENBLAS_NUM_THREADS=1 metafn train --config configs/omniglot_protonet_60way.yaml "
                    "--out /work/runs/omniglot_pn60/run --no-eval --no-progress; taskset -c 0 env OPENBLAS_NUM_THREADS=1 "
                    "metafn eval --checkpoint /work/runs/omniglot_pn60/run/best.safetensors "
                    f"--out /work/runs/omniglot_pn60/eval_{name} --no-baselines{flags}")
       for name, flags in PROTOCOLS},
    **{f"protonet_60way_trainval_{name}.json": (
        "protonet", "taskset -c 0 env OPENBLAS_NUM_THREADS=1 metafn train --config configs/omniglot_protonet_60way.yaml "
                    "--out /work/runs/pn60_trainval/run --no-eval --no-progress --set task.train_on_val=true "
                    "--set train.eval_interval=4000; taskset -c 0 env OPENBLAS_NUM_THREADS=1 metafn eval --checkpoint "
                    f"/work/runs/pn60_trainval/run/last.safetensors --out /work/runs/pn60_trainval/eval_{name} "
                    f"--no-baselines{flags}")
       for name, flags in PROTOCOLS},
    **{f"protonet_60way_6500_{name}.json": (
        "protonet", "taskset -c 1 env OPENBLAS_NUM_THREADS=1 metafn train --config configs/omniglot_protonet_60way.yaml "
                    "--out /work/runs/pn60_6500/run --no-eval --no-progress --set train.steps=6500 "
                    "--set train.eval_interval=650 --set train.save_interval=650; metafn eval --checkpoint "
                    f"/work/runs/pn60_6500/run/best.safetensors --out /work/runs/pn60_6500/eval_{name} "
                    f"--no-baselines{flags}")
       for name, flags in PROTOCOLS},
    **{f"protonet_60way_6500_skm5_{name}.json": (
        "protonet_soft_kmeans", "taskset -c 1 env OPENBLAS_NUM_THREADS=1 metafn train --config "
                                "configs/omniglot_protonet_60way.yaml --out /work/runs/pn60_6500/run --no-eval --no-progress "
                                "--set train.steps=6500 --set train.eval_interval=650 --set train.save_interval=650; "
                                "taskset -c 0 env OPENBLAS_NUM_THREADS=1 metafn eval --checkpoint "
                                "/work/runs/pn60_6500/run/best.safetensors --out /work/runs/pn60_6500/eval_skm5_"
                                f"{name} --no-baselines{flags} --set eval.soft_kmeans_steps=5")
       for name, flags in PROTOCOLS},
    "maml_5way.json": ("maml", "metafn train --config configs/omniglot_maml.yaml --out runs/omniglot_maml --no-eval; "
                       "metafn eval --checkpoint runs/omniglot_maml/best.safetensors --no-baselines"),
    "maml_noaug_5way.json": ("maml", "metafn train --config configs/omniglot_maml.yaml --out runs/omniglot_maml_noaug "
                             "--no-eval --set task.augment_rotation=0 --set task.augment_shift=0 "
                             "--set task.augment_scale=0 --set train.steps=4500 (stopped at step 3000); "
                             "metafn eval --checkpoint runs/omniglot_maml_noaug/best.safetensors --set eval.pooled_steps=2000"),
    "metasgd_5way.json": ("metasgd", "metafn train --config configs/omniglot_metasgd.yaml --out runs/omniglot_metasgd --no-eval; "
                          "metafn eval --checkpoint runs/omniglot_metasgd/best.safetensors --no-baselines"),
    "fomaml_5way.json": ("fomaml", "metafn train --config configs/omniglot_fomaml.yaml --out runs/omniglot_fomaml --no-eval; "
                         "metafn eval --checkpoint runs/omniglot_fomaml/best.safetensors --no-baselines"),
    "mamlpp_5way.json": ("mamlpp", "metafn train --config configs/omniglot_mamlpp.yaml --out runs/omniglot_mamlpp --no-eval; "
                         "metafn eval --checkpoint runs/omniglot_mamlpp/best.safetensors --no-baselines"),
    "mamlpp_trainval_5way.json": ("mamlpp", "metafn train --config configs/omniglot_mamlpp.yaml --out "
                                  "runs/omniglot_mamlpp_trainval --no-eval --set task.train_on_val=true "
                                  "--set train.eval_interval=2200; metafn eval --checkpoint "
                                  "runs/omniglot_mamlpp_trainval/last.safetensors --no-baselines"),
    "reptile_5way.json": ("reptile", "metafn train --config configs/omniglot_reptile.yaml --out runs/omniglot_reptile --no-eval; "
                          "metafn eval --checkpoint runs/omniglot_reptile/best.safetensors --no-baselines"),
    "reptile_aug_5way.json": ("reptile", "taskset -c 0 env OPENBLAS_NUM_THREADS=1 metafn train --config "
                              "configs/omniglot_reptile.yaml --out /work/runs/reptile_aug/run --no-eval "
                              "--set task.augment_rotation=15.0 --set task.augment_shift=2.0 "
                              "--set task.augment_scale=0.1; taskset -c 0 env OPENBLAS_NUM_THREADS=1 metafn eval "
                              "--checkpoint /work/runs/reptile_aug/run/best.safetensors --out "
                              "/work/runs/reptile_aug/eval_5way --no-baselines"),
    "reptile_aug_trainval_5way.json": ("reptile", "taskset -c 0 env OPENBLAS_NUM_THREADS=1 metafn train --config "
                                       "configs/omniglot_reptile.yaml --out /work/runs/reptile_trainval/run --no-eval "
                                       "--set task.augment_rotation=15.0 --set task.augment_shift=2.0 "
                                       "--set task.augment_scale=0.1 --set task.train_on_val=true "
                                       "--set train.eval_interval=5500; taskset -c 0 env OPENBLAS_NUM_THREADS=1 "
                                       "metafn eval --checkpoint /work/runs/reptile_trainval/run/last.safetensors "
                                       "--out /work/runs/reptile_trainval/eval_5way --no-baselines --no-progress "
                                       "--set algorithm.inner_lr=0.03 --set 'eval.finetune_lrs=[0.03]' (fine-tuning "
                                       "rate fixed at 0.03, the train-only run's choice on validation)"),
    "reptile_aug_200steps_5way.json": ("reptile", "taskset -c 0 env OPENBLAS_NUM_THREADS=1 metafn eval --checkpoint "
                                       "/work/runs/reptile_aug/run/best.safetensors --out "
                                       "/work/runs/reptile_budget/eval_5way_200 --no-baselines --no-progress "
                                       "--set eval.steps=200 --set 'eval.budgets=[50,100,200]' "
                                       "--set algorithm.inner_lr=0.03 --set 'eval.finetune_lrs=[0.03]' (the "
                                       "augmented row's checkpoint; rate and budget chosen on validation by "
                                       "scripts/omniglot_val_scores.py)"),
    "reptile_aug_seed1_5way.json": ("reptile", "taskset -c 1 env OPENBLAS_NUM_THREADS=1 metafn train --config "
                                    "configs/omniglot_reptile.yaml --out /work/runs/reptile_aug_s1/run --no-eval "
                                    "--no-progress --set seed=1 --set task.augment_rotation=15.0 "
                                    "--set task.augment_shift=2.0 --set task.augment_scale=0.1; taskset -c 1 env "
                                    "OPENBLAS_NUM_THREADS=1 metafn eval --checkpoint "
                                    "/work/runs/reptile_aug_s1/run/best.safetensors --out "
                                    "/work/runs/reptile_aug_s1/eval_5way --no-baselines --no-progress --set seed=0 "
                                    "(trained with seed 1, tested on seed 0's episodes)"),
    "reptile_fullbatch_5way.json": ("reptile", "metafn train --config configs/omniglot_reptile.yaml --out "
                                    "runs/omniglot_reptile_fullbatch --no-eval --set algorithm.inner_batches=1 "
                                    "--set task.n_query=1 --set train.steps=3000; metafn eval --checkpoint "
                                    "runs/omniglot_reptile_fullbatch/best.safetensors --no-baselines --set eval.steps=10 "
                                    "--set eval.budgets=[1,5,10]"),
    **{f"{algo}_20way{suffix}.json": (
        algo, f"metafn eval --checkpoint runs/omniglot_{algo}/best.safetensors --no-baselines --set eval.n_way=20 "
              f"--set eval.n_tasks=600{extra}{flag} (the 5-way meta-trained body with a zero 20-way head)")
       for algo, extra in (("maml", " --set eval.n_query=5"), ("metasgd", ""),
                           ("fomaml", " --set eval.n_query=5"), ("mamlpp", " --set eval.n_query=5"),
                           ("reptile", " --set eval.n_query=5 --set eval.steps=10 --set eval.budgets=[1,5,10]"))
       for suffix, flag in (("", ""), ("_within", " --set eval.within_alphabet=true"))},
}

#: results file -> the table's label for rows that are not an algorithm's headline row
LABELS: dict[str, str] = {"maml_noaug_5way.json": "maml, no augmentation",
                          **{f"protonet_within_{n}.json": "protonet, within-alphabet training"
                             for n in ("5way", "20way", "20way_within")},
                          **{f"protonet_trainval_{n}.json": "protonet, train + val alphabets (final fit)"
                             for n in ("5way", "20way", "20way_within")},
                          **{f"protonet_60way_{n}.json": "protonet, 60-way training"
                             for n in ("5way", "20way", "20way_within")},
                          **{f"protonet_60way_6500_{n}.json": "protonet, 60-way training, 6500 steps"
                             for n in ("5way", "20way", "20way_within")},
                          **{f"protonet_60way_trainval_{n}.json":
                             "protonet, 60-way, train + val alphabets (final fit)"
                             for n in ("5way", "20way", "20way_within")},
                          **{f"protonet_60way_6500_skm5_{n}.json":
                             "protonet, 60-way training, 6500 steps, prototypes refined on the queries "
                             "(5 soft k-means steps, transductive)"
                             for n in ("5way", "20way", "20way_within")},
                          "mamlpp_trainval_5way.json": "mamlpp, train + val alphabets (final fit)",
                          "reptile_fullbatch_5way.json": "reptile, full-batch inner steps",
                          "reptile_aug_5way.json": "reptile, augmented training images",
                          "reptile_aug_200steps_5way.json":
                              "reptile, augmented, fine-tuned 200 steps",
                          "reptile_aug_seed1_5way.json": "reptile, augmented, seed 1",
                          "reptile_aug_trainval_5way.json":
                              "reptile, augmented, train + val alphabets (final fit)"}


#: algorithm -> the ``metafn bench`` command whose report is results/omniglot/bench_<algorithm>.json
BENCH: dict[str, str] = {
    name: (f"OPENBLAS_NUM_THREADS=1 metafn bench --config configs/omniglot_{name}.yaml --warmup 2 "
           f"--repeats 10 --out results/omniglot/bench_{name}.json")
    for name in ("protonet", "maml", "fomaml", "metasgd", "mamlpp", "reptile")
}


def collect_speed() -> list[dict]:
    rows = []
    for name, command in BENCH.items():
        path = ROOT / "results" / "omniglot" / f"bench_{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        rows.append({"algorithm": name, "seconds_per_meta_iteration": r["ms_per_meta_step_median"] / 1000,
                     "min_seconds": r["ms_min"] / 1000, "max_seconds": r["ms_max"] / 1000,
                     "repeats": r["repeats"], "openblas_num_threads": r["openblas_num_threads"],
                     "malloc": r["malloc"], "measured_at": r["measured_at"],
                     "file": f"results/omniglot/bench_{name}.json", "command": command})
    return rows


def speed_table(rows: list[dict]) -> str:
    lines = ["| algorithm | s / meta-iteration (median) | min | max |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['algorithm']} | {r['seconds_per_meta_iteration']:.2f} | {r['min_seconds']:.2f} | "
              f"{r['max_seconds']:.2f} |" for r in rows]
    return "\n".join(lines)


def _protocol(config: dict) -> dict:
    task, ev = config["task"], config["eval"]
    return {
        "n_way": ev.get("n_way") or task["n_way"],
        "k_shot": ev.get("k_shot") or task["k_shot"],
        "n_query": ev.get("n_query") or task["n_query"],
        "within_alphabet": bool(ev.get("within_alphabet") if ev.get("within_alphabet") is not None
                                else task.get("within_alphabet", False)),
        "rotations": task.get("rotations", True),
    }


def _method_summary(method: dict) -> dict:
    return {
        str(b["steps"]): {"accuracy": b["accuracy_mean"], "ci95": b["accuracy_ci95"],
                          "finetune_lr": b["finetune_lr"]}
        for b in method["budgets"]
    }


def collect() -> list[dict]:
    rows = []
    for name, (algorithm, command) in ROWS.items():
        path = ROOT / "results" / "omniglot" / name
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        train = r.get("train") or {}
        methods = r["methods"]
        n_tasks = next(iter(methods[algorithm]["curves"].values()))["n_tasks"]
        rows.append({
            "file": f"results/omniglot/{name}",
            "algorithm": algorithm,
            "label": LABELS.get(name, algorithm),
            "protocol": {**_protocol(r["config"]), "test_episodes": n_tasks},
            "head": r.get("head"),
            "accuracy": _method_summary(methods[algorithm]),
            "baselines": {k: _method_summary(v) for k, v in methods.items() if k in ("random_init", "pooled")},
            "pooled_train": r.get("pooled_train"),
            "train_steps": train.get("step"),
            "train_minutes": train["train_seconds"] / 60 if train else None,
            "train_cpu_minutes": (train["train_cpu_seconds"] / 60
                                  if train.get("train_cpu_seconds") is not None else None),
            "seconds_per_meta_iteration": train.get("seconds_per_step"),
            "command": command,
        })
    return rows


def _cell(summary: dict) -> str:
    return " / ".join(f"{100 * v['accuracy']:.1f} ± {100 * v['ci95']:.1f} ({k} st.)" if k != "0"
                      else f"{100 * v['accuracy']:.1f} ± {100 * v['ci95']:.1f}"
                      for k, v in summary.items())


def table(rows: list[dict]) -> str:
    lines = ["| algorithm | protocol | accuracy % | random init + FT | pooled + FT | train min | s / iter |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        p = row["protocol"]
        proto = (f"{p['n_way']}-way {p['k_shot']}-shot{' within-alphabet' if p['within_alphabet'] else ''}"
                 f"{' (zero head)' if row['head'] else ''}")
        base = row["baselines"]
        minutes = f"{row['train_minutes']:.0f}" if row["train_minutes"] else "(same model)"
        spi = f"{row['seconds_per_meta_iteration']:.2f}" if row["seconds_per_meta_iteration"] else ""
        lines.append(f"| {row['label']} | {proto} | {_cell(row['accuracy'])} | "
                     f"{_cell(base['random_init']) if 'random_init' in base else 'not run'} | "
                     f"{_cell(base['pooled']) if 'pooled' in base else 'not run'} | {minutes} | {spi} |")
    return "\n".join(lines)


if __name__ == "__main__":
    rows, speed, cv = collect(), collect_speed(), collect_cv()
    out = ROOT / "bench" / "results" / "omniglot.json"
    out.write_text(json.dumps({"rows": rows, "speed": speed, "cross_validation": cv}, indent=1) + "\n")
    print(table(rows))
    print()
    print(speed_table(speed))
    if cv is not None:
        print()
        print(cv_table(cv))
    print(f"\nwrote {out.relative_to(ROOT)} ({len(rows)} rows)", file=sys.stderr)
