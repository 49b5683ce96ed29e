"""Pure layers and models as ``(init, apply)`` function pairs over parameter pytrees."""

from metafn.nn.conv4 import (
    batch_norm, conv3x3, conv4_apply, conv4_batched_loss, conv4_embed, conv4_init, conv4_loss,
    conv4_task_embed, conv4_task_logits, conv4_task_losses, conv_block, max_pool_2x2,
)
from metafn.nn.mlp import dense_apply, dense_init, mlp_apply, mlp_init

__all__ = [
    "dense_init", "dense_apply", "mlp_init", "mlp_apply",
    "conv4_init", "conv4_apply", "conv4_embed", "conv4_loss", "conv4_task_embed",
    "conv4_task_logits", "conv4_task_losses", "conv4_batched_loss", "batch_norm", "max_pool_2x2",
    "conv3x3", "conv_block",
]
