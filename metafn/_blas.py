"""Find and preload an optimized BLAS before MLX is imported (Linux).

The Linux MLX wheel calls ``cblas_sgemm`` from a bundled *reference* BLAS (~3-6 GFLOP/s for a
2048x2048 float32 matmul on our 2-core machines). Loading an optimized BLAS into the global
symbol scope with ``ctypes.CDLL(path, mode=RTLD_GLOBAL)`` *before* ``mlx.core`` is imported makes
MLX resolve ``cblas_sgemm`` to it (~175-200 GFLOP/s). Loaded after ``mlx.core``, it does nothing,
because the dynamic linker has already bound MLX's symbols.

Search order (first library that loads and exports ``cblas_sgemm`` wins):

1. ``METAFN_BLAS``: a path to a shared library, or ``none`` to keep MLX's bundled BLAS;
2. OpenBLAS from Debian/Ubuntu packages (``libopenblas0-pthread``, ``libopenblas0-openmp``);
3. OpenBLAS from the PyPI package ``cmeel-openblas`` and Intel MKL from the PyPI package ``mkl``
   (``libmkl_rt``) in this Python environment;
4. ``ctypes.util.find_library("openblas")``.

On macOS MLX uses Accelerate and on CUDA the GPU, so nothing is loaded there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import sysconfig
import warnings
from typing import NamedTuple

ENV_VAR = "METAFN_BLAS"

FIX_HINT = (
    "Install one (Debian/Ubuntu: `apt-get install libopenblas0-pthread`, or `pip install mkl`), "
    f"or point {ENV_VAR} at a shared library exporting cblas_sgemm; then import metafn before "
    "mlx (or run through the `metafn` CLI)."
)


class BlasWarning(UserWarning):
    """MLX runs on its slow reference BLAS in this process."""


class BlasStatus(NamedTuple):
    """Outcome of the BLAS preload: ``library`` is the loaded path or None; ``reason`` says why."""

    library: str | None
    reason: str


_DEBIAN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

_status: BlasStatus | None = None
_warned = False


def _python_env_paths() -> list[str]:
    """OpenBLAS (cmeel) and MKL libraries installed by pip into this environment."""
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    found: list[str] = []
    for root in sorted(roots):
        found += sorted(glob.glob(os.path.join(root, "cmeel.prefix", "lib", "libopenblas.so*")))[:1]
    found += sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))[:1]
    return found


def candidate_paths() -> list[str]:
    """Libraries to try, in order (see the module docstring)."""
    paths = [p for p in _DEBIAN_PATHS if os.path.exists(p)] + _python_env_paths()
    found = ctypes.util.find_library("openblas")
    if found:
        paths.append(found)
    return paths


def _try_load(path: str) -> bool:
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return hasattr(lib, "cblas_sgemm")


def preload() -> BlasStatus:
    """Load a fast BLAS into the global symbol scope, once per process; return what happened."""
    global _status
    if _status is not None:
        return _status
    if not sys.platform.startswith("linux"):
        _status = BlasStatus(None, f"not needed on {sys.platform}")
        return _status
    if "mlx.core" in sys.modules:
        _status = BlasStatus(None, "mlx.core was imported before metafn")
        return _status
    override = os.environ.get(ENV_VAR, "").strip()
    if override.lower() == "none":
        _status = BlasStatus(None, f"{ENV_VAR}=none")
        return _status
    if override:
        if not _try_load(override):
            raise OSError(
                f"{ENV_VAR}={override!r}: cannot load it as a shared library exporting cblas_sgemm"
            )
        _status = BlasStatus(override, f"from {ENV_VAR}")
        return _status
    for path in candidate_paths():
        if _try_load(path):
            _status = BlasStatus(path, "found")
            return _status
    _status = BlasStatus(None, "no optimized BLAS found")
    return _status


def status() -> BlasStatus:
    """What :func:`preload` did (calls it if it has not run)."""
    return preload()


def warn_if_slow() -> None:
    """Warn once per process when MLX on Linux is left on its reference BLAS."""
    global _warned
    st = status()
    if _warned or st.library is not None or not sys.platform.startswith("linux"):
        return
    if st.reason == f"{ENV_VAR}=none":
        return
    _warned = True
    warnings.warn(
        f"metafn: MLX is using its slow reference BLAS ({st.reason}). {FIX_HINT}",
        BlasWarning,
        stacklevel=3,
    )


def loaded_blas_libraries() -> list[str]:
    """Shared libraries mapped into this process whose names look like a BLAS (Linux)."""
    try:
        with open("/proc/self/maps") as f:
            names = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return []
    keys = ("blas", "mkl_rt", "mkl_core")
    return sorted(n for n in names if any(k in os.path.basename(n).lower() for k in keys))
