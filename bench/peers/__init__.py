"""The side-by-side workloads, written once per framework.

``workloads`` defines the workloads, their shared numpy data and FLOP counts; ``metafn_impl``,
``jax_impl`` and ``torch_impl`` implement them with the same math, shapes and float32 data. Each
peer module exposes ``NAME``, ``setup(threads)``, ``info()``, ``gemm(n)``, ``BUILDERS`` and
``build(workload, data) -> {variant: Runner}``; see ``bench/worker.py``.
"""
