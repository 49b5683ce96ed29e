"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning")
as pure functions.

Each target's update is in SVD form, ``Delta W = s * P diag(E) Q`` with ``P (d_in, r)``,
``E (r,)``, ``Q (r, d_out)`` and ``s = alpha / init_r``; ``E = 0`` at init (identity), P and Q
~ N(0, init_std^2). Ranks are pruned during training by zeroing entries of ``E`` (a *triplet*
``(P[:, i], E[i], Q[i, :])``), keeping a global budget of triplets over all targets.

Importance (sensitivity smoothed by two EMAs), per element of ``theta`` in P, E, Q:

    I_t = |theta * g|,  Ibar_t = b1 Ibar_{t-1} + (1 - b1) I_t,
    U_t = b2 U_{t-1} + (1 - b2) |I_t - Ibar_t|,        score = Ibar_t * U_t
    triplet score S_i = score(E_i) + mean_j score(P_ji) + mean_k score(Q_ik)

Budget schedule (total triplets; ``n`` targets; ``b0 = init_r n``, ``bT = target_r n``;
``t_end = total_step - tfinal``):

    b(t) = b0                                                  t <= tinit
    b(t) = bT + (b0 - bT) (1 - (t - tinit)/(t_end - tinit))^3  tinit < t < t_end
    b(t) = bT                                                  t >= t_end

:func:`adalora_update` reallocates every ``delta_t`` steps in the middle phase, once at
``t_end`` (then the ranks are frozen), and whenever the kept triplets exceed ``b(t)``; after
every call the number of nonzero ``E`` entries is at most ``b(t)`` (the budget is always
respected). The paper's orthogonality regularizer is :func:`adalora_orth_reg`
(add ``orth_reg_weight *`` it to the loss).

Training loop sketch::

    ada = adalora_init(key, params, cfg); st = adalora_init_state(ada)
    for t in range(1, cfg.total_step + 1):
        loss, g = mx.value_and_grad(loss_fn)(ada)        # loss_fn uses adalora_apply
        ada, opt = optimizer_update(ada, g, opt)
        ada, st, budget = adalora_update(ada, st, g, t, cfg)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import mlx.core as mx
import numpy as np

from metafn.peft.lora import (
    Adapter, _check_adapter, _check_dropout, _check_rank, _module_keys, _norm_targets,
    delta_to_weight, dropout_rows, map_modules, select_targets,
)
from metafn.tree import PyTree, tree_map

__all__ = [
    "AdaLoraConfig", "AdaLoraState", "adalora_init", "adalora_init_state", "adalora_budget",
    "adalora_importance", "adalora_scores", "adalora_allocate", "adalora_mask",
    "adalora_update", "adalora_orth_reg", "adalora_merge", "adalora_apply", "adalora_ranks",
]


@dataclass(frozen=True)
class AdaLoraConfig:
    """AdaLoRA hyperparameters (names as in Hugging Face peft's ``AdaLoraConfig``).

    init_r / target_r: initial and final average rank per target (``target_r <= init_r``).
    alpha: the update is scaled by ``alpha / init_r``. dropout, target_modules: as in LoRA.
    total_step: training steps; tinit / tfinal: warm-up and final fine-tuning steps
    (``tinit + tfinal < total_step``); delta_t: steps between reallocations.
    beta1 / beta2: EMA factors of the importance and its uncertainty.
    orth_reg_weight: weight of :func:`adalora_orth_reg` (for the caller's loss).
    init_std: standard deviation of the initial P and Q.
    """

    total_step: int = 1000
    init_r: int = 12
    target_r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = ("query", "value")
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        _check_rank(self.init_r, "init_r")
        _check_rank(self.target_r, "target_r")
        if self.target_r > self.init_r:
            raise ValueError(f"target_r: {self.target_r} exceeds init_r={self.init_r}")
        for name in ("total_step", "delta_t"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {v!r}")
        if self.tinit + self.tfinal >= self.total_step:
            raise ValueError(f"total_step: must exceed tinit + tfinal = {self.tinit + self.tfinal}, "
                             f"got {self.total_step}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name}: expected a value in [0, 1), got {v!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha: expected a positive finite number, got {self.alpha!r}")
        _check_dropout(self.dropout)
        object.__setattr__(self, "target_modules", _norm_targets(self.target_modules))

    @property
    def scale(self) -> float:
        """``alpha / init_r``."""
        return self.alpha / self.init_r


class AdaLoraState(NamedTuple):
    """Importance EMAs (trees shaped like the adapter) and the current rank masks
    ``{module: (init_r,) float, 1 = kept}``."""

    ipt: Adapter
    unc: Adapter
    mask: dict[str, mx.array]


def adalora_init(key: mx.array, params: PyTree, config: AdaLoraConfig) -> Adapter:
    """``{name: {"p": (d_in, r), "e": zeros (r,), "q": (r, d_out)}}`` for every target."""
    if not isinstance(config, AdaLoraConfig):
        raise TypeError(f"config: expected an AdaLoraConfig, got {type(config).__name__}")
    targets = select_targets(params, config.target_modules, config.init_r)
    keys = _module_keys(key, list(targets))
    out: Adapter = {}
    for name, info in targets.items():
        kp, kq = mx.random.split(keys[name], 2)
        r = config.init_r
        out[name] = {
            "p": config.init_std * mx.random.normal((info.d_in, r), key=kp),
            "e": mx.zeros((r,)),
            "q": config.init_std * mx.random.normal((r, info.d_out), key=kq),
        }
    return out


def adalora_init_state(adapter: Adapter) -> AdaLoraState:
    """Zero importance EMAs and all-ones rank masks."""
    _check_adapter(adapter, "adapter", ("p", "e", "q"))
    zeros = tree_map(mx.zeros_like, adapter)
    return AdaLoraState(zeros, tree_map(mx.zeros_like, adapter),
                        {n: mx.ones_like(v["e"]) for n, v in adapter.items()})


def adalora_budget(step: int, config: AdaLoraConfig, n_modules: int) -> tuple[int, bool]:
    """``(b(step), reallocate_now)`` for the cubic schedule in the module docstring."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step: expected a non-negative int, got {step!r}")
    if not isinstance(n_modules, int) or n_modules < 1:
        raise ValueError(f"n_modules: expected a positive int, got {n_modules!r}")
    b0, bt = config.init_r * n_modules, config.target_r * n_modules
    t_end = config.total_step - config.tfinal
    if step <= config.tinit:
        return b0, False
    if step >= t_end:
        return bt, step == t_end
    frac = 1.0 - (step - config.tinit) / (t_end - config.tinit)
    return int(bt + (b0 - bt) * frac ** 3), (step - config.tinit) % config.delta_t == 0


def adalora_importance(
    state: AdaLoraState, adapter: Adapter, grads: Adapter, config: AdaLoraConfig
) -> AdaLoraState:
    """One EMA update of the importance ``Ibar`` and uncertainty ``U`` (module docstring)."""
    b1, b2 = config.beta1, config.beta2
    ipt_now = tree_map(lambda p, g: mx.abs(p * g), adapter, grads)
    ipt = tree_map(lambda e, i: b1 * e + (1 - b1) * i, state.ipt, ipt_now)
    unc = tree_map(lambda u, i, e: b2 * u + (1 - b2) * mx.abs(i - e), state.unc, ipt_now, ipt)
    return AdaLoraState(ipt, unc, state.mask)


def adalora_scores(state: AdaLoraState) -> dict[str, mx.array]:
    """Triplet scores ``{module: (r,)}``: ``s(E_i) + mean_j s(P_ji) + mean_k s(Q_ik)``."""
    out = {}
    for n in state.ipt:
        s = {k: state.ipt[n][k] * state.unc[n][k] for k in ("p", "e", "q")}
        out[n] = s["e"] + mx.mean(s["p"], axis=0) + mx.mean(s["q"], axis=1)
    return out


def adalora_allocate(scores: dict[str, mx.array], budget: int) -> dict[str, mx.array]:
    """Rank masks keeping the ``budget`` highest-scoring triplets over all modules (ties go to
    the earlier module / index); all ones if ``budget`` >= the number of triplets."""
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise ValueError(f"budget: expected a non-negative int, got {budget!r}")
    names = list(scores)
    flat = np.concatenate([np.asarray(scores[n], dtype=np.float64).ravel() for n in names])
    keep = np.zeros(flat.shape[0], dtype=np.float32)
    keep[np.argsort(-flat, kind="stable")[: min(budget, flat.shape[0])]] = 1.0
    out, start = {}, 0
    for n in names:
        r = scores[n].shape[0]
        out[n] = mx.array(keep[start:start + r])
        start += r
    return out


def adalora_mask(adapter: Adapter, mask: dict[str, mx.array]) -> Adapter:
    """The adapter with ``E <- E * mask`` (pruned triplets exactly zero)."""
    return {n: {**v, "e": v["e"] * mask[n]} for n, v in adapter.items()}


def adalora_update(
    adapter: Adapter, state: AdaLoraState, grads: Adapter, step: int, config: AdaLoraConfig
) -> tuple[Adapter, AdaLoraState, int]:
    """After an optimizer step: update importance (until ``t_end``), reallocate ranks when the
    schedule says so or the budget shrank below the kept count, and mask ``E``.

    Returns ``(adapter, state, budget)``; the returned adapter has at most ``budget``
    nonzero ``E`` entries in total.
    """
    _check_adapter(adapter, "adapter", ("p", "e", "q"))
    budget, now = adalora_budget(step, config, len(adapter))
    t_end = config.total_step - config.tfinal
    if step < t_end:
        state = adalora_importance(state, adapter, grads, config)
    kept = int(sum(int(mx.sum(m).item()) for m in state.mask.values()))
    if now or kept > budget:
        state = AdaLoraState(state.ipt, state.unc, adalora_allocate(adalora_scores(state), budget))
    return adalora_mask(adapter, state.mask), state, budget


def adalora_orth_reg(adapter: Adapter) -> mx.array:
    """Mean over all P and Q of ``||P^T P - I||_F`` and ``||Q Q^T - I||_F`` (as peft)."""
    _check_adapter(adapter, "adapter", ("p", "e", "q"))
    terms = []
    for v in adapter.values():
        r = v["e"].shape[0]
        eye = mx.eye(r)
        terms.append(mx.sqrt(mx.sum(mx.square(v["p"].T @ v["p"] - eye))))
        terms.append(mx.sqrt(mx.sum(mx.square(v["q"] @ v["q"].T - eye))))
    return sum(terms[1:], terms[0]) / len(terms)


def adalora_merge(
    params: PyTree, adapter: Adapter, config: AdaLoraConfig, key: mx.array | None = None
) -> PyTree:
    """Base parameters with each target weight ``W + s * P diag(E) Q`` (``key``: dropout on
    P's rows, as LoRA's merged path)."""
    _check_adapter(adapter, "adapter", ("p", "e", "q"))
    keys = _module_keys(key if config.dropout > 0 else None, list(adapter))

    def make(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        ad = adapter[name]

        def fn(node: dict[str, Any]) -> dict[str, Any]:
            w = node["w"]
            p = dropout_rows(keys[name], ad["p"], config.dropout)
            delta = config.scale * ((p * ad["e"]) @ ad["q"])
            return {**node, "w": w + delta_to_weight(delta, tuple(w.shape)).astype(w.dtype)}

        return fn

    return map_modules(params, {n: make(n) for n in adapter})


def adalora_apply(
    params: PyTree,
    adapter: Adapter,
    config: AdaLoraConfig,
    apply_fn: Callable[..., Any],
    *args: Any,
    key: mx.array | None = None,
    **kwargs: Any,
) -> Any:
    """``apply_fn(adalora_merge(params, adapter, config, key), *args, **kwargs)``."""
    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a callable (params, *args) -> output, got {apply_fn!r}")
    return apply_fn(adalora_merge(params, adapter, config, key), *args, **kwargs)


def adalora_ranks(adapter: Adapter) -> dict[str, int]:
    """Current rank of each target: the number of nonzero ``E`` entries."""
    return {n: int(mx.sum(v["e"] != 0).item()) for n, v in adapter.items()}
