"""Where the shared data sets live: an environment variable, ``$METAFN_SHARED_DATA/<name>``, or
``<repo>/../shared/data/<name>`` (the layout of a development checkout)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_data_dir"]


def default_data_dir(name: str, env_var: str, hint: str) -> Path:
    """The first existing directory of ``$env_var``, ``$METAFN_SHARED_DATA/name``,
    ``<repo>/../shared/data/name``; ``FileNotFoundError`` listing them (and ``hint``) if none."""
    candidates = []
    if os.environ.get(env_var):
        candidates.append(Path(os.environ[env_var]))
    if os.environ.get("METAFN_SHARED_DATA"):
        candidates.append(Path(os.environ["METAFN_SHARED_DATA"]) / name)
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data" / name)
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(f"{name} not found; looked in " + ", ".join(str(c) for c in candidates)
                            + f". {hint}")
