"""Test setup: typeguard instruments metafn so every annotated public function is type-checked
at run time during the tests; then metafn is imported first (fast BLAS before mlx); shared data
paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typeguard import install_import_hook

install_import_hook("metafn")
import metafn  # noqa: E402,F401  (instrumented; must precede any mlx import)
from hypothesis import HealthCheck, settings

settings.register_profile(
    "metafn", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "metafn"))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("METAFN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$METAFN_SHARED_DATA``); skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
