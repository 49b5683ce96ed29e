"""The ``metafn`` command line: info, validate, train, eval, bench.

Importing this module imports metafn first, so the fast BLAS is loaded before MLX.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import metafn  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx

from metafn import _blas, _malloc
from metafn._atomic import atomic_write_text
from metafn.config import ConfigError, config_from_dict, load_config

__all__ = ["main", "gemm_gflops"]


def gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 ``n x n`` matmul rate in GFLOP/s (best of ``repeats`` after warm-up)."""
    a = mx.random.normal((n, n), key=mx.random.key(0))
    b = mx.random.normal((n, n), key=mx.random.key(1))
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _info(args: argparse.Namespace) -> int:
    st = _blas.status()
    rate = gemm_gflops(args.n)
    info = {
        "metafn": metafn.__version__,
        "mlx": mx.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(mx.default_device()),
        "blas_preloaded": st.library,
        "blas_status": st.reason,
        "blas_libraries_mapped": _blas.loaded_blas_libraries(),
        "malloc": _malloc.status().reason,
        f"gemm_{args.n}_float32_gflops": round(rate, 1),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:28s} {v}")
        if st.library is None and sys.platform.startswith("linux"):
            print(f"\nwarning: no optimized BLAS loaded ({st.reason}). {_blas.FIX_HINT}")
    return 0


def _with_overrides(data: dict, overrides: list[str]) -> "metafn.config.Config":
    """Apply ``KEY=VALUE`` overrides (YAML values, dotted keys) to config data and validate."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set: expected KEY=VALUE (e.g. train.steps=100), got {item!r}")
        dotted, raw = item.split("=", 1)
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{dotted}: unknown section {part!r}")
            node = node[part]
        node[parts[-1]] = yaml.safe_load(raw)
    return config_from_dict(data)


def _load(path: str, overrides: list[str]) -> "metafn.config.Config":
    from metafn.config import config_to_dict

    config = load_config(path)
    return _with_overrides(config_to_dict(config), overrides) if overrides else config


def _validate(args: argparse.Namespace) -> int:
    config = _load(args.config, args.set)
    from metafn.experiment import build_experiment
    from metafn.random import key

    exp = build_experiment(config)
    eps = exp.sample(key(0), "train", 2)
    print(f"config {args.config}: OK ({config.task.family} / {config.algorithm.name}); "
          f"episode shapes support_x {eps.support_x.shape} query_x {eps.query_x.shape}")
    st = _blas.status()
    print(f"BLAS: {st.library or 'reference (slow)'} ({st.reason})")
    return 0 if st.library or not sys.platform.startswith("linux") else 1


def _train(args: argparse.Namespace) -> int:
    from metafn.report import run_evaluation
    from metafn.train import TrainingDiverged, train

    config = _load(args.config, args.set)
    out = Path(args.out or Path("runs") / config.name)
    try:
        state, summary = train(config, out, resume=not args.no_resume, progress=not args.no_progress)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"trained {summary['step']} steps in {summary['train_seconds']:.1f} s "
          f"({summary['train_cpu_seconds']:.1f} CPU s) "
          f"({1000 * summary['seconds_per_step']:.2f} ms/step); best {summary['best']}")
    if args.no_eval:
        return 0
    from metafn.report import load_meta

    meta = load_meta(config, out / "best.safetensors")
    run_evaluation(config, out, meta, summary, progress=not args.no_progress)
    print(f"results: {out / 'results.json'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from metafn.checkpoint import read_metadata
    from metafn.report import load_meta, run_evaluation

    ckpt = Path(args.checkpoint)
    meta_json = read_metadata(ckpt)
    if "config" not in meta_json:
        raise ConfigError(f"--checkpoint: {ckpt} has no config metadata (not written by metafn train)")
    config = _with_overrides(meta_json["config"], args.set)
    if args.n_tasks:
        config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, n_tasks=args.n_tasks))
    if args.no_baselines:
        config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, baselines=False))
    meta = load_meta(config, ckpt)
    out = Path(args.out or ckpt.parent)
    last = ckpt.parent / "last.safetensors"
    summary = None
    if last.exists():
        info = read_metadata(last)
        summary = {"step": info.get("step"), "best": info.get("best"),
                   "train_seconds": info.get("train_seconds"),
                   "train_cpu_seconds": info.get("train_cpu_seconds"),
                   "seconds_per_step": (info.get("train_seconds") or 0.0) / max(info.get("step") or 1, 1),
                   # when the evaluated checkpoint (e.g. best.safetensors) was reached in that run
                   "checkpoint": {"file": ckpt.name, "step": meta_json.get("step"),
                                  "train_seconds": meta_json.get("train_seconds")}}
    run_evaluation(config, out, meta, summary, progress=not args.no_progress)
    print(f"results: {out / 'results.json'}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from metafn.experiment import build_experiment
    from metafn.random import fold_in, key
    from metafn.train import init_train_state, make_meta_train_step, make_optimizer

    config = _load(args.config, args.set)
    exp = build_experiment(config)
    opt = make_optimizer(config)
    state = init_train_state(exp, config, opt)
    step = make_meta_train_step(exp, config, opt)
    for i in range(args.warmup):
        state, m = step(state, fold_in(key(1), i))
        mx.eval(state, m)
    times = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        state, m = step(state, fold_in(key(2), i))
        mx.eval(state, m)
        times.append(time.perf_counter() - t0)
    times.sort()
    report = json.dumps({
        "config": args.config, "name": config.name, "algorithm": config.algorithm.name,
        "overrides": list(args.set),
        "ms_per_meta_step_median": 1000 * times[len(times) // 2],
        "ms_min": 1000 * times[0], "ms_max": 1000 * times[-1], "repeats": args.repeats,
        "warmup": args.warmup, "mlx": mx.__version__, "device": str(mx.default_device()),
        "blas": _blas.status().library, "malloc": _malloc.status().reason,
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "cpu_count": os.cpu_count(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, indent=2)
    if args.out:
        atomic_write_text(args.out, report + "\n")
    print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metafn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, device, BLAS in use and a measured GEMM rate")
    p.add_argument("--n", type=int, default=2048, help="matrix size of the GEMM measurement")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_info)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="YAML config (see configs/)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.steps=100 (repeatable)")

    p = sub.add_parser("validate", help="check a config and the environment")
    with_config(p)
    p.set_defaults(func=_validate)
    p = sub.add_parser("train", help="meta-train, checkpoint, then evaluate on held-out tasks")
    with_config(p)
    p.add_argument("--out", help="output directory (default runs/<name>)")
    p.add_argument("--no-resume", action="store_true", help="start over even if out has a checkpoint")
    p.add_argument("--no-eval", action="store_true", help="skip the final held-out evaluation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)
    p = sub.add_parser("eval", help="evaluate a checkpoint on held-out tasks with baselines")
    p.add_argument("--checkpoint", required=True, help="best.safetensors or last.safetensors of a run")
    p.add_argument("--out", help="output directory (default: the checkpoint's)")
    p.add_argument("--n-tasks", type=int, help="override eval.n_tasks")
    p.add_argument("--no-baselines", action="store_true", help="evaluate the checkpoint only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an eval.* value of the run's config, e.g. --set eval.budgets=[1,5]")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_eval)
    p = sub.add_parser("bench", help="time meta-training steps of a config (ms per meta-step)")
    with_config(p)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", help="also write the JSON report to this file")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, TypeError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
