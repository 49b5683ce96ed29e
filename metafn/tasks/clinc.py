"""CLINC150 intent classification (Larson et al. 2019, EMNLP; CC BY 3.0) as few-shot text tasks.

Data format (``train_val.json``, or any file of the same format, e.g. the full
``data_full.json`` with a ``test`` split): a JSON object mapping split names to lists of
``[utterance, intent]`` pairs; out-of-scope splits (``oos_*``, intent ``"oos"``) are kept apart.
``domains.json`` maps each of the 10 domains to its 15 intents (needed for cross-domain
episodes; looked for next to the split file unless given).

Two protocols:

(a) Standard few-shot (:func:`sample_few_shot`, :func:`eval_set`): ``K`` labelled utterances
    per intent for all 150 intents, drawn by key from a split (``train``); evaluation on every
    in-scope utterance of another split (``val``). Labels index :attr:`ClincData.intents`.

(b) Cross-domain episodes (:func:`sample_text_episode`): pick one domain, ``N`` of its
    intents and ``K + Q`` utterances of each; labels ``0..N-1`` in a random order of the
    chosen intents. Meta-train and meta-test use disjoint domains. The default split
    (:data:`DOMAIN_SPLITS`) of the 10 domains:

    ========  ==============================================================================
    train     banking, credit_cards, kitchen_and_dining, home, auto_and_commute, small_talk
    val       meta
    test      travel, utility, work
    ========  ==============================================================================

    (90 / 15 / 45 intents). Pass any list of domain names instead to use another split.

Sampling is deterministic in the key: the MLX key's two words seed a NumPy generator.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import mlx.core as mx
import numpy as np

from metafn.tasks.datadir import default_data_dir

__all__ = [
    "DOMAIN_SPLITS", "ClincData", "TextDataset", "TextEpisode", "default_clinc_dir", "load_clinc",
    "sample_few_shot", "eval_set", "sample_text_episode", "sample_text_episodes",
    "resolve_domains",
]

DOMAIN_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("banking", "credit_cards", "kitchen_and_dining", "home", "auto_and_commute",
              "small_talk"),
    "val": ("meta",),
    "test": ("travel", "utility", "work"),
}


@dataclass(frozen=True)
class ClincData:
    """CLINC150 in memory.

    intents: every in-scope intent, sorted (label ``i`` of the standard protocol is
      ``intents[i]``).
    domains: ``{domain: intents}`` (empty when no ``domains.json`` was found).
    splits: ``{split: ((utterance, intent), ...)}`` for in-scope splits.
    oos: ``{split: (utterance, ...)}`` for out-of-scope splits.
    by_intent: ``{split: {intent: (row, ...)}}`` row indices into ``splits[split]``.
    source: the split file read.
    """

    intents: tuple[str, ...]
    domains: dict[str, tuple[str, ...]]
    splits: dict[str, tuple[tuple[str, str], ...]]
    oos: dict[str, tuple[str, ...]]
    by_intent: dict[str, dict[str, tuple[int, ...]]]
    source: str


class TextDataset(NamedTuple):
    """Utterances with integer labels ``(n,)`` int32 indexing ``label_names``."""

    texts: tuple[str, ...]
    labels: mx.array
    label_names: tuple[str, ...]


class TextEpisode(NamedTuple):
    """An ``N``-way ``K``-shot episode of one domain.

    support_texts ``N K`` and query_texts ``N Q`` utterances in class-major order (class 0's
    first); support_y ``(N K,)`` and query_y ``(N Q,)`` int32 labels in ``0..N-1``;
    intents[c] is the intent of label ``c``; domain is the episode's domain.
    """

    support_texts: tuple[str, ...]
    support_y: mx.array
    query_texts: tuple[str, ...]
    query_y: mx.array
    intents: tuple[str, ...]
    domain: str


def default_clinc_dir() -> Path:
    """``$METAFN_CLINC150``, else ``$METAFN_SHARED_DATA/clinc150``, else ``<repo>/../shared/data/clinc150``;
    raises ``FileNotFoundError`` if none exists."""
    return default_data_dir("clinc150", "METAFN_CLINC150", "Pass path= (a directory with train_val.json or a split file) or set METAFN_CLINC150.")


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {str(path)!r} is not valid JSON ({e})") from e


def load_clinc(
    path: str | os.PathLike[str] | None = None,
    domains_path: str | os.PathLike[str] | None = None,
) -> ClincData:
    """Load CLINC150 from a directory (``train_val.json``, else ``data_full.json``) or a split
    file of the same format; ``domains_path`` defaults to ``domains.json`` beside it."""
    root = default_clinc_dir() if path is None else Path(path)
    if root.is_dir():
        for name in ("train_val.json", "data_full.json"):
            if (root / name).is_file():
                split_file = root / name
                break
        else:
            raise FileNotFoundError(f"path: {str(root)!r} has no train_val.json or data_full.json")
    else:
        split_file = root
    raw = _read_json(split_file, "path")
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"path: {str(split_file)!r} must hold a JSON object "
                         f"{{split: [[utterance, intent], ...]}}")
    splits: dict[str, tuple[tuple[str, str], ...]] = {}
    oos: dict[str, tuple[str, ...]] = {}
    for split, pairs in raw.items():
        if not isinstance(pairs, list):
            raise ValueError(f"path: split {split!r} of {split_file.name} must be a list of pairs")
        rows = []
        for i, pair in enumerate(pairs):
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                    or not all(isinstance(s, str) for s in pair)):
                raise ValueError(f"path: {split_file.name}[{split!r}][{i}] must be "
                                 f"[utterance, intent] strings, got {pair!r}")
            rows.append((pair[0], pair[1]))
        if split.startswith("oos") or all(intent == "oos" for _, intent in rows):
            oos[split] = tuple(u for u, _ in rows)
        else:
            splits[split] = tuple((u, t) for u, t in rows if t != "oos")
    if not splits:
        raise ValueError(f"path: {str(split_file)!r} has no in-scope split")
    dpath = Path(domains_path) if domains_path is not None else split_file.parent / "domains.json"
    domains: dict[str, tuple[str, ...]] = {}
    if domains_path is not None or dpath.is_file():
        draw = _read_json(dpath, "domains_path")
        if not isinstance(draw, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in draw.values()
        ):
            raise ValueError(f"domains_path: {str(dpath)!r} must map domain -> [intent, ...]")
        domains = {d: tuple(v) for d, v in draw.items()}
    intents = tuple(sorted({t for rows in splits.values() for _, t in rows}))
    if domains:
        owner: dict[str, str] = {}
        for d, its in domains.items():
            for it in its:
                if it in owner:
                    raise ValueError(f"domains_path: intent {it!r} is in both {owner[it]!r} and {d!r}")
                owner[it] = d
        missing = [t for t in intents if t not in owner]
        if missing:
            raise ValueError(f"domains_path: intents {missing[:5]} of {split_file.name} belong to "
                             f"no domain in {dpath.name}")
    by_intent: dict[str, dict[str, tuple[int, ...]]] = {}
    for split, rows in splits.items():
        groups: dict[str, list[int]] = {}
        for i, (_, t) in enumerate(rows):
            groups.setdefault(t, []).append(i)
        by_intent[split] = {t: tuple(ix) for t, ix in groups.items()}
    return ClincData(intents, domains, splits, oos, by_intent, str(split_file))


def _rng(key: mx.array) -> np.random.Generator:
    if not isinstance(key, mx.array) or key.shape != (2,) or key.dtype != mx.uint32:
        raise TypeError(f"key: expected an MLX PRNG key (uint32, shape (2,)), got "
                        f"{getattr(key, 'shape', type(key).__name__)}")
    return np.random.default_rng([int(x) for x in np.array(key)])


def _check_split(data: ClincData, split: str) -> None:
    if not isinstance(data, ClincData):
        raise TypeError(f"data: expected ClincData from load_clinc, got {type(data).__name__}")
    if split not in data.splits:
        raise ValueError(f"split: {split!r} is not an in-scope split of {data.source}; "
                         f"available: {sorted(data.splits)}")


def _positive(name: str, v: Any, zero_ok: bool = False) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < (0 if zero_ok else 1):
        raise ValueError(f"{name}: expected a {'non-negative' if zero_ok else 'positive'} int, "
                         f"got {v!r}")


def sample_few_shot(
    key: mx.array,
    data: ClincData,
    k_shot: int,
    split: str = "train",
    intents: Sequence[str] | None = None,
) -> TextDataset:
    """``K`` utterances of every intent (all of :attr:`ClincData.intents` by default), drawn
    without replacement from ``split``; labels index the intent list. Intent-major order."""
    _check_split(data, split)
    _positive("k_shot", k_shot)
    names = tuple(data.intents if intents is None else intents)
    rng = _rng(key)
    texts: list[str] = []
    labels: list[int] = []
    rows = data.splits[split]
    for c, intent in enumerate(names):
        pool = data.by_intent[split].get(intent)
        if pool is None:
            raise ValueError(f"intents: {intent!r} has no utterance in split {split!r}")
        if len(pool) < k_shot:
            raise ValueError(f"k_shot: {k_shot} exceeds the {len(pool)} utterances of {intent!r} "
                             f"in split {split!r}")
        for i in rng.choice(len(pool), size=k_shot, replace=False):
            texts.append(rows[pool[int(i)]][0])
            labels.append(c)
    return TextDataset(tuple(texts), mx.array(labels, dtype=mx.int32), names)


def eval_set(
    data: ClincData, split: str = "val", intents: Sequence[str] | None = None
) -> TextDataset:
    """Every in-scope utterance of ``split`` whose intent is in ``intents`` (default all),
    labelled by its index in ``intents``."""
    _check_split(data, split)
    names = tuple(data.intents if intents is None else intents)
    index = {t: i for i, t in enumerate(names)}
    pairs = [(u, index[t]) for u, t in data.splits[split] if t in index]
    if not pairs:
        raise ValueError(f"intents: none of them occur in split {split!r}")
    return TextDataset(tuple(u for u, _ in pairs), mx.array([c for _, c in pairs], dtype=mx.int32),
                       names)


def resolve_domains(data: ClincData, domains: str | Sequence[str]) -> tuple[str, ...]:
    """Domain names from a split name of :data:`DOMAIN_SPLITS` or a list of domain names."""
    if not data.domains:
        raise ValueError(f"data: no domains.json was loaded with {data.source}; cross-domain "
                         f"episodes need it (load_clinc(domains_path=...))")
    if isinstance(domains, str):
        if domains not in DOMAIN_SPLITS:
            raise ValueError(f"domains: {domains!r} is not a default split {sorted(DOMAIN_SPLITS)}; "
                             f"pass a list of domain names instead")
        names = DOMAIN_SPLITS[domains]
    else:
        names = tuple(domains)
    if not names:
        raise ValueError("domains: expected at least one domain")
    for d in names:
        if d not in data.domains:
            raise ValueError(f"domains: unknown domain {d!r}; available: {sorted(data.domains)}")
    return names


def sample_text_episode(
    key: mx.array,
    data: ClincData,
    domains: str | Sequence[str],
    n_way: int,
    k_shot: int,
    n_query: int,
    split: str = "train",
) -> TextEpisode:
    """An ``n_way``-way ``k_shot``-shot episode whose intents all come from one domain.

    The domain is drawn uniformly from ``domains`` (``"train"``/``"val"``/``"test"`` of
    :data:`DOMAIN_SPLITS`, or a list of names), then ``n_way`` of its intents, then
    ``k_shot + n_query`` distinct utterances of each from ``split`` (support and query are
    disjoint). Deterministic in ``key``.
    """
    _check_split(data, split)
    _positive("n_way", n_way)
    _positive("k_shot", k_shot)
    _positive("n_query", n_query, zero_ok=True)
    names = resolve_domains(data, domains)
    rng = _rng(key)
    domain = names[int(rng.integers(len(names)))]
    pool = [t for t in data.domains[domain] if t in data.by_intent[split]]
    if n_way > len(pool):
        raise ValueError(f"n_way: {n_way} exceeds the {len(pool)} intents of domain {domain!r} "
                         f"in split {split!r}")
    chosen = [pool[int(i)] for i in rng.choice(len(pool), size=n_way, replace=False)]
    rows = data.splits[split]
    s_texts: list[str] = []
    q_texts: list[str] = []
    for intent in chosen:
        ix = data.by_intent[split][intent]
        need = k_shot + n_query
        if need > len(ix):
            raise ValueError(f"k_shot + n_query: {need} exceeds the {len(ix)} utterances of "
                             f"{intent!r} in split {split!r}")
        pick = rng.choice(len(ix), size=need, replace=False)
        s_texts += [rows[ix[int(i)]][0] for i in pick[:k_shot]]
        q_texts += [rows[ix[int(i)]][0] for i in pick[k_shot:]]
    sy = mx.array(np.repeat(np.arange(n_way), k_shot).astype(np.int32))
    qy = mx.array(np.repeat(np.arange(n_way), n_query).astype(np.int32))
    return TextEpisode(tuple(s_texts), sy, tuple(q_texts), qy, tuple(chosen), domain)


def sample_text_episodes(
    key: mx.array,
    data: ClincData,
    domains: str | Sequence[str],
    n_tasks: int,
    n_way: int,
    k_shot: int,
    n_query: int,
    split: str = "train",
) -> list[TextEpisode]:
    """``n_tasks`` independent episodes; episode ``i`` uses ``split(key, n_tasks)[i]``."""
    _positive("n_tasks", n_tasks)
    keys = mx.random.split(key, n_tasks)
    return [sample_text_episode(keys[i], data, domains, n_way, k_shot, n_query, split)
            for i in range(n_tasks)]
