"""QLoRA (Dettmers et al. 2023) on MLX: frozen low-bit base weights plus a float LoRA adapter.

Base weights of the selected dense modules are quantized with MLX's affine quantization
(``mx.quantize``, groups of ``group_size`` consecutive inputs of each output unit, ``bits``
bits): for a weight ``W (d_in, d_out)`` we store ``Q = quantize(W^T)`` as
``{"wq": (d_out, d_in * bits / 32) uint32, "scales": (d_out, d_in / g), "biases": (d_out, d_in / g)}``
(the bias ``"b"`` stays float). Dequantized, ``W~_{ij} = scale_g * q_ij + bias_g`` with
``|W - W~| <= |scale_g|`` elementwise (rounding to the grid, plus MLX's alignment of the grid
to the group's extreme value), where ``|scale_g| ~ (max_g - min_g) / (2^bits - 1)``.
(Dettmers et al. use NF4 and double quantization; MLX's affine 4-bit is the analogue here.)

The adapter is ordinary LoRA (:mod:`metafn.peft.lora`) in float over the quantized modules:

    y = x W~ + s * (x A) B + b

computed either by dequantizing (merged path, any model: :func:`qlora_apply`) or with
:func:`metafn.nn.bert.quantized_linear` on the packed weights (``unmerged=True``, models built on
:func:`metafn.nn.bert.linear_apply`). Only 2-D dense weights whose ``d_in`` is a multiple of
``group_size`` can be quantized; others stay float (with a warning when selected by
``"all-linear"``, an error when named explicitly).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx

from metafn.peft.lora import (
    Adapter, LoraConfig, _norm_targets, dense_modules, lora_init, lora_inject,
    lora_merge, map_modules, match_targets,
)
from metafn.tree import PyTree

__all__ = [
    "QLoraConfig", "qlora_quantize", "qlora_dequantize", "qlora_init", "qlora_merge",
    "qlora_apply", "is_quantized",
]


@dataclass(frozen=True)
class QLoraConfig:
    """``lora``: the adapter's :class:`LoraConfig`; ``bits`` (2, 3, 4, 5, 6 or 8) and
    ``group_size`` (32, 64 or 128) of the base-weight quantization; ``quantize_modules``:
    which dense modules to quantize (names, regex or ``"all-linear"``, as ``target_modules``)."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    bits: int = 4
    group_size: int = 64
    quantize_modules: str | tuple[str, ...] = "all-linear"

    def __post_init__(self) -> None:
        if not isinstance(self.lora, LoraConfig):
            raise TypeError(f"lora: expected a LoraConfig, got {type(self.lora).__name__}")
        if self.bits not in (2, 3, 4, 5, 6, 8):
            raise ValueError(f"bits: expected one of 2, 3, 4, 5, 6, 8, got {self.bits!r}")
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"group_size: expected 32, 64 or 128, got {self.group_size!r}")
        object.__setattr__(self, "quantize_modules", _norm_targets(self.quantize_modules))


def is_quantized(node: dict[str, Any]) -> bool:
    """True for a dense module stored as ``{"wq", "scales", "biases"}``."""
    return "wq" in node and "scales" in node and "biases" in node


def qlora_quantize(params: PyTree, config: QLoraConfig) -> PyTree:
    """Quantize the dense modules chosen by ``config.quantize_modules`` (see module docstring)."""
    if not isinstance(config, QLoraConfig):
        raise TypeError(f"config: expected a QLoraConfig, got {type(config).__name__}")
    mods = dense_modules(params, config.group_size)
    chosen = match_targets(list(mods), config.quantize_modules)
    ok, skipped = [], []
    for n in chosen:
        info = mods[n]
        if len(info.shape) == 2 and info.d_in % config.group_size == 0:
            ok.append(n)
        else:
            skipped.append(f"{n} {info.shape}")
    if skipped:
        msg = (f"quantize_modules: {len(skipped)} module(s) cannot be quantized with group_size="
               f"{config.group_size} (need a 2-D weight with d_in divisible by it) and stay "
               f"float: {', '.join(skipped[:6])}")
        if config.quantize_modules != "all-linear":
            raise ValueError(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)

    def quant(node: dict[str, Any]) -> dict[str, Any]:
        if is_quantized(node):
            return node
        wq, scales, biases = mx.quantize(node["w"].T, group_size=config.group_size,
                                         bits=config.bits)
        out = {k: v for k, v in node.items() if k != "w"}
        out.update(wq=wq, scales=scales, biases=biases)
        return out

    return map_modules(params, {n: quant for n in ok})


def _dequant_node(node: dict[str, Any], config: QLoraConfig) -> dict[str, Any]:
    w = mx.dequantize(node["wq"], node["scales"], node["biases"], group_size=config.group_size,
                      bits=config.bits).T
    out = {k: v for k, v in node.items() if k not in ("wq", "scales", "biases")}
    out["w"] = w
    return out


def qlora_dequantize(qparams: PyTree, config: QLoraConfig) -> PyTree:
    """Float parameters ``W~`` from quantized ones (other leaves unchanged)."""
    names = [n for n, i in dense_modules(qparams, config.group_size).items()]
    fns: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}
    for n in names:
        fns[n] = lambda node: _dequant_node(node, config) if is_quantized(node) else node
    return map_modules(qparams, fns)


def qlora_init(key: mx.array, qparams: PyTree, config: QLoraConfig) -> Adapter:
    """A float LoRA adapter (``config.lora``) over the (quantized) target modules of ``qparams``."""
    if not isinstance(config, QLoraConfig):
        raise TypeError(f"config: expected a QLoraConfig, got {type(config).__name__}")
    return lora_init(key, _shape_tree(qparams, config.group_size), config.lora)


def _shape_tree(qparams: PyTree, group_size: int) -> PyTree:
    """``qparams`` with each quantized module replaced by a lazy (never evaluated) placeholder
    ``{"w": zeros(d_in, d_out)}``, so LoRA's target selection and init see its shape."""
    infos = dense_modules(qparams, group_size)
    return map_modules(
        qparams,
        {n: (lambda node, i=i: {"w": mx.zeros(i.shape)} if is_quantized(node) else node)
         for n, i in infos.items()},
    )


def qlora_merge(
    qparams: PyTree, adapter: Adapter, config: QLoraConfig, key: mx.array | None = None
) -> PyTree:
    """Float parameters ``W~ + s A B`` (dequantize, then :func:`lora_merge`)."""
    return lora_merge(qlora_dequantize(qparams, config), adapter, config.lora, key)


def qlora_apply(
    qparams: PyTree,
    adapter: Adapter,
    config: QLoraConfig,
    apply_fn: Callable[..., Any],
    *args: Any,
    key: mx.array | None = None,
    unmerged: bool = False,
    **kwargs: Any,
) -> Any:
    """``apply_fn`` on the adapted model: dequantized and merged (default, any model), or with
    ``unmerged=True`` through :func:`metafn.nn.bert.quantized_linear` plus the float LoRA branch (models using
    :func:`metafn.nn.bert.linear_apply`). Gradients flow to the adapter only."""
    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a callable (params, *args) -> output, got {apply_fn!r}")
    if unmerged:
        p = lora_inject(qparams, adapter, config.lora, key)
    else:
        p = qlora_merge(qparams, adapter, config, key)
    return apply_fn(p, *args, **kwargs)

