"""pytest-benchmark suite for metafn alone: ``pytest bench/ --benchmark-only``.

The same workloads and data as ``python -m bench.speed`` (bench/peers; W4-W7 take a second or
more per call, select with ``-k "W1 or W2 or W3"`` for a short run), metafn variants only:
``metafn`` (the step as metafn runs it: compiled for MLP and BERT, compiled before timing;
uncompiled for conv4, see ``bench.peers.variants``), the other setting (``metafn-eager`` or
``metafn-compiled``) and the task batch split over two CPU streams (``metafn-streams2``, MAML /
Reptile). Compare runs with
pytest-benchmark's own options, e.g. ``--benchmark-autosave`` then ``--benchmark-compare``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.peers import metafn_impl
from bench.peers.workloads import WORKLOADS, make_data

AVAILABLE = [w for w in WORKLOADS.values() if w.available()[0]]
ROUNDS = {"W2": 8, "W4": 3, "W5": 3, "W6": 5, "W7": 5}


@pytest.fixture(scope="module", params=[w.id for w in AVAILABLE])
def runners(request):
    w = WORKLOADS[request.param]
    built = metafn_impl.build(w, make_data(w))
    for r in built.values():
        r.run()  # first call: traces / compiles
    return w, built


@pytest.mark.parametrize("variant", metafn_impl.VARIANTS)
def test_workload(benchmark, runners, variant):
    w, built = runners
    if variant not in built:
        pytest.skip(f"{variant} does not apply to {w.id}")
    runner = built[variant]
    benchmark.group = w.id
    benchmark.extra_info["workload"] = w.description
    benchmark.pedantic(runner.run, rounds=ROUNDS.get(w.id, 30),
                       warmup_rounds=1 if w.slow else 2, iterations=1)
    loss, leaves = runner.result()
    assert math.isfinite(loss) and all(np.all(np.isfinite(g)) for g in leaves)


def test_gemm_2048(benchmark):
    """MLX's 2048x2048 float32 matmul; ``extra_info['gflops']`` is the rate of the median."""
    fn = metafn_impl.gemm(2048)
    fn()
    benchmark.group = "gemm"
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
    benchmark.extra_info["gflops"] = 2 * 2048**3 / benchmark.stats.stats.median / 1e9
