"""The workloads in PyTorch with ``torch.func``: ``grad`` over ``vmap`` of a per-task loss
whose inner loop calls ``torch.func.grad`` (second order by nesting), on hand-written
functional models (MLP ``x @ w + b`` in metafn's layout, conv4, W7's BERT + LoRA). Eager mode
(no ``torch.compile``).

Same math, shapes, float32 data and initial parameters as ``metafn_impl``."""

from __future__ import annotations

import math
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


def reptile_adapt(params, x, y, steps, lr):
    """Reptile's full-batch inner loop: the adapted weights and the last step's loss before its
    update (``metafn.outer.reptile_grad`` with ``inner_batches=1``)."""
    loss = mse_loss(params, x, y)
    for _ in range(steps):
        g, loss = grad_and_value(mse_loss)(params, x, y)
        params = tuple(p - lr * d.detach() for p, d in zip(params, g))
    return params, loss


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
        adapted, losses = vmap(lambda xx, yy: reptile_adapt(p, xx, yy, w.steps, w.inner_lr))(x, y)
        loss = torch.mean(losses)
        g = tuple(a - torch.mean(t, dim=0) for a, t in zip(p, adapted))
        new = tuple(a - w.outer_lr * d for a, d in zip(p, g))
        return g, loss, new  # (grads, loss) order as grad_and_value

    return {"torch": Runner(lambda: outer(params, *args), _block, _to_numpy)}


# --------------------------------------------------------------------------------- conv4
# Same model as metafn.nn.conv4 in torch's NCHW layout: images are transposed NHWC -> NCHW and
# kernels (C_out, 3, 3, C_in) -> (C_out, C_in, 3, 3) once at build time (not timed); gradients
# are transposed back for the correctness check. One-pass batch norm with the batch's
# statistics, ReLU, 2x2 max pool (floor), features flattened in (h, w, c) order as metafn.

BN_EPS = 1e-5
F = torch.nn.functional


def batch_norm(x, gamma, beta):
    mu = torch.mean(x, dim=(0, 2, 3), keepdim=True)
    var = torch.clamp_min(torch.mean(torch.square(x), dim=(0, 2, 3), keepdim=True)
                          - torch.square(mu), 0.0)
    scale = gamma.reshape(1, -1, 1, 1) * torch.rsqrt(var + BN_EPS)
    return x * scale + (beta.reshape(1, -1, 1, 1) - mu * scale)


def conv4_embed(params, x):
    for i in range(4):
        w, g, b = params[3 * i: 3 * i + 3]
        x = F.conv2d(x, w, padding=1)
        x = F.max_pool2d(torch.clamp_min(batch_norm(x, g, b), 0.0), 2)
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


def cross_entropy(logits, y):
    picked = torch.gather(logits, -1, y[..., None].long())[..., 0]
    return torch.mean(torch.logsumexp(logits, dim=-1) - picked)


def conv4_loss(params, x, y):
    return cross_entropy(conv4_embed(params[:12], x) @ params[12] + params[13], y)


def _conv4_tensors(data: dict[str, np.ndarray]):
    flat, ep = split_data(data)
    params = tuple(torch.from_numpy(np.ascontiguousarray(p.transpose(0, 3, 1, 2) if p.ndim == 4 else p))
                   for p in flat)
    img = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 1, 4, 2, 3)))  # noqa: E731
    args = [img(ep["sx"]), torch.from_numpy(ep["sy"]).long(), img(ep["qx"]),
            torch.from_numpy(ep["qy"]).long()]
    return params, args


def _conv4_to_numpy(out) -> tuple[float, list[np.ndarray]]:
    g, loss = out[0], out[1]
    return float(loss), [d.numpy().transpose(0, 2, 3, 1).copy() if d.ndim == 4 else d.numpy().copy()
                         for d in g]


def _conv4_maml(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    params, args = _conv4_tensors(data)

    def task_loss(p, sx, sy, qx, qy):
        for _ in range(w.steps):
            g = grad(conv4_loss)(p, sx, sy)
            if w.first_order:
                g = tuple(d.detach() for d in g)
            p = tuple(a - w.inner_lr * d for a, d in zip(p, g))
        return conv4_loss(p, qx, qy)

    def meta_loss(p, sx, sy, qx, qy):
        return torch.mean(vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy))

    step = grad_and_value(meta_loss)
    return {"torch": Runner(lambda: step(params, *args), _block, _conv4_to_numpy)}


def protonet_logits(s, sy, q, n_way):
    onehot = (sy[:, None] == torch.arange(n_way)[None, :]).to(s.dtype)
    protos = (onehot.T @ s) / torch.clamp_min(torch.sum(onehot, dim=0), 1.0)[:, None]
    sq = (torch.sum(q * q, dim=-1, keepdim=True) - 2.0 * q @ protos.T
          + torch.sum(protos * protos, dim=-1)[None, :])
    return -sq


def _conv4_protonet(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    params, args = _conv4_tensors(data)

    def loss(p, sx, sy, qx, qy):  # as metafn.outer.protonet_outer: one embedding call
        t, ns, nq = sx.shape[0], sx.shape[1], qx.shape[1]
        emb = conv4_embed(p, torch.cat([sx, qx], dim=1).reshape(-1, *sx.shape[2:]))
        emb = emb.reshape(t, ns + nq, -1)
        logits = vmap(lambda a, b, c: protonet_logits(a, b, c, w.n_way))(
            emb[:, :ns], sy, emb[:, ns:])
        return cross_entropy(logits, qy)

    step = grad_and_value(loss)
    return {"torch": Runner(lambda: step(params, *args), _block, _conv4_to_numpy)}


# ---------------------------------------------------------------------------------- BERT
# all-MiniLM-L6-v2 as plain functional torch over the Hugging Face state dict (the math of
# jax_impl.bert_lora_logits): F.linear with the (d_out, d_in) weights, F.layer_norm, masked
# softmax attention, exact (erf) F.gelu, LoRA on query and value, mean pooling, linear head.


def bert_lora_logits(base, lora, head, ids, mask, cfg, scale):
    """Head logits ``(B, n_way)``; ``lora`` the flat ``[qA, qB, vA, vB] x layers``."""
    eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    bsz, n = ids.shape
    d = cfg["hidden_size"]
    dh = d // heads
    x = (base["embeddings.word_embeddings.weight"][ids]
         + base["embeddings.position_embeddings.weight"][:n]
         + base["embeddings.token_type_embeddings.weight"][0])

    def ln(x, name):
        return F.layer_norm(x, (d,), base[name + ".weight"], base[name + ".bias"], eps)

    def dense(name, x):
        return F.linear(x, base[name + ".weight"], base[name + ".bias"])

    def split(t):
        return t.reshape(bsz, n, heads, dh).transpose(1, 2)

    h = ln(x, "embeddings.LayerNorm")
    keep = (mask > 0)[:, None, None, :]
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        qa, qb, va, vb = lora[4 * i: 4 * i + 4]
        q = dense(p + "attention.self.query", h) + scale * ((h @ qa) @ qb)
        k = dense(p + "attention.self.key", h)
        v = dense(p + "attention.self.value", h) + scale * ((h @ va) @ vb)
        s = (split(q) @ split(k).transpose(-1, -2)) / math.sqrt(dh)
        s = s.masked_fill(~keep, float("-inf"))
        ctx = (torch.softmax(s, dim=-1) @ split(v)).transpose(1, 2).reshape(bsz, n, d)
        a = ln(dense(p + "attention.output.dense", ctx) + h, p + "attention.output.LayerNorm")
        f = F.gelu(dense(p + "intermediate.dense", a))
        h = ln(dense(p + "output.dense", f) + a, p + "output.LayerNorm")
    m = mask.to(h.dtype)[..., None]
    pooled = torch.sum(h * m, dim=1) / torch.clamp_min(torch.sum(m, dim=1), 1e-9)
    return pooled @ head[0] + head[1]


def _bert_lora(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    from bench.peers.workloads import load_minilm_np, minilm_config

    cfg = minilm_config()
    base = {k: torch.from_numpy(v) for k, v in load_minilm_np().items()}
    flat, inp = split_data(data)
    trainable = tuple(torch.from_numpy(np.array(p)) for p in flat)
    ids = torch.from_numpy(inp["ids"]).long()
    mask = torch.from_numpy(inp["mask"]).long()
    y = torch.from_numpy(inp["y"]).long()
    scale = w.alpha / w.rank

    def loss(tr):
        return cross_entropy(bert_lora_logits(base, tr[:-2], tr[-2:], ids, mask, cfg, scale), y)

    step = grad_and_value(loss)
    return {"torch": Runner(lambda: step(trainable), _block, _to_numpy)}


BUILDERS = {("mlp", "maml"): _mlp_maml, ("mlp", "reptile"): _mlp_reptile,
            ("conv4", "maml"): _conv4_maml, ("conv4", "protonet"): _conv4_protonet,
            ("bert", "lora"): _bert_lora}


def build(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    return BUILDERS[(w.model, w.kind)](w, data)


def reset_peak() -> None:
    pass


def framework_peak_mb() -> dict:
    return {}
