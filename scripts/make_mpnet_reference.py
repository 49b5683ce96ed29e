"""Compute reference sentence embeddings of all-mpnet-base-v2 with PyTorch for tests/test_mpnet.py.

Two PyTorch computations, both from Hugging Face ``transformers``' MPNet (not from metafn), must
agree to 1e-5 before anything is written:

1. ``sentence_transformers.SentenceTransformer(model_dir).encode`` (truncation to 384 tokens,
   mean pooling, L2 norm);
2. ``transformers.MPNetModel`` in float64 with the mean pooling and normalization written here.

Output: ``tests/data/mpnet_reference.npz`` with ``sentences`` (unicode array), ``embeddings``
(float32, ``(n, 768)``) and the library versions used.

Usage (the model directory comes from ``python -m metafn.nn.packaged``)::

    pip install torch==2.13.0 transformers sentence-transformers
    HF_HUB_OFFLINE=1 python scripts/make_mpnet_reference.py [--model-dir DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from make_bert_reference import SENTENCES

# the last one is > 384 tokens: exercises truncation (keeps <s> ... </s>)
MPNET_SENTENCES = SENTENCES + [" ".join(["the quick brown fox jumps over the lazy dog"] * 50)]


def transformers_reference(model_dir: Path, sentences: list[str], max_len: int) -> np.ndarray:
    """Mean-pooled, L2-normalized ``MPNetModel`` states in float64."""
    import torch
    from transformers import AutoTokenizer, MPNetModel

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = MPNetModel.from_pretrained(str(model_dir), torch_dtype=torch.float64).eval()
    out = []
    with torch.no_grad():
        for s in sentences:
            b = tok([s], truncation=True, max_length=max_len, return_tensors="pt")
            h = model(**b).last_hidden_state[0]
            m = b["attention_mask"][0].double()[:, None]
            u = (h * m).sum(0) / m.sum()
            out.append((u / u.norm()).numpy())
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "data"
                    / "mpnet_reference.npz")
    args = ap.parse_args()
    if args.model_dir is None:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from metafn.nn.packaged import mpnet_model_dir

        args.model_dir = mpnet_model_dir()
    import sentence_transformers
    import torch
    import transformers

    st = sentence_transformers.SentenceTransformer(str(args.model_dir), device="cpu")
    ref_st = st.encode(MPNET_SENTENCES, convert_to_numpy=True, batch_size=4)
    ref_hf = transformers_reference(args.model_dir, MPNET_SENTENCES, st.max_seq_length)
    gap = float(np.abs(ref_st - ref_hf).max())
    print(f"sentence-transformers vs float64 MPNetModel: max |diff| = {gap:.2e}")
    if gap > 1e-5:
        raise SystemExit("the two references disagree; nothing written")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, sentences=np.array(MPNET_SENTENCES), embeddings=ref_hf.astype(np.float32),
             versions=np.array([f"torch {torch.__version__}", f"transformers {transformers.__version__}",
                                f"sentence-transformers {sentence_transformers.__version__}"]))
    print(f"wrote {args.out} ({len(MPNET_SENTENCES)} sentences)")


if __name__ == "__main__":
    main()
