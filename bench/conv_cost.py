"""Where W6's time goes: conv4's convolutions against the rest, in MLX and (if installed) XLA.

    taskset -c 0 python -m bench.conv_cost [--batch 100] [--repeats 20]

For each conv4 layer at W6's shapes (``--batch`` images: 5-way 5-shot + 15 queries = 100;
28x28 -> 14 -> 7 -> 3, 64 channels) it times, one thread, median of ``--repeats``:

- the 3x3 'same' convolution forward (``mx.conv2d``; XLA ``lax.conv_general_dilated``) and its
  backward (weight gradient, plus the input gradient for layers >= 2 -- the first layer's input is
  data), with the rate in GFLOP/s of the products (``2 N H W 9 C_in C_out`` per pass);
- MLX only: the rest of the block (batch-norm statistics, pooling, affine, ReLU of
  :func:`metafn.nn.conv4.conv_block`) forward and backward;
- MLX only: the GEMM that MLX's im2col convolution of layer 2 reduces to,
  ``(N H W, 9 C) @ (9 C, C_out)``, alone.

The sums say how much of a W6 step (``python -m bench.speed --workloads W6``) is convolution.
One thread everywhere: ``OPENBLAS_NUM_THREADS`` and XLA's flags are set here before any import.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import metafn  # noqa: E402,F401  (fast BLAS and malloc settings before mlx.core)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from metafn.nn import conv4  # noqa: E402

LAYERS = ((28, 1), (14, 64), (7, 64), (3, 64))  # (map size, input channels) at 28x28 input
C_OUT = 64


def median_ms(fn, block, repeats: int) -> float:
    """Median wall time of ``block(fn())`` over ``repeats`` calls after 3 warm-up calls."""
    for _ in range(3):
        block(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def mlx_costs(n: int, repeats: int) -> list[dict]:
    out = []
    for size, c_in in LAYERS:
        ks = mx.random.split(mx.random.key(size), 4)
        x = mx.random.normal((n, size, size, c_in), key=ks[0])
        w = mx.random.normal((C_OUT, 3, 3, c_in), key=ks[1]) * 0.1
        ct = mx.random.normal((n, size, size, C_OUT), key=ks[2])
        argnums = [1] if c_in == 1 else [0, 1]

        def conv(*a):
            x_, w_ = (x, a[0]) if c_in == 1 else a
            return mx.conv2d(x_, w_, padding=1)

        primals = [w] if c_in == 1 else [x, w]
        z = mx.random.normal((n, size, size, C_OUT), key=ks[3])
        g, b = mx.ones((C_OUT,)), mx.zeros((C_OUT,))
        ct_pool = mx.ones((n, size // 2, size // 2, C_OUT))

        def rest(z, g, b):  # conv_block without its convolution
            scale, shift = conv4._bn_affine(z, g, b, (0, 1, 2))
            return mx.maximum(conv4._apply_affine(conv4.max_pool_2x2(z), scale, shift, (0, 1, 2)), 0.0)

        out.append({
            "layer": f"{size}x{size}x{c_in}",
            "gflop_per_pass": 2 * n * size * size * 9 * c_in * C_OUT / 1e9,
            "conv_fwd_ms": median_ms(lambda: mx.conv2d(x, w, padding=1), mx.eval, repeats),
            "conv_bwd_ms": median_ms(lambda: mx.vjp(conv, primals, [ct])[1], mx.eval, repeats),
            "passes_bwd": len(argnums),
            "rest_fwd_bwd_ms": median_ms(lambda: mx.vjp(rest, [z, g, b], [ct_pool]), mx.eval, repeats),
        })
    size, c_in = LAYERS[1]
    a = mx.random.normal((n * size * size, 9 * c_in), key=mx.random.key(1))
    bm = mx.random.normal((9 * c_in, C_OUT), key=mx.random.key(2))
    out[1]["gemm_alone_ms"] = median_ms(lambda: a @ bm, mx.eval, repeats)
    return out


def xla_costs(n: int, repeats: int) -> list[dict] | None:
    try:
        import jax
        from jax import lax
    except ImportError:
        return None
    out = []
    block = jax.block_until_ready
    for size, c_in in LAYERS:
        k1, k2, k3 = jax.random.split(jax.random.key(size), 3)
        x = jax.random.normal(k1, (n, size, size, c_in))
        w = jax.random.normal(k2, (3, 3, c_in, C_OUT)) * 0.1
        ct = jax.random.normal(k3, (n, size, size, C_OUT))

        def conv(x, w):
            return lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

        fwd = jax.jit(conv)
        if c_in == 1:
            bwd = jax.jit(lambda x, w: jax.vjp(lambda w: conv(x, w), w)[1](ct))
        else:
            bwd = jax.jit(lambda x, w: jax.vjp(conv, x, w)[1](ct))
        out.append({"conv_fwd_ms": median_ms(lambda: fwd(x, w), block, repeats),
                    "conv_bwd_ms": median_ms(lambda: bwd(x, w), block, repeats)})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=100, help="images per pass (W6: 100)")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per figure")
    args = ap.parse_args(argv)
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}: expected an int >= 1, got {getattr(args, name)}")
    mlx_rows = mlx_costs(args.batch, args.repeats)
    xla_rows = xla_costs(args.batch, args.repeats)
    print(f"{'layer':10s} {'MLX fwd ms':>10s} {'GF/s':>5s} {'MLX bwd ms':>10s} {'rest f+b':>8s} "
          f"{'XLA fwd ms':>10s} {'GF/s':>5s} {'XLA bwd ms':>10s}")
    tot = {"mlx_conv": 0.0, "mlx_rest": 0.0, "xla_conv": 0.0}
    for i, r in enumerate(mlx_rows):
        gf = r["gflop_per_pass"]
        line = (f"{r['layer']:10s} {r['conv_fwd_ms']:10.2f} {gf / r['conv_fwd_ms'] * 1e3:5.0f} "
                f"{r['conv_bwd_ms']:10.2f} {r['rest_fwd_bwd_ms']:8.2f}")
        tot["mlx_conv"] += r["conv_fwd_ms"] + r["conv_bwd_ms"]
        tot["mlx_rest"] += r["rest_fwd_bwd_ms"]
        if xla_rows:
            x = xla_rows[i]
            line += (f" {x['conv_fwd_ms']:10.2f} {gf / x['conv_fwd_ms'] * 1e3:5.0f} "
                     f"{x['conv_bwd_ms']:10.2f}")
            tot["xla_conv"] += x["conv_fwd_ms"] + x["conv_bwd_ms"]
        print(line)
    r2 = mlx_rows[1]
    print(f"\nlayer 2's im2col GEMM alone in MLX: {r2['gemm_alone_ms']:.2f} ms "
          f"({r2['gflop_per_pass'] / r2['gemm_alone_ms'] * 1e3:.0f} GFLOP/s)")
    print(f"MLX: convolutions {tot['mlx_conv']:.1f} ms, rest of the blocks {tot['mlx_rest']:.1f} ms"
          + (f"; XLA convolutions {tot['xla_conv']:.1f} ms" if xla_rows else "; XLA: jax not installed"))


if __name__ == "__main__":
    main()
