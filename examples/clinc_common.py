"""Shared I/O for the CLINC150 examples and the PEFT benchmark: the frozen-encoder cache and
row-level sampling (standard protocol shots, carved validation, cross-domain episodes).

The cache holds, per CLINC split (``train``, ``val``), the token table (width 32), the frozen
all-MiniLM-L6-v2 states after layer ``k`` for the requested ``k`` and the final sentence
embeddings, as ``.npy`` files under ``--cache`` (default ``/work/runs/clinc/cache``, or
``$METAFN_CLINC_CACHE``). Everything is recomputed when missing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import metafn  # noqa: F401  (before mlx)
import mlx.core as mx
import numpy as np

from metafn import peft
from metafn import text_meta as tm
from metafn.nn import bert
from metafn.tasks import clinc

DEFAULT_CACHE = Path(os.environ.get("METAFN_CLINC_CACHE", "/work/runs/clinc/cache"))
WIDTH = 32
QV = ("query", "value")
# adapters that run on the cached states after layer ``split`` (prompt tuning needs the input layer)
CACHED_STATE_METHODS = ("lora", "dora", "adalora", "qlora", "prefix", "bitfit", "full")


def log(msg: str) -> None:
    """Print ``msg`` with a wall-clock time stamp, flushed (the examples' progress lines)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_targets(spec: str) -> str | tuple[str, ...]:
    """A ``--targets`` option: ``"all-linear"`` or comma-separated module names."""
    return "all-linear" if spec == "all-linear" else tuple(spec.split(","))


def peft_method(name: str, r: int = 8, alpha: float = 16.0, targets: Sequence[str] = QV,
                n_tokens: int = 10) -> peft.PeftMethod | None:
    """The PEFT method ``name`` as the CLINC examples and ``bench.peft_bench`` configure it (one
    definition, so a checkpoint meta-learned by ``clinc_meta.py`` loads in the benchmark):
    LoRA-family rank ``r`` with scaling ``alpha / r`` on ``targets``, ``n_tokens`` virtual
    tokens for prefix / prompt tuning, BitFit = every bias, full = every weight of the adapted
    layers. ``proto``, ``head`` and ``frozen`` return None (frozen encoder, only the head)."""
    t = tuple(targets)
    if name == "lora":
        return peft.lora_method(peft.LoraConfig(r=r, alpha=alpha, target_modules=t), unmerged=True)
    if name == "dora":
        return peft.dora_method(peft.DoraConfig(r=r, alpha=alpha, target_modules=t))
    if name == "adalora":
        return peft.adalora_method(peft.AdaLoraConfig(init_r=r, target_r=r, alpha=alpha,
                                                      target_modules=t))
    if name == "qlora":
        return peft.qlora_method(peft.QLoraConfig(
            lora=peft.LoraConfig(r=r, alpha=alpha, target_modules=t)), unmerged=True)
    if name == "prefix":
        return peft.prefix_method(peft.PrefixConfig(n_tokens=n_tokens))
    if name == "prompt":
        return peft.prompt_method(peft.PromptConfig(n_tokens=n_tokens))
    if name == "bitfit":
        return peft.head_method(peft.HeadConfig(modules=r".*\.b"))
    if name == "full":
        return peft.full_method(peft.FullConfig())
    if name in ("proto", "head", "frozen"):
        return None
    raise ValueError(f"method: unknown {name!r}; choose from lora, dora, adalora, qlora, prefix, "
                     "prompt, bitfit, full, head, proto, frozen")


def episode_accuracies(model: tm.TextModel, meta: tm.MetaParams, xs: mx.array, masks: mx.array,
                       episodes: tuple[np.ndarray, ...], n_way: int, cfg: tm.AdaptConfig,
                       chunk: int = 10) -> np.ndarray:
    """Query accuracy ``(T,)`` of each of ``T`` episodes given as row arrays ``(s, sy, q, qy)``
    into ``xs`` / ``masks``, adapted by ``cfg`` from ``meta``; ``chunk`` episodes are vmapped at
    a time (memory grows linearly with it)."""
    s, sy, q, qy = episodes
    out = []
    for i in range(0, len(s), chunk):
        b = tm.text_batch(xs, masks, s[i:i + chunk], sy[i:i + chunk], q[i:i + chunk], qy[i:i + chunk])
        out.append(tm.episode_accuracy(model, meta, b, n_way, cfg))
    return np.concatenate(out)


class SplitCache(NamedTuple):
    """One CLINC split: ``mask (N, 32)``, ``ids (N, 32)``, ``states {k: (N, 32, d)}``,
    ``emb (N, d)`` frozen sentence embeddings, ``labels (N,)`` into ``data.intents``, and
    ``row_of {utterance: row}``."""

    ids: mx.array
    mask: mx.array
    states: dict[int, mx.array]
    emb: np.ndarray
    labels: np.ndarray
    row_of: dict[str, int]


def load_split(data: clinc.ClincData, split: str, splits: Sequence[int], cache: Path = DEFAULT_CACHE,
               model: tuple | None = None, log=print) -> SplitCache:
    """Load (or compute and save) the cache of ``split`` for layer splits ``splits``."""
    cache.mkdir(parents=True, exist_ok=True)
    rows = data.splits[split]
    texts = [u for u, _ in rows]
    index = {t: i for i, t in enumerate(data.intents)}
    labels = np.array([index[t] for _, t in rows], np.int32)
    files = {k: cache / f"{split}_k{k}.npy" for k in splits}
    need = [k for k, f in files.items() if not f.is_file()]
    if need or not (cache / f"{split}_emb.npy").is_file() or not (cache / f"{split}_mask.npy").is_file():
        cfg, params, tok = model if model is not None else bert.bert_load()
        t0 = time.perf_counter()
        table = tm.pretokenize(tok, texts, WIDTH)
        states, emb = tm.precompute_layers(params, cfg, table, tuple(sorted(set(need) | set(splits))))
        np.save(cache / f"{split}_ids.npy", np.array(table.ids))
        np.save(cache / f"{split}_mask.npy", np.array(table.mask))
        np.save(cache / f"{split}_emb.npy", np.array(emb))
        for k, v in states.items():
            np.save(files[k], np.array(v))
        log(f"cached {split} ({len(texts)} utterances, layers {sorted(states)}) in "
            f"{time.perf_counter() - t0:.0f}s")
    ids = mx.array(np.load(cache / f"{split}_ids.npy"))
    mask = mx.array(np.load(cache / f"{split}_mask.npy"))
    states = {k: mx.array(np.load(files[k])) for k in splits}
    emb = np.load(cache / f"{split}_emb.npy")
    row_of: dict[str, int] = {}
    for i, t in enumerate(texts):
        row_of.setdefault(t, i)
    return SplitCache(ids, mask, states, emb, labels, row_of)


def few_shot_rows(key: mx.array, data: clinc.ClincData, sc: SplitCache, k_shot: int,
                  carve: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Standard protocol: ``k_shot`` training rows per intent (``clinc.sample_few_shot`` with
    ``key``) and, when ``carve > 0``, ``carve`` more rows per intent from the *other* train
    utterances as a validation set. Returns ``(shot_rows, shot_y, carve_rows, carve_y)``."""
    shots = clinc.sample_few_shot(key, data, k_shot, "train")
    shot_rows = np.array([sc.row_of[t] for t in shots.texts])
    shot_y = np.array(shots.labels)
    if not carve:
        return shot_rows, shot_y, np.zeros(0, int), np.zeros(0, int)
    rng = np.random.default_rng([int(v) for v in np.array(key)] + [7])
    used = set(shot_rows.tolist())
    c_rows, c_y = [], []
    for c, intent in enumerate(data.intents):
        pool = [i for i in data.by_intent["train"][intent] if i not in used]
        pick = rng.choice(len(pool), size=carve, replace=False)
        c_rows += [pool[int(i)] for i in pick]
        c_y += [c] * carve
    return shot_rows, shot_y, np.array(c_rows), np.array(c_y)


def episode_rows(key: mx.array, data: clinc.ClincData, sc: SplitCache, domains: str, n_tasks: int,
                 n_way: int, k_shot: int, n_query: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n_tasks`` cross-domain episodes (``clinc.sample_text_episodes`` on the train split's
    utterances of ``domains``) as row indices: ``(s_rows, s_y, q_rows, q_y)``, each
    ``(T, N*K)`` / ``(T, N*Q)``."""
    eps = clinc.sample_text_episodes(key, data, domains, n_tasks, n_way, k_shot, n_query, "train")
    s = np.array([[sc.row_of[t] for t in e.support_texts] for e in eps])
    q = np.array([[sc.row_of[t] for t in e.query_texts] for e in eps])
    sy = np.stack([np.array(e.support_y) for e in eps])
    qy = np.stack([np.array(e.query_y) for e in eps])
    return s, sy, q, qy


def load_all(splits: Sequence[int], cache: Path = DEFAULT_CACHE, which=("train", "val"), log=print,
             model_dir: Path | None = None):
    """``(data, {split: SplitCache}, (config, params, tokenizer))`` for the encoder in
    ``model_dir`` (default all-MiniLM-L6-v2, cached in ``cache``; another encoder is cached in
    ``cache / <model_dir name>``)."""
    data = clinc.load_clinc()
    model = bert.bert_load(model_dir)
    if model_dir is not None:
        cache = cache / Path(model_dir).name
    caches = {s: load_split(data, s, splits, cache, model, log) for s in which}
    return data, caches, model
