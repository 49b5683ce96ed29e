"""metafn: pure-function meta-learning and parameter-efficient fine-tuning on MLX.

Importing metafn first preloads an optimized BLAS (see :mod:`metafn._blas`) and only then imports
``mlx.core``; import metafn before mlx to get fast matmuls on Linux.
"""

from metafn import _blas

_blas.preload()

import mlx.core as _mx  # noqa: E402  (must come after the BLAS preload)

_blas.warn_if_slow()

from metafn import tree  # noqa: E402

__version__ = "0.1.0"
