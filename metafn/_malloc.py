"""Keep freed memory in the process on glibc (Linux), so MLX's CPU buffers are reused warm.

MLX's CPU allocator keeps no buffer cache: every array is a fresh ``malloc``, and glibc serves
requests above ``M_MMAP_THRESHOLD`` (128 KiB to 32 MiB, adaptive) with a new ``mmap``, whose
zero-filled pages fault in again on first touch, and returns freed heap tops to the kernel above
``M_TRIM_THRESHOLD``. A conv4 meta-step allocates and frees hundreds of such buffers; measured
here (``bench/README.md``; ``metafn bench --config configs/omniglot_protonet.yaml`` with and
without ``METAFN_MALLOC=default``), raising both thresholds cut a ProtoNet conv4 step's CPU time
by 41% and a second-order MAML conv4 step's by 19%; the ProtoNet training step ran ~1.8x faster.

:func:`tune` sets ``mallopt(M_MMAP_THRESHOLD, 1 GiB)`` and ``mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)``
once, at ``import metafn``. The cost is memory that stays mapped after it is freed (the
process's high-water mark, not its sum). ``METAFN_MALLOC=default`` leaves glibc's defaults;
other C libraries (macOS, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import NamedTuple

__all__ = ["ENV_VAR", "MallocStatus", "tune", "status"]

ENV_VAR = "METAFN_MALLOC"
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 2**31 - 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>


class MallocStatus(NamedTuple):
    """Whether the thresholds were raised, and why (``reason``)."""

    tuned: bool
    reason: str


_status: MallocStatus | None = None


def tune() -> MallocStatus:
    """Raise glibc's mmap and trim thresholds once per process (see the module docstring)."""
    global _status
    if _status is not None:
        return _status
    choice = os.environ.get(ENV_VAR, "").strip().lower()
    if choice not in ("", "keep", "default"):
        raise ValueError(f"{ENV_VAR}: expected 'keep' (the default) or 'default', got {choice!r}")
    if choice == "default":
        _status = MallocStatus(False, f"{ENV_VAR}=default: glibc's thresholds left as they are")
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _status = MallocStatus(False, "not glibc: nothing to do")
    else:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        _status = MallocStatus(bool(ok), "mmap_threshold=1GiB trim_threshold=2GiB" if ok
                               else "mallopt refused the thresholds; glibc defaults in use")
    return _status


def status() -> MallocStatus:
    """The result of :func:`tune` (calling it if it has not run)."""
    return tune()
