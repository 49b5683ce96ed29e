"""Saving and loading adapters and merged models (safetensors + JSON, atomic writes).

An adapter directory holds (like Hugging Face peft's):

- ``adapter.safetensors``: every array of the adapter, named by its path (``/`` between
  levels, e.g. ``encoder.layer.0.attention.self.query/a``), with the tree structure in the
  file's metadata (``metafn_tree``), so any nesting of dicts / lists / tuples round-trips;
- ``adapter_config.json``: ``{"peft_type", "metafn_method", "config": {...}, "metafn_version"}``.

Each file is written to a temporary file in the same directory, fsynced, and moved into place
with ``os.replace`` (readers never see a half-written file). Arrays round-trip bit for bit, dtype
included. A merged model (``lora_merge`` etc.) is a plain tree: :func:`save_tree` /
:func:`load_tree` store it self-describingly (no template needed, unlike
:func:`metafn.checkpoint.load_checkpoint`); :func:`metafn.nn.bert.bert_save` writes a Hugging
Face directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from metafn._atomic import atomic_write

from metafn.peft.adalora import AdaLoraConfig
from metafn.peft.baselines import FullConfig, HeadConfig
from metafn.peft.dora import DoraConfig
from metafn.peft.lora import LoraConfig
from metafn.peft.prefix import PrefixConfig
from metafn.peft.prompt import PromptConfig
from metafn.peft.qlora import QLoraConfig
from metafn.tree import PyTree

__all__ = [
    "ADAPTER_WEIGHTS", "ADAPTER_CONFIG", "CONFIG_TYPES", "save_adapter", "load_adapter",
    "save_tree", "load_tree", "config_to_dict", "config_from_dict",
]

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

CONFIG_TYPES: dict[str, type] = {
    "lora": LoraConfig, "dora": DoraConfig, "adalora": AdaLoraConfig, "qlora": QLoraConfig,
    "prompt": PromptConfig, "prefix": PrefixConfig, "full": FullConfig, "head": HeadConfig,
}
_PEFT_TYPE = {"lora": "LORA", "dora": "LORA", "adalora": "ADALORA", "qlora": "LORA",
              "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING", "full": "FULL", "head": "HEAD"}


def _method_of(config: Any) -> str:
    for name, cls in CONFIG_TYPES.items():
        if type(config) is cls:
            return name
    raise TypeError(f"config: expected one of {[c.__name__ for c in CONFIG_TYPES.values()]}, "
                    f"got {type(config).__name__}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a PEFT config (tuples become lists)."""
    if not is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config: expected a config dataclass instance, got {type(config).__name__}")
    return json.loads(json.dumps(asdict(config)))


def config_from_dict(method: str, d: dict[str, Any]) -> Any:
    """The config of ``method`` (a key of :data:`CONFIG_TYPES`) from :func:`config_to_dict`."""
    if method not in CONFIG_TYPES:
        raise ValueError(f"method: expected one of {sorted(CONFIG_TYPES)}, got {method!r}")
    cls = CONFIG_TYPES[method]
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"config: unknown field(s) {sorted(unknown)} for {cls.__name__}")
    kw = dict(d)
    for k, v in kw.items():
        if isinstance(v, list):
            kw[k] = tuple(v)
    if method == "qlora" and isinstance(kw.get("lora"), dict):
        kw["lora"] = config_from_dict("lora", kw["lora"])
    return cls(**kw)


def _encode_tree(tree: Any, path: tuple[str, ...], arrays: dict[str, mx.array]) -> Any:
    if isinstance(tree, mx.array):
        name = "/".join(path) if path else "__root__"
        arrays[name] = tree
        return {"__array__": name}
    if isinstance(tree, dict):
        for k in tree:
            if not isinstance(k, str):
                raise TypeError(f"tree: dict keys must be str, got {k!r} at {'/'.join(path)!r}")
        return {"__dict__": {k: _encode_tree(v, path + (k,), arrays) for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)):
        items = [_encode_tree(v, path + (str(i),), arrays) for i, v in enumerate(tree)]
        return {"__tuple__": items} if isinstance(tree, tuple) else {"__list__": items}
    raise TypeError(f"tree: leaves must be mx.array, got {type(tree).__name__} at {'/'.join(path)!r}")


def _decode_tree(spec: Any, arrays: dict[str, mx.array]) -> Any:
    if "__array__" in spec:
        return arrays[spec["__array__"]]
    if "__dict__" in spec:
        return {k: _decode_tree(v, arrays) for k, v in spec["__dict__"].items()}
    if "__list__" in spec:
        return [_decode_tree(v, arrays) for v in spec["__list__"]]
    return tuple(_decode_tree(v, arrays) for v in spec["__tuple__"])


def save_tree(path: str | os.PathLike[str], tree: PyTree, metadata: dict[str, str] | None = None) -> Path:
    """Write a pytree of arrays to one ``.safetensors`` file (atomically), structure included."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path: expected a file name ending in .safetensors, got {str(path)!r}")
    arrays: dict[str, mx.array] = {}
    spec = _encode_tree(tree, (), arrays)
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata: keys and values must be str, got {k!r}: {v!r}")
    meta["metafn_tree"] = json.dumps(spec)
    atomic_write(path, lambda tmp: mx.save_safetensors(tmp, arrays, metadata=meta))
    return path


def load_tree(path: str | os.PathLike[str]) -> tuple[PyTree, dict[str, str]]:
    """``(tree, metadata)`` from :func:`save_tree` (the ``metafn_tree`` entry is removed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: {str(path)!r} does not exist")
    arrays, meta = mx.load(str(path), return_metadata=True)
    if "metafn_tree" not in meta:
        raise ValueError(f"path: {str(path)!r} has no metafn_tree metadata (not written by save_tree)")
    spec = json.loads(meta.pop("metafn_tree"))
    return _decode_tree(spec, arrays), meta


def save_adapter(
    directory: str | os.PathLike[str], adapter: PyTree, config: Any,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``adapter.safetensors`` and ``adapter_config.json`` into ``directory``.

    ``metadata``: extra JSON-serializable entries for ``adapter_config.json`` (e.g. the base
    model's name).
    """
    from metafn import __version__

    method = _method_of(config)
    directory = Path(directory)
    save_tree(directory / ADAPTER_WEIGHTS, adapter, {"metafn_method": method})
    doc = {"peft_type": _PEFT_TYPE[method], "metafn_method": method,
           "config": config_to_dict(config), "metafn_version": __version__,
           **(metadata or {})}
    text = json.dumps(doc, indent=2, sort_keys=False)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    atomic_write(directory / ADAPTER_CONFIG, write)
    return directory


def load_adapter(directory: str | os.PathLike[str]) -> tuple[PyTree, Any, dict[str, Any]]:
    """``(adapter, config, doc)`` from a directory written by :func:`save_adapter`; ``doc`` is
    the parsed ``adapter_config.json``. Missing files raise ``FileNotFoundError`` naming them."""
    directory = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"directory: {str(directory)!r} has no {name}")
    doc = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    method = doc.get("metafn_method")
    if method not in CONFIG_TYPES:
        raise ValueError(f"{directory / ADAPTER_CONFIG}: metafn_method {method!r} is not one of "
                         f"{sorted(CONFIG_TYPES)}")
    config = config_from_dict(method, doc.get("config", {}))
    adapter, _ = load_tree(directory / ADAPTER_WEIGHTS)
    return adapter, config, doc
