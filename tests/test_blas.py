"""The BLAS preload: found and used, overridable, and a single clear warning when it cannot act."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import metafn
import pytest

from metafn import _blas


def run_py(code: str, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                          timeout=120, env=full_env)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preload only acts on Linux")
def test_a_fast_blas_is_loaded_in_the_test_process():
    st = _blas.status()
    assert st.library is not None, f"no optimized BLAS: {st.reason}. {_blas.FIX_HINT}"
    assert os.path.realpath(st.library) in {os.path.realpath(p) for p in _blas.loaded_blas_libraries()} \
        or any(os.path.basename(st.library).split(".")[0] in p for p in _blas.loaded_blas_libraries())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preload only acts on Linux")
def test_importing_mlx_first_warns_once_with_the_fix():
    res = run_py("import mlx.core, warnings\nimport metafn\nfrom metafn import _blas\n_blas.warn_if_slow()\n")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("BlasWarning") == 1
    assert "mlx.core was imported before metafn" in res.stderr and "libopenblas0-pthread" in res.stderr


def test_env_override_to_a_missing_library_is_a_clear_error():
    res = run_py("import metafn", METAFN_BLAS="/nonexistent/libfoo.so")
    if not sys.platform.startswith("linux"):
        pytest.skip("override only read on Linux")
    assert res.returncode != 0 and "METAFN_BLAS='/nonexistent/libfoo.so'" in res.stderr


def test_env_none_keeps_reference_blas_without_warning():
    res = run_py("import metafn\nfrom metafn import _blas\nprint(_blas.status().reason)", METAFN_BLAS="none")
    assert res.returncode == 0 and "BlasWarning" not in res.stderr
    if sys.platform.startswith("linux"):
        assert res.stdout.strip() == "METAFN_BLAS=none"


def test_info_reports_blas_and_a_measured_rate():
    res = subprocess.run([sys.executable, "-m", "metafn.cli", "info", "--json", "--n", "256"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["mlx"] and info["gemm_256_float32_gflops"] > 0
    assert info["blas_preloaded"] == _blas.status().library
