"""The workloads in JAX: ``jax.jit`` of ``value_and_grad`` over ``vmap`` of a per-task loss,
the inner loop unrolled in Python with ``jax.grad`` (second order by nesting).

Same math, shapes, float32 data and initial parameters as ``metafn_impl``. Timings are of the
jitted function after it was compiled (steady state)."""

from __future__ import annotations

import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

from bench.peers.runner import Runner
from bench.peers.workloads import Workload, split_data

NAME = "jax"
VARIANTS = ("jax",)


def setup(threads: int | None) -> None:
    """Thread count is set through XLA_FLAGS in the environment by the orchestrator."""
    jax.config.update("jax_platforms", "cpu")


def info() -> dict:
    import jaxlib

    return {
        "framework": "JAX",
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "devices": [str(d) for d in jax.devices()],
        "threads": {"XLA_FLAGS": os.environ.get("XLA_FLAGS"), "cpu_count": os.cpu_count()},
        "memory_method": "peak RSS (getrusage ru_maxrss, HWM reset) minus RSS before build "
                         "(includes XLA compilation)",
    }


def gemm(n: int):
    """A callable computing one blocked ``n x n`` float32 matmul."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    return lambda: mm(a, b).block_until_ready()


def mlp_apply(params, x):
    n = len(params) // 2
    for i in range(n):
        x = x @ params[2 * i] + params[2 * i + 1]
        if i < n - 1:
            x = jnp.maximum(x, 0.0)
    return x


def mse_loss(params, x, y):
    return jnp.mean(jnp.square(mlp_apply(params, x) - y))


def adapt(params, x, y, steps, lr, first_order):
    for _ in range(steps):
        g = jax.grad(mse_loss)(params, x, y)
        if first_order:
            g = jax.lax.stop_gradient(g)
        params = [p - lr * d for p, d in zip(params, g)]
    return params


def _block(out) -> None:
    jax.block_until_ready(out)


def _to_numpy(out) -> tuple[float, list[np.ndarray]]:
    return float(out[0]), [np.asarray(g) for g in out[1]]


def _mlp_maml(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    flat, ep = split_data(data)
    params = [jnp.asarray(p) for p in flat]
    args = [jnp.asarray(ep[k]) for k in ("sx", "sy", "qx", "qy")]

    def task_loss(p, sx, sy, qx, qy):
        return mse_loss(adapt(p, sx, sy, w.steps, w.inner_lr, w.first_order), qx, qy)

    def meta_loss(p, sx, sy, qx, qy):
        return jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy))

    step = jax.jit(jax.value_and_grad(meta_loss))
    return {"jax": Runner(lambda: step(params, *args), _block, _to_numpy)}


def _mlp_reptile(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    flat, ep = split_data(data)
    params = [jnp.asarray(p) for p in flat]
    args = [jnp.asarray(ep[k]) for k in ("sx", "sy", "qx", "qy")]

    def outer(p, sx, sy, qx, qy):
        x = jnp.concatenate([sx, qx], axis=1)
        y = jnp.concatenate([sy, qy], axis=1)
        adapted = jax.vmap(lambda xx, yy: adapt(p, xx, yy, w.steps, w.inner_lr, True))(x, y)
        loss = jnp.mean(jax.vmap(mse_loss)(adapted, qx, qy))
        g = [a - jnp.mean(t, axis=0) for a, t in zip(p, adapted)]
        new = [a - w.outer_lr * d for a, d in zip(p, g)]
        return loss, g, new

    step = jax.jit(outer)
    return {"jax": Runner(lambda: step(params, *args), _block, _to_numpy)}


BUILDERS = {("mlp", "maml"): _mlp_maml, ("mlp", "reptile"): _mlp_reptile}


def build(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    return BUILDERS[(w.model, w.kind)](w, data)


def cost_analysis_flops(w: Workload, data: dict[str, np.ndarray]) -> float | None:
    """XLA's own FLOP count of the compiled step (an instrumented cross-check of the
    analytic count); None where unavailable."""
    try:
        flat, ep = split_data(data)
        params = [jnp.asarray(p) for p in flat]
        args = [jnp.asarray(ep[k]) for k in ("sx", "sy", "qx", "qy")]
        if (w.model, w.kind) != ("mlp", "maml"):
            return None

        def task_loss(p, sx, sy, qx, qy):
            return mse_loss(adapt(p, sx, sy, w.steps, w.inner_lr, w.first_order), qx, qy)

        def meta_loss(p, sx, sy, qx, qy):
            return jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy))

        ca = jax.jit(jax.value_and_grad(meta_loss)).lower(params, *args).compile().cost_analysis()
        if isinstance(ca, list):
            ca = ca[0]
        return float(ca["flops"])
    except Exception:  # noqa: BLE001  (a cross-check only)
        return None


def reset_peak() -> None:
    pass


def framework_peak_mb() -> dict:
    return {}
