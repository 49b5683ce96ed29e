"""Formulations of the MAML / Reptile meta-step in MLX, timed against each other.

    OPENBLAS_NUM_THREADS=1 python -m bench.explore_metafn --workloads W1,W2,W3 --repeats 40

Evidence for changes to metafn/outer.py: every variant computes the same loss and gradient as
``metafn.outer.maml_outer`` (checked) and is timed in one process, interleaved round robin,
reporting the median wall-clock and process-CPU milliseconds (CPU time is the robust figure on
a shared machine when the BLAS runs one thread).

Variants (MAML):
  current          metafn.outer.maml_outer (grad of the sum over a vmapped loss, params
                   broadcast over tasks)
  compiled         mx.compile(maml_outer)
  vmap_of_grad     JAX-style: vmap over tasks of a per-task adapt-then-query loss, params shared
                   (in_axes None), value_and_grad of the mean
  vmap_of_grad_c   mx.compile of vmap_of_grad
  streams2         the task batch split in 2 halves, maml_outer on each on its own MLX CPU stream
                   (own thread: the halves run on two cores), results combined by task count
  streams2_c       as streams2 with each half's maml_outer compiled
Variants (Reptile): current, compiled, vmap_adapt (vmap of metafn.inner.adapt), vmap_adapt_c,
streams2, streams2_c.
"""

from __future__ import annotations

import argparse
import statistics
import time

import metafn  # noqa: F401  (before mlx)
import mlx.core as mx
import numpy as np

from bench.peers.metafn_impl import split_over_streams
from bench.peers.workloads import WORKLOADS, compare, make_data, split_data
from metafn.inner import adapt
from metafn.losses import mse_loss
from metafn.nn import mlp_apply
from metafn.outer import maml_outer, reptile_grad
from metafn.tasks.episode import Episode
from metafn.tree import tree_map, tree_mean_axis0, tree_sub


def leaves(tree) -> list[np.ndarray]:
    return [np.array(x) for layer in tree for x in (layer["w"], layer["b"])]


def maml_variants(w, params, ep):
    lf = mse_loss(mlp_apply)
    lr, steps, fo = w.inner_lr, w.steps, w.first_order

    def current(p, sx, sy, qx, qy):
        return maml_outer(lf, p, Episode(sx, sy, qx, qy), lr, steps, first_order=fo)

    def vmap_of_grad(p, sx, sy, qx, qy):
        def task_loss(p, sx, sy, qx, qy):
            return lf(adapt(lf, p, sx, sy, steps, lr, first_order=fo), qx, qy)

        def meta(p):
            return mx.mean(mx.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy))

        return mx.value_and_grad(meta)(p)

    return {"current": current, "compiled": mx.compile(current), "vmap_of_grad": vmap_of_grad,
            "vmap_of_grad_c": mx.compile(vmap_of_grad),
            "streams2": split_over_streams(current, 2),
            "streams2_c": split_over_streams(mx.compile(current), 2)}


def reptile_variants(w, params, ep):
    lf = mse_loss(mlp_apply)
    lr, steps, beta = w.inner_lr, w.steps, w.outer_lr

    def current(p, sx, sy, qx, qy):
        loss, g = reptile_grad(lf, p, Episode(sx, sy, qx, qy), lr, steps)
        return loss, g, tree_map(lambda a, d: a - beta * d, p, g)

    def vmap_adapt(p, sx, sy, qx, qy):
        x = mx.concatenate([sx, qx], axis=1)
        y = mx.concatenate([sy, qy], axis=1)
        adapted = mx.vmap(lambda xx, yy: adapt(lf, p, xx, yy, steps, lr, first_order=True))(x, y)
        adapted = tree_map(mx.stop_gradient, adapted)
        loss = mx.mean(mx.vmap(lf)(adapted, qx, qy))
        g = tree_sub(p, tree_mean_axis0(adapted))
        return loss, g, tree_map(lambda a, d: a - beta * d, p, g)

    def reptile_pair(p, sx, sy, qx, qy):  # (loss, g); the update is applied after combining
        return reptile_grad(lf, p, Episode(sx, sy, qx, qy), lr, steps)

    def with_update(pair_fn):
        def fn(p, sx, sy, qx, qy):
            loss, g = pair_fn(p, sx, sy, qx, qy)
            return loss, g, tree_map(lambda a, d: a - beta * d, p, g)
        return fn

    return {"current": current, "compiled": mx.compile(current), "vmap_adapt": vmap_adapt,
            "vmap_adapt_c": mx.compile(vmap_adapt),
            "streams2": with_update(split_over_streams(reptile_pair, 2)),
            "streams2_c": with_update(split_over_streams(mx.compile(reptile_pair), 2))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="W1,W2,W3")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated variant names")
    a = ap.parse_args()
    for wid in a.workloads.split(","):
        w = WORKLOADS[wid]
        flat, ep_np = split_data(make_data(w))
        params = [{"w": mx.array(flat[i]), "b": mx.array(flat[i + 1])}
                  for i in range(0, len(flat), 2)]
        ep = [mx.array(ep_np[k]) for k in ("sx", "sy", "qx", "qy")]
        fns = (maml_variants if w.kind == "maml" else reptile_variants)(w, params, ep)
        if a.only:
            fns = {k: v for k, v in fns.items() if k in a.only.split(",") or k == "current"}
        ref = None
        for name, fn in fns.items():
            t = time.perf_counter()
            out = fn(params, *ep)
            mx.eval(out)
            first = (time.perf_counter() - t) * 1e3
            loss, g = float(out[0].item()), leaves(out[1])
            if ref is None:
                ref = (loss, g)
            ok, det = compare(ref[0], ref[1], loss, g)
            print(f"{wid} {name:16s} first call {first:8.1f} ms  check {'ok' if ok else 'MISMATCH'} "
                  f"(grad rel err {det['grad_rel_err']:.1e})")
            assert ok, det
            for _ in range(2):
                mx.eval(fn(params, *ep))
        wall = {k: [] for k in fns}
        cpu = {k: [] for k in fns}
        names = list(fns)
        for r in range(max(1, a.repeats // a.batch)):
            for name in names[r % len(names):] + names[: r % len(names)]:
                mx.eval(fns[name](params, *ep))
                for _ in range(a.batch):
                    c, t = time.process_time(), time.perf_counter()
                    mx.eval(fns[name](params, *ep))
                    wall[name].append((time.perf_counter() - t) * 1e3)
                    cpu[name].append((time.process_time() - c) * 1e3)
        base = statistics.median(cpu["current"])
        for name in names:
            print(f"{wid} {name:16s} wall median {statistics.median(wall[name]):8.2f} min "
                  f"{min(wall[name]):8.2f} | cpu median {statistics.median(cpu[name]):8.2f} min "
                  f"{min(cpu[name]):8.2f} | cpu vs current {statistics.median(cpu[name]) / base:5.2f}")


if __name__ == "__main__":
    main()
