"""MLX's cost per operation on the shapes of the small MLP workloads (W1 / W3).

    OPENBLAS_NUM_THREADS=1 python -m bench.op_cost [--chain 100] [--repeats 200]

Each figure is the wall time of one ``mx.eval`` of a chain of ``--chain`` dependent operations,
divided by the chain length: the per-operation cost once graph building, dispatch to the stream
thread and the kernel are all counted, without the per-``eval`` round trip. Shapes are W1's: 25
tasks, 10 examples, hidden width 40.

- ``add``: ``x + y`` on ``(25, 10, 40)`` (10k floats);
- ``batched matmul``: ``(25, 10, 40) @ (25, 40, 40)``, what ``mx.vmap`` makes of a per-task dense
  layer once the weights differ per task (MLX's CPU backend calls ``cblas_sgemm`` per task);
- ``single matmul``: the same rows as one ``(250, 40) @ (40, 40)`` GEMM (shared weights);
- numpy's ``matmul`` of the batched shapes, for scale.
"""

from __future__ import annotations

import argparse
import time

import metafn  # noqa: F401  (fast BLAS and malloc settings before mlx.core)
import mlx.core as mx
import numpy as np


def per_op_us(build, chain: int, repeats: int) -> float:
    """Median over ``repeats`` of (one ``mx.eval`` of ``build(chain)``) / ``chain``, in us."""
    for _ in range(5):
        mx.eval(build(chain))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(build(chain))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / chain * 1e6


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chain", type=int, default=100, help="dependent operations per mx.eval")
    ap.add_argument("--repeats", type=int, default=200, help="timed mx.eval calls per operation")
    args = ap.parse_args(argv)
    for name in ("chain", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")

    key = mx.random.key(0)
    ka, kb = mx.random.split(key)
    x = mx.random.normal((25, 10, 40), key=ka)
    w = 0.1 * mx.random.normal((25, 40, 40), key=kb)
    mx.eval(x, w)
    y, w0, x_flat = w[:, :10, :], w[0], x.reshape(250, 40)

    def chain(op, start):
        def build(n):
            h = start
            for _ in range(n):
                h = op(h)
            return h
        return build

    cases = {
        "add (25,10,40)": chain(lambda h: h + y, x),
        "batched matmul 25 x (10,40)@(40,40)": chain(lambda h: h @ w, x),
        "single matmul (250,40)@(40,40)": chain(lambda h: h @ w0, x_flat),
    }
    for name, build in cases.items():
        print(f"{name:40s} {per_op_us(build, args.chain, args.repeats):8.2f} us per op")
    xn, wn = np.array(x), np.array(w)
    t0 = time.perf_counter()
    for _ in range(args.repeats * 10):
        np.matmul(xn, wn)
    print(f"{'numpy batched matmul (same shapes)':40s} "
          f"{(time.perf_counter() - t0) / (args.repeats * 10) * 1e6:8.2f} us per op")


if __name__ == "__main__":
    main()
