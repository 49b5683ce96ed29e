"""The workloads in PyTorch with ``torch.func``: ``grad`` over ``vmap`` of a per-task loss
whose inner loop calls ``torch.func.grad`` (second order by nesting), on a hand-written
functional MLP (``x @ w + b``, the same layout as metafn). Eager mode (no ``torch.compile``).

Same math, shapes, float32 data and initial parameters as ``metafn_impl``."""

from __future__ import annotations

import os
import platform

import numpy as np
import torch
from torch.func import grad, grad_and_value, vmap

from bench.peers.runner import Runner
from bench.peers.workloads import Workload, split_data

NAME = "torch"
VARIANTS = ("torch",)


def setup(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    torch.set_grad_enabled(False)  # torch.func transforms do not need the autograd tape


def info() -> dict:
    return {
        "framework": "PyTorch (torch.func)",
        "versions": {"torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "threads": {"torch.get_num_threads": torch.get_num_threads(),
                    "torch.get_num_interop_threads": torch.get_num_interop_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS")},
        "blas": "MKL" if torch.backends.mkl.is_available() else "unknown",
        "memory_method": "peak RSS (getrusage ru_maxrss, HWM reset) minus RSS before build",
    }


def gemm(n: int):
    """A callable computing one ``n x n`` float32 matmul (torch is synchronous on the CPU)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    return lambda: torch.mm(a, b)


def mlp_apply(params, x):
    n = len(params) // 2
    for i in range(n):
        x = x @ params[2 * i] + params[2 * i + 1]
        if i < n - 1:
            x = torch.clamp_min(x, 0.0)
    return x


def mse_loss(params, x, y):
    return torch.mean(torch.square(mlp_apply(params, x) - y))


def adapt(params, x, y, steps, lr, first_order):
    for _ in range(steps):
        g = grad(mse_loss)(params, x, y)
        if first_order:
            g = tuple(d.detach() for d in g)
        params = tuple(p - lr * d for p, d in zip(params, g))
    return params


def _block(out) -> None:
    pass


def _to_numpy(out) -> tuple[float, list[np.ndarray]]:
    g, loss = out[0], out[1]
    return float(loss), [d.numpy().copy() for d in g]


def _tensors(data: dict[str, np.ndarray]):
    flat, ep = split_data(data)
    params = tuple(torch.from_numpy(np.array(p)) for p in flat)
    args = [torch.from_numpy(np.array(ep[k])) for k in ("sx", "sy", "qx", "qy")]
    return params, args


def _mlp_maml(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    params, args = _tensors(data)

    def task_loss(p, sx, sy, qx, qy):
        return mse_loss(adapt(p, sx, sy, w.steps, w.inner_lr, w.first_order), qx, qy)

    def meta_loss(p, sx, sy, qx, qy):
        return torch.mean(vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy))

    step = grad_and_value(meta_loss)
    return {"torch": Runner(lambda: step(params, *args), _block, _to_numpy)}


def _mlp_reptile(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    params, args = _tensors(data)

    def outer(p, sx, sy, qx, qy):
        x = torch.cat([sx, qx], dim=1)
        y = torch.cat([sy, qy], dim=1)
        adapted = vmap(lambda xx, yy: adapt(p, xx, yy, w.steps, w.inner_lr, True))(x, y)
        loss = torch.mean(vmap(mse_loss)(adapted, qx, qy))
        g = tuple(a - torch.mean(t, dim=0) for a, t in zip(p, adapted))
        new = tuple(a - w.outer_lr * d for a, d in zip(p, g))
        return g, loss, new  # (grads, loss) order as grad_and_value

    return {"torch": Runner(lambda: outer(params, *args), _block, _to_numpy)}


BUILDERS = {("mlp", "maml"): _mlp_maml, ("mlp", "reptile"): _mlp_reptile}


def build(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    return BUILDERS[(w.model, w.kind)](w, data)


def reset_peak() -> None:
    pass


def framework_peak_mb() -> dict:
    return {}
