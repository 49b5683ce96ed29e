"""The workloads in metafn, through its public functions only.

Variants: ``metafn`` is the step as metafn runs it for speed, compiled or not by model
(``bench.peers.variants.HEADLINE``: the whole call -- loss, gradient and, for Reptile, the outer
update -- in ``mx.compile`` for the MLP and BERT, the counterpart of the JAX peer's ``jax.jit``;
uncompiled for conv4, as its configs train). The other setting is reported beside it as
``metafn-eager`` or ``metafn-compiled``; the uncompiled call is the reference of the
correctness check. ``metafn-streams2`` (MAML / Reptile) splits the
task batch in two halves, each half's headline step evaluated on its own MLX CPU stream --
every stream runs on its own thread, so the halves use both cores -- and averages the results
by task count (the same mean).

``import metafn`` must come before any mlx import (fast BLAS preload, see metafn/_blas.py); the
worker imports this module first in a fresh process.
"""

from __future__ import annotations

import os
import platform

import metafn  # noqa: F401  (before mlx: preloads the fast BLAS)
import mlx.core as mx
import numpy as np

from bench.peers.runner import Runner
from bench.peers.variants import HEADLINE
from bench.peers.workloads import Workload, split_data
from metafn import _blas
from metafn.losses import mse_loss
from metafn.nn import mlp_apply
from metafn.outer import maml_outer, reptile_grad
from metafn.tasks.episode import Episode
from metafn.tree import tree_map

NAME = "metafn"
VARIANTS = ("metafn", "metafn-eager", "metafn-compiled", "metafn-streams2")
_STREAMS: list = []


def cpu_streams(n: int) -> list:
    """``n`` extra MLX CPU streams (each runs its ops on its own thread), created once."""
    while len(_STREAMS) < n:
        _STREAMS.append(mx.new_stream(mx.cpu))
    return _STREAMS[:n]


def split_over_streams(step, n: int):
    """``step(p, sx, sy, qx, qy) -> tree`` whose leaves are means over tasks, run on ``n``
    contiguous chunks of the task axis, each on its own CPU stream; the chunk results are
    combined weighted by chunk size, which is the exact mean over all tasks."""
    streams = cpu_streams(n)

    def fn(p, sx, sy, qx, qy):
        t = sx.shape[0]
        cuts = [round(i * t / n) for i in range(n + 1)]
        outs = []
        for i, s in enumerate(streams):
            a, b = cuts[i], cuts[i + 1]
            with mx.stream(s):
                outs.append(step(p, sx[a:b], sy[a:b], qx[a:b], qy[a:b]))
        wts = [(cuts[i + 1] - cuts[i]) / t for i in range(n)]
        return tree_map(lambda *xs: sum(wi * x for wi, x in zip(wts, xs)), *outs)

    return fn


def setup(threads: int | None) -> None:
    """Threads of the BLAS are set through OPENBLAS_NUM_THREADS / MKL_NUM_THREADS in the
    environment before this process started (the orchestrator does it)."""


def _openblas_info(path: str | None) -> dict:
    """OpenBLAS's own configuration string and thread count, when the loaded BLAS is OpenBLAS."""
    if not path:
        return {}
    import ctypes

    try:
        lib = ctypes.CDLL(path)
        lib.openblas_get_config.restype = ctypes.c_char_p
        return {"openblas_config": lib.openblas_get_config().decode(),
                "openblas_num_threads": lib.openblas_get_num_threads()}
    except (OSError, AttributeError):
        return {}


def info() -> dict:
    st = _blas.status()
    return {
        "framework": "metafn (MLX)",
        "versions": {"metafn": metafn.__version__, "mlx": mx.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "blas": st.library, "blas_reason": st.reason,
        "blas_libraries_mapped": _blas.loaded_blas_libraries(),
        "threads": {**{k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                                       "OMP_NUM_THREADS")},
                    **_openblas_info(st.library)},
        "memory_method": "peak RSS (getrusage ru_maxrss, HWM reset) minus RSS before build; "
                         "mlx_peak_mb = mx.get_peak_memory() (MLX allocator's array peak)",
    }


def gemm(n: int):
    """A callable computing one blocked ``n x n`` float32 matmul."""
    a = mx.random.normal((n, n), key=mx.random.key(0))
    b = mx.random.normal((n, n), key=mx.random.key(1))
    mx.eval(a, b)
    return lambda: mx.eval(a @ b)


def _mlp_params(flat: list[np.ndarray]) -> list[dict[str, mx.array]]:
    return [{"w": mx.array(flat[i]), "b": mx.array(flat[i + 1])} for i in range(0, len(flat), 2)]


def _mlp_leaves(tree: list[dict[str, mx.array]]) -> list[np.ndarray]:
    return [np.array(leaf) for layer in tree for leaf in (layer["w"], layer["b"])]


def _block(out) -> None:
    mx.eval(out)


def _to_numpy(out) -> tuple[float, list[np.ndarray]]:
    return float(out[0].item()), _mlp_leaves(out[1])


def _variants(step_fn, args: tuple, to_numpy, headline: str, split_streams: bool = False,
              note: str = "") -> dict[str, Runner]:
    """Runners of ``step_fn(*args)``: ``metafn`` (the ``headline`` setting, ``"compiled"`` or
    ``"eager"``), the other setting as ``metafn-eager`` / ``metafn-compiled`` and, with
    ``split_streams``, ``metafn-streams2`` (the headline step with its task batch split over two
    CPU streams, :func:`split_over_streams`)."""
    compiled = mx.compile(step_fn)
    fns = {"compiled": compiled, "eager": step_fn}
    other = "eager" if headline == "compiled" else "compiled"
    out = {"metafn": Runner(lambda: fns[headline](*args), _block, to_numpy, note),
           f"metafn-{other}": Runner(lambda: fns[other](*args), _block, to_numpy, note)}
    if split_streams:
        split = split_over_streams(fns[headline], 2)
        out["metafn-streams2"] = Runner(lambda: split(*args), _block, to_numpy, note)
    return out


def _mlp_maml(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    flat, ep_np = split_data(data)
    params = _mlp_params(flat)
    ep = Episode(*(mx.array(ep_np[k]) for k in ("sx", "sy", "qx", "qy")))
    loss_fn = mse_loss(mlp_apply)

    def step_fn(p, sx, sy, qx, qy):
        return maml_outer(loss_fn, p, Episode(sx, sy, qx, qy), w.inner_lr, w.steps,
                          first_order=w.first_order)

    return _variants(step_fn, (params, *ep), _to_numpy, HEADLINE["mlp"], split_streams=True)


def _mlp_reptile(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    flat, ep_np = split_data(data)
    params = _mlp_params(flat)
    ep = Episode(*(mx.array(ep_np[k]) for k in ("sx", "sy", "qx", "qy")))
    loss_fn = mse_loss(mlp_apply)

    def pair(p, sx, sy, qx, qy):
        return reptile_grad(loss_fn, p, Episode(sx, sy, qx, qy), w.inner_lr, w.steps)

    def with_update(pair_fn):
        def step_fn(p, sx, sy, qx, qy):
            loss, g = pair_fn(p, sx, sy, qx, qy)
            new = tree_map(lambda a, d: a - w.outer_lr * d, p, g)  # sgd(beta) == reptile_outer
            return loss, g, new

        return step_fn

    out = _variants(with_update(pair), (params, *ep), _to_numpy, HEADLINE["mlp"])
    # streams: the pair (loss, pseudo-gradient) per half of the tasks, one update after
    assert HEADLINE["mlp"] == "compiled"
    split = with_update(split_over_streams(mx.compile(pair), 2))
    args = (params, *ep)
    out["metafn-streams2"] = Runner(lambda: split(*args), _block, _to_numpy)
    return out


def _conv4_params(flat: list[np.ndarray]) -> dict:
    blocks = [{"w": mx.array(flat[i]), "gamma": mx.array(flat[i + 1]), "beta": mx.array(flat[i + 2])}
              for i in range(0, 12, 3)]
    tree: dict = {"blocks": blocks}
    if len(flat) > 12:
        tree["head"] = {"w": mx.array(flat[12]), "b": mx.array(flat[13])}
    return tree


def _conv4_leaves(tree: dict) -> list[np.ndarray]:
    out = [np.array(b[k]) for b in tree["blocks"] for k in ("w", "gamma", "beta")]
    if "head" in tree:
        out += [np.array(tree["head"]["w"]), np.array(tree["head"]["b"])]
    return out


def _conv4_to_numpy(out) -> tuple[float, list[np.ndarray]]:
    return float(out[0].item()), _conv4_leaves(out[1])


def _conv4_maml(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    from metafn.nn.conv4 import conv4_batched_loss

    flat, ep_np = split_data(data)
    params = _conv4_params(flat)
    ep = Episode(*(mx.array(ep_np[k]) for k in ("sx", "sy", "qx", "qy")))
    loss_fn = conv4_batched_loss()  # default task method

    def step_fn(p, sx, sy, qx, qy):
        return maml_outer(loss_fn, p, Episode(sx, sy, qx, qy), w.inner_lr, w.steps,
                          first_order=w.first_order)

    return _variants(step_fn, (params, *ep), _conv4_to_numpy, HEADLINE["conv4"],
                     split_streams=True)


def _conv4_protonet(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    from metafn.nn.conv4 import conv4_embed
    from metafn.outer import protonet_outer

    flat, ep_np = split_data(data)
    params = _conv4_params(flat)
    ep = Episode(*(mx.array(ep_np[k]) for k in ("sx", "sy", "qx", "qy")))

    def step_fn(p, sx, sy, qx, qy):
        loss, g, _acc = protonet_outer(conv4_embed, p, Episode(sx, sy, qx, qy), w.n_way)
        return loss, g

    note = ""
    try:
        mx.eval(step_fn(params, *ep))
    except ValueError as e:  # metafn.outer.protonet_outer passes n_way (an int) through mx.vmap
        note = (f"protonet_outer raised {e!s:.60}; timed the same computation with n_way closed "
                "over (bench/peers/metafn_impl.py:_protonet_step)")
        step_fn = _protonet_step(w.n_way)

    return _variants(step_fn, (params, *ep), _conv4_to_numpy, HEADLINE["conv4"], note=note)


def _protonet_step(n_way: int):
    """``metafn.outer.protonet_outer`` (loss and gradient) with ``n_way`` closed over instead of
    passed through ``mx.vmap`` -- the fix proposed for metafn/outer.py."""
    from metafn.losses import cross_entropy
    from metafn.nn.conv4 import conv4_embed
    from metafn.outer import protonet_logits

    def step_fn(p, sx, sy, qx, qy):
        tasks, ns, nq = sx.shape[0], sx.shape[1], qx.shape[1]

        def loss(p):
            emb = conv4_embed(p, mx.concatenate([sx, qx], axis=1).reshape(-1, *sx.shape[2:]))
            emb = emb.reshape(tasks, ns + nq, -1)
            logits = mx.vmap(lambda s, y, q: protonet_logits(s, y, q, n_way))(
                emb[:, :ns], sy, emb[:, ns:])
            return cross_entropy(logits, qy)

        return mx.value_and_grad(loss)(p)

    return step_fn


def _lora_tree(w: Workload, flat: list[np.ndarray], layers: int) -> dict:
    """``{"lora": adapter, "head": {"w", "b"}}`` from the canonical leaves (see workloads)."""
    adapter, i = {}, 0
    for layer in range(layers):
        for module in ("query", "value"):
            adapter[f"encoder.layer.{layer}.attention.self.{module}"] = {
                "a": mx.array(flat[i]), "b": mx.array(flat[i + 1])}
            i += 2
    return {"lora": adapter, "head": {"w": mx.array(flat[i]), "b": mx.array(flat[i + 1])}}


def _lora_leaves(tree: dict) -> list[np.ndarray]:
    out = [np.array(node[k]) for node in tree["lora"].values() for k in ("a", "b")]
    return out + [np.array(tree["head"]["w"]), np.array(tree["head"]["b"])]


def _lora_to_numpy(out) -> tuple[float, list[np.ndarray]]:
    return float(out[0].item()), _lora_leaves(out[1])


def _bert_lora(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    """W7: ``mx.value_and_grad`` wrt ``{"lora", "head"}`` of the cross-entropy of a linear head
    on :func:`metafn.nn.bert.mean_pool` of :func:`metafn.nn.bert.bert_apply` run through
    :func:`metafn.peft.lora_apply` (unmerged branch ``x W + s (x A) B``); the pretrained base
    (``bert_load`` of the same directory) is a constant closed over by the step."""
    from bench.peers.workloads import minilm_dir
    from metafn import peft
    from metafn.losses import cross_entropy
    from metafn.nn import bert

    config, base, _ = bert.bert_load(minilm_dir(), with_tokenizer=False)
    flat, inp = split_data(data)
    trainable = _lora_tree(w, flat, config.num_hidden_layers)
    ids, mask, y = (mx.array(inp[k]) for k in ("ids", "mask", "y"))
    lcfg = peft.LoraConfig(r=w.rank, alpha=w.alpha, target_modules=("query", "value"))

    def loss(tr, ids, mask, y):
        h = peft.lora_apply(base, tr["lora"], lcfg, bert.bert_apply, config, ids, mask,
                            unmerged=True)
        logits = bert.mean_pool(h, mask) @ tr["head"]["w"] + tr["head"]["b"]
        return cross_entropy(logits, y)

    def step_fn(tr, ids, mask, y):
        return mx.value_and_grad(loss)(tr, ids, mask, y)

    return _variants(step_fn, (trainable, ids, mask, y), _lora_to_numpy, HEADLINE["bert"])


BUILDERS = {("mlp", "maml"): _mlp_maml, ("mlp", "reptile"): _mlp_reptile,
            ("conv4", "maml"): _conv4_maml, ("conv4", "protonet"): _conv4_protonet,
            ("bert", "lora"): _bert_lora}


def build(w: Workload, data: dict[str, np.ndarray]) -> dict[str, Runner]:
    return BUILDERS[(w.model, w.kind)](w, data)


def reset_peak() -> None:
    mx.reset_peak_memory()


def framework_peak_mb() -> dict:
    return {"mlx_peak_mb": mx.get_peak_memory() / 2**20}
