"""Random affine image augmentation for meta-training episodes (numpy, on the host).

Each image gets its own small random similarity transform about the image centre: a rotation
by ``theta ~ U[-rotation, rotation]`` degrees, a scale ``s ~ U[1 - scale, 1 + scale]`` and a
shift ``t ~ U[-shift, shift]^2`` pixels. Output pixel ``p`` (coordinates relative to the centre
``c = ((H - 1) / 2, (W - 1) / 2)``) reads the input at

    q = R(theta)^T (p - t) / s + c

by bilinear interpolation, with zeros outside the image (the background of ink-on-zero
Omniglot images). ``theta = 0, s = 1, t = 0`` is the identity; an integer shift is a pure
translation; ``theta = 90`` on a square image is :func:`numpy.rot90`.

Augmentation draws new drawings of the same class, so it only ever applies to the meta-training
split: validation and test episodes are the data as they are.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["Augment", "affine_warp", "random_affine"]


class Augment(NamedTuple):
    """Ranges of the per-image random transform: ``rotation`` degrees, ``shift`` pixels,
    ``scale`` (relative, ``s`` in ``[1 - scale, 1 + scale]``). All zero is no augmentation."""

    rotation: float = 0.0
    shift: float = 0.0
    scale: float = 0.0

    def check(self) -> "Augment":
        """Returns ``self``; raises ``ValueError`` naming the field that is negative or not finite
        (and ``scale`` >= 1, which would allow a zero or negative scale)."""
        for name in self._fields:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"augment.{name}: expected a finite float >= 0, got {value!r}")
        if self.scale >= 1:
            raise ValueError(f"augment.scale: expected a float in [0, 1), got {self.scale!r}")
        return self

    @property
    def active(self) -> bool:
        return any(v > 0 for v in self)


def affine_warp(images: np.ndarray, theta_deg: np.ndarray, scale: np.ndarray,
                shift: np.ndarray) -> np.ndarray:
    """Warp each image by its own similarity transform (see the module docstring).

    images ``(N, H, W)`` float; theta_deg ``(N,)`` degrees counter-clockwise in array
    coordinates (row = y down, column = x right, as :func:`numpy.rot90`); scale ``(N,)`` > 0;
    shift ``(N, 2)`` pixels as (row, column). Returns ``(N, H, W)`` of the images' dtype.
    """
    if images.ndim != 3:
        raise ValueError(f"images: expected shape (N, H, W), got {images.shape}")
    n, h, w = images.shape
    theta = np.deg2rad(np.asarray(theta_deg, dtype=np.float64)).reshape(n, 1, 1)
    s = np.asarray(scale, dtype=np.float64).reshape(n, 1, 1)
    t = np.asarray(shift, dtype=np.float64).reshape(n, 2)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    py = np.arange(h, dtype=np.float64)[None, :, None] - cy - t[:, 0, None, None]
    px = np.arange(w, dtype=np.float64)[None, None, :] - cx - t[:, 1, None, None]
    cos, sin = np.cos(theta), np.sin(theta)
    # R(theta) rotates counter-clockwise as seen on screen (y down): (y, x) -> (c y - s x, s y + c x)
    # is clockwise there, so its transpose maps output to input for a counter-clockwise turn.
    sy = (cos * py + sin * px) / s + cy
    sx = (-sin * py + cos * px) / s + cx
    y0, x0 = np.floor(sy), np.floor(sx)
    wy, wx = sy - y0, sx - x0
    y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
    batch = np.arange(n)[:, None, None]
    out = np.zeros((n, h, w), dtype=np.float64)
    for dy, weight_y in ((0, 1.0 - wy), (1, wy)):
        for dx, weight_x in ((0, 1.0 - wx), (1, wx)):
            yi, xi = y0 + dy, x0 + dx
            inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
            pixel = images[batch, np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
            out += np.where(inside, weight_y * weight_x * pixel, 0.0)
    return out.astype(images.dtype)


def random_affine(rng: np.random.Generator, images: np.ndarray, augment: Augment) -> np.ndarray:
    """Apply an independent random transform of ranges ``augment`` to every image.

    images ``(..., H, W)`` float; returns the same shape and dtype. The transforms come from
    ``rng`` only, so the same generator state gives the same images.
    """
    augment.check()
    *lead, h, w = images.shape
    flat = images.reshape(-1, h, w)
    n = flat.shape[0]
    theta = rng.uniform(-augment.rotation, augment.rotation, n)
    scale = rng.uniform(1.0 - augment.scale, 1.0 + augment.scale, n)
    shift = rng.uniform(-augment.shift, augment.shift, (n, 2))
    return affine_warp(flat, theta, scale, shift).reshape(images.shape)
