"""Which metafn setting is each workload's headline runner (framework-free, no MLX import, so
the orchestrator can read it).

``metafn`` is the step as metafn runs it for speed, the setting its own configs use for that
model: the MLP and the BERT encoder ``mx.compile`` the whole step (as the JAX peer is jitted);
conv4 runs it uncompiled, as every ``configs/omniglot_*.yaml`` trains (``train.compile:
false``), because MLX's fused CPU kernels for batch norm's and max pooling's broadcast backward
are slower than its separate kernels (bench/README.md has the measurements). The other setting
is reported beside it as ``metafn-eager`` or ``metafn-compiled``.
"""

from __future__ import annotations

HEADLINE = {"mlp": "compiled", "bert": "compiled", "conv4": "eager"}


def reference_variant(variants) -> str:
    """The uncompiled metafn runner among ``variants`` (the correctness reference):
    ``metafn-eager``, or ``metafn`` itself where the headline is the eager call."""
    return "metafn-eager" if "metafn-eager" in variants else "metafn"
