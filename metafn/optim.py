"""Pure optimizers for the outer loop, optax style.

An optimizer is a ``GradientTransformation(init, update)``:

    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    params = apply_updates(params, updates)          # params + updates

State is a NamedTuple of pytrees and scalar arrays; nothing is hidden in an object, so the whole
training state checkpoints and resumes exactly and a meta-step compiles with ``mx.compile``.
Learning rates are a float or a schedule ``step -> lr`` (an ``mx.array`` step count).
"""


import math
from typing import Callable, NamedTuple

import mlx.core as mx

from metafn.tree import PyTree, tree_map, tree_norm, tree_zeros_like

__all__ = [
    "GradientTransformation", "Schedule", "sgd", "adam", "clip_by_global_norm", "chain",
    "apply_updates", "constant_schedule", "cosine_decay_schedule", "warmup_cosine_schedule",
    "EmptyState", "ScaleByAdamState", "SgdState", "adam_direction",
]

Schedule = Callable[[mx.array], mx.array]
InitFn = Callable[[PyTree], PyTree]
UpdateFn = Callable[[PyTree, PyTree, PyTree], tuple[PyTree, PyTree]]


class GradientTransformation(NamedTuple):
    """A pair of pure functions ``init(params) -> state`` and
    ``update(grads, state, params) -> (updates, state)``."""

    init: InitFn
    update: UpdateFn


class EmptyState(NamedTuple):
    """State of a stateless transformation."""


class SgdState(NamedTuple):
    """Step count (for schedules) and optional momentum buffer."""

    count: mx.array
    momentum: PyTree


class ScaleByAdamState(NamedTuple):
    """Adam's step count and first / second moment estimates."""

    count: mx.array
    mu: PyTree
    nu: PyTree


def _check_rate(name: str, value: float | Schedule) -> Schedule:
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float or a schedule step -> lr, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite non-negative learning rate, got {value}")
    return constant_schedule(float(value))


def constant_schedule(value: float) -> Schedule:
    """``lr(step) = value``."""
    return lambda step: mx.array(value, dtype=mx.float32)


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """``lr(t) = init * ((1 - alpha) * 0.5 * (1 + cos(pi * min(t, T) / T)) + alpha)``."""
    if decay_steps < 1:
        raise ValueError(f"decay_steps: expected >= 1, got {decay_steps}")

    def schedule(step: mx.array) -> mx.array:
        frac = mx.minimum(step.astype(mx.float32), decay_steps) / decay_steps
        return init_value * ((1 - alpha) * 0.5 * (1 + mx.cos(math.pi * frac)) + alpha)

    return schedule


def warmup_cosine_schedule(
    peak_value: float, warmup_steps: int, decay_steps: int, end_value: float = 0.0
) -> Schedule:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine decay to ``end``."""
    if warmup_steps < 0 or decay_steps < 1:
        raise ValueError(
            f"warmup_steps, decay_steps: expected >= 0 and >= 1, got {warmup_steps}, {decay_steps}"
        )

    def schedule(step: mx.array) -> mx.array:
        t = step.astype(mx.float32)
        warm = peak_value * t / max(warmup_steps, 1)
        frac = mx.clip((t - warmup_steps) / decay_steps, 0.0, 1.0)
        cos = end_value + (peak_value - end_value) * 0.5 * (1 + mx.cos(math.pi * frac))
        return mx.where(t < warmup_steps, warm, cos)

    return schedule


def sgd(learning_rate: float | Schedule, momentum: float = 0.0) -> GradientTransformation:
    """``u = -lr_t * m_t`` with ``m_t = momentum * m_{t-1} + g_t`` (plain SGD when momentum=0)."""
    lr = _check_rate("learning_rate", learning_rate)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum: expected a value in [0, 1), got {momentum}")

    def init(params: PyTree) -> SgdState:
        buf = tree_zeros_like(params) if momentum else ()
        return SgdState(mx.array(0, dtype=mx.int32), buf)

    def update(grads: PyTree, state: SgdState, params: PyTree = None) -> tuple[PyTree, SgdState]:
        rate = lr(state.count)
        if momentum:
            buf = tree_map(lambda m, g: momentum * m + g, state.momentum, grads)
            return tree_map(lambda m: -rate * m, buf), SgdState(state.count + 1, buf)
        return tree_map(lambda g: -rate * g, grads), SgdState(state.count + 1, ())

    return GradientTransformation(init, update)


def adam(
    learning_rate: float | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> GradientTransformation:
    """Adam (Kingma & Ba 2015) with bias correction:

    m_t = b1 m + (1-b1) g;  v_t = b2 v + (1-b2) g^2;
    u = -lr_t * (m_t / (1-b1^t)) / (sqrt(v_t / (1-b2^t)) + eps)
    """
    lr = _check_rate("learning_rate", learning_rate)
    for name, b in (("b1", b1), ("b2", b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name}: expected a value in [0, 1), got {b}")

    def init(params: PyTree) -> ScaleByAdamState:
        return ScaleByAdamState(
            mx.array(0, dtype=mx.int32), tree_zeros_like(params), tree_zeros_like(params)
        )

    def update(
        grads: PyTree, state: ScaleByAdamState, params: PyTree = None
    ) -> tuple[PyTree, ScaleByAdamState]:
        direction, new_state = adam_direction(grads, state, b1, b2, eps)
        rate = lr(state.count)
        return tree_map(lambda d: -rate * d, direction), new_state

    return GradientTransformation(init, update)


def adam_direction(
    grads: PyTree, state: ScaleByAdamState, b1: float, b2: float, eps: float
) -> tuple[PyTree, ScaleByAdamState]:
    """Adam's moment update and bias-corrected step direction, without the rate:

    t = count + 1;  m_t = b1 m + (1-b1) g;  v_t = b2 v + (1-b2) g^2;
    d = (m_t / (1-b1^t)) / (sqrt(v_t / (1-b2^t)) + eps)

    Returns ``(d, ScaleByAdamState(t, m_t, v_t))``; :func:`adam` and the inner-loop Adam of
    :mod:`metafn.inner` both step along ``-lr d``.
    """
    count = state.count + 1
    mu = tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
    nu = tree_map(lambda v, g: b2 * v + (1 - b2) * mx.square(g), state.nu, grads)
    t = count.astype(mx.float32)
    c1 = 1 - mx.power(mx.array(b1, dtype=mx.float32), t)
    c2 = 1 - mx.power(mx.array(b2, dtype=mx.float32), t)
    direction = tree_map(lambda m, v: (m / c1) / (mx.sqrt(v / c2) + eps), mu, nu)
    return direction, ScaleByAdamState(count, mu, nu)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescale ``g`` to ``g * min(1, max_norm / ||g||)`` (global norm over all leaves)."""
    if not (isinstance(max_norm, (int, float)) and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm: expected a finite positive number, got {max_norm!r}")

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    def update(grads: PyTree, state: EmptyState, params: PyTree = None) -> tuple[PyTree, EmptyState]:
        norm = tree_norm(grads)
        scale = mx.minimum(1.0, max_norm / mx.maximum(norm, 1e-12))
        return tree_map(lambda g: g * scale, grads), state

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Compose transformations left to right; the state is a tuple of their states."""

    def init(params: PyTree) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(grads: PyTree, state: tuple, params: PyTree = None) -> tuple[PyTree, tuple]:
        new_states = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s, params)
            new_states.append(s)
        return grads, tuple(new_states)

    return GradientTransformation(init, update)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``params + updates`` leaf by leaf."""
    return tree_map(lambda p, u: p + u, params, updates)
