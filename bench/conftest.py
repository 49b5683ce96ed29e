"""pytest-benchmark setup for ``pytest bench/ --benchmark-only``.

metafn is imported first (fast BLAS before mlx). When every path pytest was given lies under
bench/, the typeguard instrumentation that pyproject's addopts turns on for the unit tests is
switched off: run-time type checks on every metafn call would distort the timings. The plain
``pytest`` run collects only tests/ (``testpaths``), never this directory.
"""

from __future__ import annotations

from pathlib import Path

import metafn  # noqa: F401  (must precede any mlx import)
import pytest

BENCH = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    paths = [Path(a.split("::")[0]).resolve() for a in config.args]
    if paths and all(p == BENCH or BENCH in p.parents for p in paths):
        if hasattr(config.option, "typeguard_packages"):
            config.option.typeguard_packages = None
