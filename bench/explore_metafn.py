"""Formulations of the benchmark steps in metafn / MLX, timed against each other in one process.

    OPENBLAS_NUM_THREADS=1 python -m bench.explore_metafn --workloads W1,W3 --repeats 40
    OPENBLAS_NUM_THREADS=1 python -m bench.explore_metafn --workloads W1 --blas-threads 1,2
    OPENBLAS_NUM_THREADS=1 python -m bench.explore_metafn --workloads W7 --repeats 10
    OPENBLAS_NUM_THREADS=1 python -m bench.explore_metafn --workloads W4 --repeats 2
    OPENBLAS_NUM_THREADS=1 python -m bench.explore_metafn --conv

Evidence for the choices in ``bench/peers/metafn_impl.py`` and for proposed changes to metafn:
every variant computes the loss and gradient of the workload's ``eager`` variant (checked with
``bench.peers.workloads.compare`` and the workload's tolerance) and the variants are timed
interleaved, round robin, reporting median / min wall-clock and process-CPU ms (CPU time is the
robust figure on a shared machine when the BLAS runs one thread; it counts MLX's stream thread
too).

Variants:
  MAML (W1, W2)   eager (``maml_outer``), compiled (``mx.compile`` of it), shapeless
                  (``mx.compile(..., shapeless=True)``), lr_array (compiled, inner rate an
                  ``mx.array`` argument instead of a Python float), vmap_of_grad_c (compiled
                  JAX-style ``vmap`` over tasks of ``metafn.inner.adapt`` + query loss, params
                  shared), streams2_c (two task halves, each compiled, on two CPU streams)
  Reptile (W3)    eager (``reptile_grad`` + SGD update), compiled, shapeless, vmap_adapt_c
                  (compiled ``vmap`` of ``metafn.inner.adapt``), streams2_c
  LoRA (W7)       eager / compiled with the unmerged branch ``x W + s (x A) B``
                  (``lora_apply(..., unmerged=True)``), merged / merged_c with ``W + s A B``
                  built in the graph (``lora_apply`` default)
  conv4 MAML (W4, W5) eager (``maml_outer(conv4_batched_loss())``, per-task ``mx.conv2d``),
                  compiled, im2col (eager, ``metafn.nn.conv4.conv3x3`` replaced for the call by
                  :func:`im2col_conv3x3`: 9 shifted slices concatenated, one matmul), split
                  (eager, the task loop on ``mx.split`` slices: :func:`conv4_split_losses`)
  ProtoNet (W6)   eager, compiled, im2col
``--blas-threads 1,2`` runs every variant once per OpenBLAS thread count
(``openblas_set_num_threads`` between turns, same process). ``import metafn`` keeps freed memory
in glibc's heap (metafn/_malloc.py); run once more with ``METAFN_MALLOC=default`` to time glibc's
defaults (MLX's CPU allocator has no buffer cache, so every large array is then a fresh ``mmap``
whose pages fault in zero-filled). ``--conv`` times one 3x3
convolution of each conv4 layer shape alone (forward; forward + gradient wrt the kernel;
forward + gradient wrt kernel and input), ``mx.conv2d`` against :func:`im2col_conv3x3`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import statistics
import time
from typing import Callable

import metafn  # noqa: F401  (before mlx)
import mlx.core as mx
import numpy as np

from bench.peers import metafn_impl
from bench.peers.workloads import WORKLOADS, Workload, compare, make_data, split_data
from metafn import _blas
from metafn.inner import adapt
from metafn.losses import mse_loss
from metafn.nn import mlp_apply
from metafn.outer import maml_outer, reptile_grad
from metafn.tasks.episode import Episode
from metafn.tree import tree_map, tree_mean_axis0, tree_sub

Variant = Callable[[], object]


def im2col_conv3x3(x: mx.array, w: mx.array) -> mx.array:
    """3x3 'same' convolution of ``x (N, H, W, Ci)`` with ``w (Co, 3, 3, Ci)`` as explicit
    im2col: the 9 shifted copies of the zero-padded input concatenated in ``(kh, kw, ci)``
    order, ``(N H W, 9 Ci) @ (9 Ci, Co)`` -- the proposed float32 path of
    ``metafn.nn.conv4.conv3x3`` (today its float64 path)."""
    n, h, wd, ci = x.shape
    co = w.shape[0]
    xp = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    cols = mx.concatenate([xp[:, i:i + h, j:j + wd, :] for i in range(3) for j in range(3)],
                          axis=-1)
    return (cols.reshape(n * h * wd, 9 * ci) @ w.reshape(co, 9 * ci).T).reshape(n, h, wd, co)


@contextlib.contextmanager
def patched_conv3x3(fn):
    """Replace ``metafn.nn.conv4.conv3x3`` (looked up at call time by the task loop) by ``fn``."""
    from metafn.nn import conv4

    saved = conv4.conv3x3
    conv4.conv3x3 = fn
    try:
        yield
    finally:
        conv4.conv3x3 = saved


def mlp_maml_variants(w: Workload, params, ep) -> dict[str, Variant]:
    lf = mse_loss(mlp_apply)
    lr, steps, fo = w.inner_lr, w.steps, w.first_order

    def step(p, sx, sy, qx, qy):
        return maml_outer(lf, p, Episode(sx, sy, qx, qy), lr, steps, first_order=fo)

    def step_lr(p, sx, sy, qx, qy, rate):
        return maml_outer(lf, p, Episode(sx, sy, qx, qy), rate, steps, first_order=fo)

    def vmap_of_grad(p, sx, sy, qx, qy):
        def task_loss(p, sx, sy, qx, qy):
            return lf(adapt(lf, p, sx, sy, steps, lr, first_order=fo), qx, qy)

        def meta(p):
            return mx.mean(mx.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy))

        return mx.value_and_grad(meta)(p)

    c, cs, cl, cv = (mx.compile(step), mx.compile(step, shapeless=True), mx.compile(step_lr),
                     mx.compile(vmap_of_grad))
    split = metafn_impl.split_over_streams(mx.compile(step), 2)
    rate = mx.array(lr)
    return {"eager": lambda: step(params, *ep), "compiled": lambda: c(params, *ep),
            "shapeless": lambda: cs(params, *ep), "lr_array": lambda: cl(params, *ep, rate),
            "vmap_of_grad_c": lambda: cv(params, *ep), "streams2_c": lambda: split(params, *ep)}


def mlp_reptile_variants(w: Workload, params, ep) -> dict[str, Variant]:
    lf = mse_loss(mlp_apply)
    lr, steps, beta = w.inner_lr, w.steps, w.outer_lr

    def pair(p, sx, sy, qx, qy):
        return reptile_grad(lf, p, Episode(sx, sy, qx, qy), lr, steps)

    def with_update(pair_fn):
        def fn(p, sx, sy, qx, qy):
            loss, g = pair_fn(p, sx, sy, qx, qy)
            return loss, g, tree_map(lambda a, d: a - beta * d, p, g)

        return fn

    def vmap_adapt(p, sx, sy, qx, qy):
        x = mx.concatenate([sx, qx], axis=1)
        y = mx.concatenate([sy, qy], axis=1)
        adapted = mx.vmap(lambda xx, yy: adapt(lf, p, xx, yy, steps, lr, first_order=True))(x, y)
        adapted = tree_map(mx.stop_gradient, adapted)
        loss = mx.mean(mx.vmap(lf)(adapted, qx, qy))
        g = tree_sub(p, tree_mean_axis0(adapted))
        return loss, g, tree_map(lambda a, d: a - beta * d, p, g)

    step = with_update(pair)
    c, cs, cv = mx.compile(step), mx.compile(step, shapeless=True), mx.compile(vmap_adapt)
    split = with_update(metafn_impl.split_over_streams(mx.compile(pair), 2))
    return {"eager": lambda: step(params, *ep), "compiled": lambda: c(params, *ep),
            "shapeless": lambda: cs(params, *ep), "vmap_adapt_c": lambda: cv(params, *ep),
            "streams2_c": lambda: split(params, *ep)}


def bert_lora_variants(w: Workload, data) -> tuple[dict[str, Variant], Callable]:
    from bench.peers.workloads import minilm_dir
    from metafn import peft
    from metafn.losses import cross_entropy
    from metafn.nn import bert

    config, base, _ = bert.bert_load(minilm_dir(), with_tokenizer=False)
    flat, inp = split_data(data)
    tr = metafn_impl._lora_tree(w, flat, config.num_hidden_layers)
    ids, mask, y = (mx.array(inp[k]) for k in ("ids", "mask", "y"))
    lcfg = peft.LoraConfig(r=w.rank, alpha=w.alpha, target_modules=("query", "value"))

    def make(unmerged: bool):
        def loss(tr, ids, mask, y):
            h = peft.lora_apply(base, tr["lora"], lcfg, bert.bert_apply, config, ids, mask,
                                unmerged=unmerged)
            return cross_entropy(bert.mean_pool(h, mask) @ tr["head"]["w"] + tr["head"]["b"], y)

        return lambda tr, ids, mask, y: mx.value_and_grad(loss)(tr, ids, mask, y)

    unmerged, merged = make(True), make(False)
    cu, cm = mx.compile(unmerged), mx.compile(merged)
    return {"eager": lambda: unmerged(tr, ids, mask, y), "compiled": lambda: cu(tr, ids, mask, y),
            "merged": lambda: merged(tr, ids, mask, y),
            "merged_c": lambda: cm(tr, ids, mask, y)}, metafn_impl._lora_to_numpy


def conv4_split_losses(params_t, x: mx.array, y: mx.array) -> mx.array:
    """``metafn.nn.conv4.conv4_task_losses`` (method ``"loop"``) with each parameter leaf cut
    into its ``T`` task slices once by ``mx.split`` + ``mx.squeeze`` instead of indexed
    ``leaf[i]`` per task: the vjp of ``leaf[i]`` is a scatter into a zero ``(T, ...)`` array
    per task (T scatters and T - 1 adds per leaf), that of ``mx.split`` one concatenation."""
    from metafn.nn.conv4 import batch_norm, conv3x3, max_pool_2x2

    t = x.shape[0]

    def unstack(a: mx.array) -> list[mx.array]:
        return [mx.squeeze(s, 0) for s in mx.split(a, t, axis=0)]

    blocks = [{k: unstack(v) for k, v in blk.items()} for blk in params_t["blocks"]]
    feats = []
    for i in range(t):
        z = x[i]
        for blk in blocks:
            z = batch_norm(conv3x3(z, blk["w"][i]), blk["gamma"][i], blk["beta"][i], (0, 1, 2))
            z = max_pool_2x2(mx.maximum(z, 0.0))
        feats.append(z.reshape(z.shape[0], -1))
    logits = mx.stack(feats) @ params_t["head"]["w"] + params_t["head"]["b"][:, None, :]
    picked = mx.take_along_axis(logits, y[..., None].astype(mx.int32), axis=-1)[..., 0]
    return mx.mean(mx.logsumexp(logits, axis=-1) - picked, axis=-1)


def conv4_variants(w: Workload, data) -> tuple[dict[str, Variant], Callable]:
    from metafn.outer import task_batched

    runners = metafn_impl.build(w, data)
    eager, compiled = runners["metafn"], runners["metafn-compiled"]  # conv4's headline: eager
    flat, ep_np = split_data(data)
    params = metafn_impl._conv4_params(flat)
    ep = Episode(*(mx.array(ep_np[k]) for k in ("sx", "sy", "qx", "qy")))
    split_loss = task_batched(conv4_split_losses)

    def im2col():
        with patched_conv3x3(im2col_conv3x3):
            return eager.step()

    def split():
        return maml_outer(split_loss, params, ep, w.inner_lr, w.steps, first_order=w.first_order)

    out = {"eager": eager.step, "compiled": compiled.step, "im2col": im2col}
    if w.kind == "maml":
        out["split"] = split
    return out, eager.to_numpy


def _mlp_to_numpy(out) -> tuple[float, list[np.ndarray]]:
    return float(out[0].item()), [np.array(x) for layer in out[1] for x in (layer["w"], layer["b"])]


def build(w: Workload) -> tuple[dict[str, Variant], Callable]:
    data = make_data(w)
    if w.model == "bert":
        return bert_lora_variants(w, data)
    if w.model == "conv4":
        return conv4_variants(w, data)
    flat, ep_np = split_data(data)
    params = [{"w": mx.array(flat[i]), "b": mx.array(flat[i + 1])} for i in range(0, len(flat), 2)]
    ep = [mx.array(ep_np[k]) for k in ("sx", "sy", "qx", "qy")]
    make = mlp_maml_variants if w.kind == "maml" else mlp_reptile_variants
    return make(w, params, ep), _mlp_to_numpy


def time_variants(w: Workload, fns: dict[str, Variant], to_numpy, repeats: int, batch: int,
                  threads: list[int] | None) -> None:
    """Check every variant against ``eager``, then time them interleaved and print a table."""
    ref = None
    for name, fn in fns.items():
        t = time.perf_counter()
        out = fn()
        mx.eval(out)
        first = (time.perf_counter() - t) * 1e3
        loss, g = to_numpy(out)
        if ref is None:
            ref = (loss, g)
        ok, det = compare(ref[0], ref[1], loss, g, w.grad_rel_tol)
        print(f"{w.id} {name:16s} first call {first:9.1f} ms  check {'ok' if ok else 'MISMATCH'} "
              f"(loss rel err {det['loss_rel_err']:.1e}, grad rel err {det['grad_rel_err']:.1e})",
              flush=True)
        assert ok, det
    lib = ctypes.CDLL(_blas.status().library) if threads else None
    keys = [(n, t) for t in (threads or [None]) for n in fns]
    wall = {k: [] for k in keys}
    cpu = {k: [] for k in keys}
    for r in range(max(1, -(-repeats // batch))):
        for name, t in keys[r % len(keys):] + keys[: r % len(keys)]:
            if lib is not None:
                lib.openblas_set_num_threads(t)
            mx.eval(fns[name]())
            for _ in range(batch):
                c, t0 = time.process_time(), time.perf_counter()
                mx.eval(fns[name]())
                wall[(name, t)].append((time.perf_counter() - t0) * 1e3)
                cpu[(name, t)].append((time.process_time() - c) * 1e3)
    base = statistics.median(cpu[("eager", keys[0][1])])
    for k in keys:
        label = k[0] if k[1] is None else f"{k[0]}@{k[1]}t"
        print(f"{w.id} {label:16s} wall median {statistics.median(wall[k]):9.2f} min "
              f"{min(wall[k]):9.2f} | cpu median {statistics.median(cpu[k]):9.2f} min "
              f"{min(cpu[k]):9.2f} | cpu vs eager {statistics.median(cpu[k]) / base:5.2f}")


def conv_table(repeats: int) -> None:
    """One 3x3 convolution per conv4 layer shape (W4's query batch of one task, 75 images),
    ``mx.conv2d`` against :func:`im2col_conv3x3`: min CPU ms of forward, forward + kernel
    gradient, forward + kernel and input gradient, and the max difference of the outputs."""
    def best(fn) -> float:
        mx.eval(fn())
        ts = []
        for _ in range(repeats):
            c = time.process_time()
            mx.eval(fn())
            ts.append((time.process_time() - c) * 1e3)
        return min(ts)

    convs = {"conv2d": lambda x, k: mx.conv2d(x, k, padding=1), "im2col": im2col_conv3x3}
    for n, h, ci in [(75, 28, 1), (75, 14, 64), (75, 7, 64), (75, 3, 64)]:
        x = mx.random.normal((n, h, h, ci), key=mx.random.key(0))
        k = 0.1 * mx.random.normal((64, 3, 3, ci), key=mx.random.key(1))
        mx.eval(x, k)
        flop = 2 * n * h * h * 9 * ci * 64
        row = []
        for name, conv in convs.items():
            def obj(x, k, conv=conv):
                return mx.sum(mx.square(conv(x, k)))

            gk = mx.grad(obj, argnums=1)
            gxk = mx.grad(obj, argnums=(0, 1))
            fwd = best(lambda: conv(x, k))
            row.append(f"{name} fwd {fwd:7.2f} ms ({flop / fwd / 1e6:5.1f} GFLOP/s), +dK "
                       f"{best(lambda: gk(x, k)):7.2f}, +dK+dx {best(lambda: gxk(x, k)):7.2f}")
        diff = float(mx.max(mx.abs(convs["conv2d"](x, k) - convs["im2col"](x, k))))
        print(f"x ({n},{h},{h},{ci}) -> 64, {flop / 1e6:7.1f} MFLOP: " + " | ".join(row)
              + f" | max |diff| {diff:.1e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.explore_metafn",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="W1,W3")
    ap.add_argument("--repeats", type=int, default=40, help="timed calls per variant")
    ap.add_argument("--batch", type=int, default=5, help="calls per round-robin turn")
    ap.add_argument("--only", default="", help="comma-separated variant names (eager always runs)")
    ap.add_argument("--blas-threads", default="",
                    help="comma-separated OpenBLAS thread counts to time every variant with")
    ap.add_argument("--conv", action="store_true", help="time single conv4 convolutions only")
    a = ap.parse_args()
    if a.conv:
        conv_table(a.repeats)
        return
    threads = [int(t) for t in a.blas_threads.split(",")] if a.blas_threads else None
    for wid in a.workloads.split(","):
        w = WORKLOADS[wid]
        fns, to_numpy = build(w)
        if a.only:
            keep = set(a.only.split(",")) | {"eager"}
            fns = {k: v for k, v in fns.items() if k in keep}
        time_variants(w, fns, to_numpy, a.repeats, min(a.batch, a.repeats), threads)


if __name__ == "__main__":
    main()
