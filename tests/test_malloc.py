"""glibc malloc tuning at import: freed memory stays in the process, opt-out by environment."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# After ``import metafn``, malloc 64 MiB and count glibc's mmapped blocks (mallinfo2().hblks):
# with glibc's default threshold (<= 32 MiB) the block is a fresh mmap; raised to 1 GiB it is not.
PROBE = """
import ctypes, metafn
from metafn import _malloc
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblks
ptr = libc.malloc(64 << 20)
print(_malloc.status().tuned, libc.mallinfo2().hblks - before)
"""


def probe(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


@pytest.mark.skipif(not GLIBC, reason="the tuning only acts on glibc")
def test_import_raises_the_mmap_threshold():
    res = probe()
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "0"]


@pytest.mark.skipif(not GLIBC, reason="the tuning only acts on glibc")
def test_opt_out_keeps_glibc_defaults():
    res = probe(METAFN_MALLOC="default")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "1"]


def test_unknown_setting_is_a_clear_error():
    res = probe(METAFN_MALLOC="fast")
    assert res.returncode != 0
    assert "METAFN_MALLOC" in res.stderr and "'keep'" in res.stderr
