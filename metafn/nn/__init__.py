"""Pure layers and models as ``(init, apply)`` function pairs over parameter pytrees."""

from metafn.nn.mlp import dense_apply, dense_init, mlp_apply, mlp_init

__all__ = ["dense_init", "dense_apply", "mlp_init", "mlp_apply"]
