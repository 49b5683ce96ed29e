"""The workloads in JAX: ``jax.jit`` of ``value_and_grad`` over ``vmap`` of a per-task loss,
the inner loop unrolled in Python with ``jax.grad`` (second order by nesting); W7 is
``jit(value_and_grad)`` of a BERT + LoRA loss written in ``jax.numpy`` (the frozen weights an
argument of the jitted function, not baked-in constants).

Same math, shapes, float32 data and initial parameters as ``metafn_impl``. Timings are of the
jitted function after it was compiled (steady state)."""

from __future__ import annotations

import math
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


def reptile_adapt(params, x, y, steps, lr):
    """Reptile's full-batch inner loop: the adapted weights and the last step's loss before its
    update (``metafn.outer.reptile_grad`` with ``inner_batches=1``)."""
    loss = mse_loss(params, x, y)
    for _ in range(steps):
        loss, g = jax.value_and_grad(mse_loss)(params, x, y)
        params = [p - lr * d for p, d in zip(params, g)]
    return params, loss


def _block(out) -> None:
    jax.block_until_ready(out)


def _to_numpy(out) -> tuple[float, list[np.ndarray]]:
    return float(out[0]), [np.asarray(g) for g in out[1]]


# (jitted step, its arguments) of every built workload, for cost_analysis_flops
_BUILT: dict[str, tuple] = {}


def _jit_runner(w: Workload, fn, args: tuple) -> dict[str, Runner]:
    """The ``jax`` runner of ``jax.jit(fn)(*args)``, remembered for :func:`cost_analysis_flops`."""
    step = jax.jit(fn)
    _BUILT[w.id] = (step, args)
    return {"jax": Runner(lambda: step(*args), _block, _to_numpy)}


def _mlp_maml(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    flat, ep = split_data(data)
    params = [jnp.asarray(p) for p in flat]
    args = [jnp.asarray(ep[k]) for k in ("sx", "sy", "qx", "qy")]

    def task_loss(p, sx, sy, qx, qy):
        return mse_loss(adapt(p, sx, sy, w.steps, w.inner_lr, w.first_order), qx, qy)

    def meta_loss(p, sx, sy, qx, qy):
        return jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy))

    return _jit_runner(w, jax.value_and_grad(meta_loss), (params, *args))


def _mlp_reptile(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    flat, ep = split_data(data)
    params = [jnp.asarray(p) for p in flat]
    args = [jnp.asarray(ep[k]) for k in ("sx", "sy", "qx", "qy")]

    def outer(p, sx, sy, qx, qy):
        x = jnp.concatenate([sx, qx], axis=1)
        y = jnp.concatenate([sy, qy], axis=1)
        adapted, losses = jax.vmap(lambda xx, yy: reptile_adapt(p, xx, yy, w.steps, w.inner_lr))(x, y)
        loss = jnp.mean(losses)
        g = [a - jnp.mean(t, axis=0) for a, t in zip(p, adapted)]
        new = [a - w.outer_lr * d for a, d in zip(p, g)]
        return loss, g, new

    return _jit_runner(w, outer, (params, *args))


# --------------------------------------------------------------------------------- conv4
# Same model as metafn.nn.conv4: NHWC, kernels (C_out, 3, 3, C_in) ("OHWI"), no conv bias,
# one-pass batch norm with the batch's statistics, ReLU, 2x2 max pool with odd sizes floored.

BN_EPS = 1e-5


def batch_norm(x, gamma, beta, axes=(0, 1, 2)):
    mu = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(x), axis=axes, keepdims=True) - jnp.square(mu), 0.0)
    scale = gamma * jax.lax.rsqrt(var + BN_EPS)
    return x * scale + (beta - mu * scale)


def max_pool_2x2(x):
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    x = x[:, : 2 * h2, : 2 * w2, :]
    return jnp.max(x.reshape(n, h2, 2, w2, 2, c), axis=(2, 4))


def conv4_embed(params, x):
    for i in range(4):
        w, g, b = params[3 * i: 3 * i + 3]
        x = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "OHWI", "NHWC"))
        x = max_pool_2x2(jnp.maximum(batch_norm(x, g, b), 0.0))
    return x.reshape(x.shape[0], -1)


def cross_entropy(logits, y):
    picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)


def conv4_loss(params, x, y):
    logits = conv4_embed(params[:12], x) @ params[12] + params[13]
    return cross_entropy(logits, y)


def _conv4_maml(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    flat, ep = split_data(data)
    params = [jnp.asarray(p) for p in flat]
    args = [jnp.asarray(ep[k]) for k in ("sx", "sy", "qx", "qy")]

    def task_loss(p, sx, sy, qx, qy):
        for _ in range(w.steps):
            g = jax.grad(conv4_loss)(p, sx, sy)
            if w.first_order:
                g = jax.lax.stop_gradient(g)
            p = [a - w.inner_lr * d for a, d in zip(p, g)]
        return conv4_loss(p, qx, qy)

    def meta_loss(p, sx, sy, qx, qy):
        return jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy))

    return _jit_runner(w, jax.value_and_grad(meta_loss), (params, *args))


def protonet_logits(s, sy, q, n_way):
    onehot = (sy[:, None] == jnp.arange(n_way)[None, :]).astype(s.dtype)
    protos = (onehot.T @ s) / jnp.maximum(jnp.sum(onehot, axis=0), 1.0)[:, None]
    sq = (jnp.sum(q * q, axis=-1, keepdims=True) - 2.0 * q @ protos.T
          + jnp.sum(protos * protos, axis=-1)[None, :])
    return -sq


def _conv4_protonet(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    flat, ep = split_data(data)
    params = [jnp.asarray(p) for p in flat]
    args = [jnp.asarray(ep[k]) for k in ("sx", "sy", "qx", "qy")]

    def loss(p, sx, sy, qx, qy):  # as metafn.outer.protonet_outer: one embedding call
        t, ns, nq = sx.shape[0], sx.shape[1], qx.shape[1]
        emb = conv4_embed(p, jnp.concatenate([sx, qx], axis=1).reshape(-1, *sx.shape[2:]))
        emb = emb.reshape(t, ns + nq, -1)
        logits = jax.vmap(lambda a, b, c: protonet_logits(a, b, c, w.n_way))(
            emb[:, :ns], sy, emb[:, ns:])
        return cross_entropy(logits, qy)

    return _jit_runner(w, jax.value_and_grad(loss), (params, *args))


# ---------------------------------------------------------------------------------- BERT
# all-MiniLM-L6-v2 (post-LN BERT) written out in jax.numpy from the Hugging Face state dict:
# word + position + token-type-0 embeddings, LayerNorm (eps from config.json), per layer
# 12-head softmax attention with the padding keys masked out, exact (erf) GELU; LoRA
# ``x W + b + s (x A) B`` on query and value; mean pooling over real tokens, linear head.


def layer_norm(x, g, b, eps):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * g + b


def bert_lora_logits(base, lora, head, ids, mask, cfg, scale):
    """Head logits ``(B, n_way)``; ``base`` the HF state dict (jnp arrays), ``lora`` the flat
    list ``[qA, qB, vA, vB] x layers``, ``head = [w, b]``."""
    eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    bsz, n = ids.shape
    d = cfg["hidden_size"]
    dh = d // heads
    x = (base["embeddings.word_embeddings.weight"][ids]
         + base["embeddings.position_embeddings.weight"][:n]
         + base["embeddings.token_type_embeddings.weight"][0])
    h = layer_norm(x, base["embeddings.LayerNorm.weight"], base["embeddings.LayerNorm.bias"], eps)
    keep = (mask > 0)[:, None, None, :]

    def dense(name, x):
        return x @ base[name + ".weight"].T + base[name + ".bias"]

    def split(t):
        return t.reshape(bsz, n, heads, dh).transpose(0, 2, 1, 3)

    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        qa, qb, va, vb = lora[4 * i: 4 * i + 4]
        q = dense(p + "attention.self.query", h) + scale * ((h @ qa) @ qb)
        k = dense(p + "attention.self.key", h)
        v = dense(p + "attention.self.value", h) + scale * ((h @ va) @ vb)
        s = jnp.einsum("bhqd,bhkd->bhqk", split(q), split(k)) / math.sqrt(dh)
        s = jnp.where(keep, s, -jnp.inf)
        ctx = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), split(v))
        ctx = ctx.transpose(0, 2, 1, 3).reshape(bsz, n, d)
        a = layer_norm(dense(p + "attention.output.dense", ctx) + h,
                       base[p + "attention.output.LayerNorm.weight"],
                       base[p + "attention.output.LayerNorm.bias"], eps)
        f = jax.nn.gelu(dense(p + "intermediate.dense", a), approximate=False)
        h = layer_norm(dense(p + "output.dense", f) + a, base[p + "output.LayerNorm.weight"],
                       base[p + "output.LayerNorm.bias"], eps)
    m = mask.astype(h.dtype)[..., None]
    pooled = jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    return pooled @ head[0] + head[1]


def _bert_lora(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    from bench.peers.workloads import load_minilm_np, minilm_config

    cfg = minilm_config()
    base = {k: jnp.asarray(v) for k, v in load_minilm_np().items()}
    flat, inp = split_data(data)
    trainable = [jnp.asarray(p) for p in flat]
    ids, mask, y = (jnp.asarray(inp[k]) for k in ("ids", "mask", "y"))
    scale = w.alpha / w.rank

    def loss(tr, base, ids, mask, y):
        logits = bert_lora_logits(base, tr[:-2], tr[-2:], ids, mask, cfg, scale)
        return cross_entropy(logits, y)

    return _jit_runner(w, jax.value_and_grad(loss), (trainable, base, ids, mask, y))


BUILDERS = {("mlp", "maml"): _mlp_maml, ("mlp", "reptile"): _mlp_reptile,
            ("conv4", "maml"): _conv4_maml, ("conv4", "protonet"): _conv4_protonet,
            ("bert", "lora"): _bert_lora}


def build(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    return BUILDERS[(w.model, w.kind)](w, data)


def cost_analysis_flops(w: Workload, data: dict[str, np.ndarray]) -> float | None:
    """XLA's own FLOP count of the built step (``jit(...).lower(*args).cost_analysis()``: the
    HLO before XLA's optimizations, so no extra compilation), an instrumented cross-check of the
    analytic count; None where unavailable."""
    if w.id not in _BUILT:
        return None
    step, args = _BUILT[w.id]
    try:
        ca = step.lower(*args).cost_analysis()
        if isinstance(ca, list):
            ca = ca[0]
        return float(ca["flops"])
    except Exception:  # noqa: BLE001  (a cross-check only)
        return None


def reset_peak() -> None:
    pass


def framework_peak_mb() -> dict:
    return {}
