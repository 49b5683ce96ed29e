"""Checkpoints: one ``.safetensors`` file holding every array of a pytree, with JSON metadata.

Files are written atomically (to a temporary file in the same directory, flushed and fsynced,
then ``os.replace``), so a crash leaves either the old checkpoint or the new one, never a torn
file. Leaves are saved bit for bit under their tree paths (``params.0.w``); loading restores them
into the structure of a *template* tree (NamedTuples included), checking paths, shapes and dtypes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from metafn._atomic import atomic_write, atomic_write_text
from metafn.tree import PyTree

__all__ = ["save_checkpoint", "load_checkpoint", "read_metadata", "atomic_write_text"]

_META_KEY = "metafn"


def save_checkpoint(path: str | Path, tree: PyTree, metadata: dict[str, Any] | None = None) -> None:
    """Save every leaf of ``tree`` to ``path`` (a ``.safetensors`` file) with JSON ``metadata``.

    The metadata is embedded in the safetensors header (authoritative) and also written beside
    it as ``<path>.json`` for people and tools.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path: expected a file name ending in .safetensors, got {path}")
    arrays = dict(tree_flatten(tree))
    if not arrays:
        raise ValueError("tree: nothing to save (no arrays)")
    meta_json = json.dumps(metadata or {}, sort_keys=True)
    atomic_write(path, lambda tmp: mx.save_safetensors(tmp, arrays, metadata={_META_KEY: meta_json}))
    atomic_write_text(path.with_suffix(".json"), json.dumps(metadata or {}, indent=2, sort_keys=True))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata stored inside a checkpoint file."""
    _, meta = _load(path)
    return meta


def _load(path: str | Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {path}")
    try:
        arrays, header = mx.load(str(path), return_metadata=True)
    except Exception as exc:  # MLX raises RuntimeError/ValueError for bad files
        raise ValueError(f"checkpoint: cannot read {path} as safetensors ({exc})") from exc
    return arrays, json.loads(header.get(_META_KEY, "{}"))


def load_checkpoint(path: str | Path, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Load ``path`` into the structure of ``template``; returns ``(tree, metadata)``.

    Every leaf path of ``template`` must be in the file with the same shape and dtype.
    """
    arrays, meta = _load(path)

    def restore(key: str, leaf: mx.array) -> mx.array:
        if key not in arrays:
            raise ValueError(f"checkpoint {path}: missing array {key!r}")
        value = arrays[key]
        if value.shape != leaf.shape or value.dtype != leaf.dtype:
            raise ValueError(
                f"checkpoint {path}: {key!r} has shape {value.shape} {value.dtype}, "
                f"expected {leaf.shape} {leaf.dtype}"
            )
        return value

    expected = {k for k, _ in tree_flatten(template)}
    extra = sorted(set(arrays) - expected)
    if extra:
        raise ValueError(f"checkpoint {path}: arrays not in the template: {extra[:5]}")
    return tree_map_with_path(restore, template), meta
