"""metafn: pure-function meta-learning and parameter-efficient fine-tuning on MLX.

Importing metafn first preloads an optimized BLAS (see :mod:`metafn._blas`) and only then imports
``mlx.core``; import metafn before mlx to get fast matmuls on Linux. On glibc it also keeps freed
memory in the process (:mod:`metafn._malloc`), which MLX's CPU buffers reuse.

Everything is a pure function over parameter pytrees (nested dicts / lists of ``mx.array``)::

    import metafn
    import mlx.core as mx

    family = metafn.tasks.sine()
    episodes = metafn.sample_episodes(mx.random.key(0), family, n_tasks=25, k_shot=5, n_query=10)
    params = metafn.nn.mlp_init(mx.random.key(1), [1, 40, 40, 1])
    loss_fn = metafn.losses.mse_loss(metafn.nn.mlp_apply)
    loss, grads = metafn.maml_outer(loss_fn, params, episodes, inner_lr=0.01, steps=1)
"""

from metafn import _blas, _malloc

_blas.preload()
_malloc.tune()

import mlx.core as _mx  # noqa: E402,F401  (must come after the BLAS preload)

_blas.warn_if_slow()

from metafn import losses, nn, optim, random, tasks, tree  # noqa: E402
from metafn.inner import adapt, inner_update  # noqa: E402
from metafn.outer import (  # noqa: E402
    BatchedLoss, LSLRParams, MetaSGDParams, batched_adapt, fomaml_outer, lslr_init, lslr_outer,
    lslr_rates, lslr_steps, maml_outer, metasgd_init, metasgd_outer, protonet_logits,
    protonet_outer, reptile_grad, soft_kmeans_logits, reptile_outer, task_batched, vmap_tasks,
)
from metafn.tasks import Episode, sample_episode, sample_episodes  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "losses", "nn", "optim", "random", "tasks", "tree",
    "adapt", "inner_update", "BatchedLoss", "MetaSGDParams", "batched_adapt", "fomaml_outer",
    "maml_outer", "metasgd_init", "metasgd_outer", "LSLRParams", "lslr_init", "lslr_outer",
    "lslr_rates", "lslr_steps", "protonet_logits", "protonet_outer", "soft_kmeans_logits",
    "reptile_grad", "reptile_outer", "task_batched", "vmap_tasks",
    "Episode", "sample_episode", "sample_episodes", "__version__",
]
