"""Boundary refinement: an edge-aware guided filter of the class probabilities, steered by the image.

Each class probability map is filtered with the guided filter of He, Sun and Tang (2013): inside every
``(2r + 1)``-pixel window the output is a linear function of the guide (the mean of the normalised bands),
so probability edges snap to image edges while flat areas are smoothed. Nodata and unpredicted pixels take
no part (every window mean is normalised by the count of valid pixels in it).

Why not a dense CRF: pydensecrf and its forks need a compiler (no wheels for Python 3.10-3.12), and the
mean-field CRF costs several times the guided filter. Why not ``scipy.ndimage.uniform_filter``: its
running sum rounds differently depending on where a pixel sits in the array, so a chunk with its halo would
not give the same bits as the whole scene. :func:`box_sum` adds every window in one fixed order per pixel;
a pixel's result depends on the pixels within ``2r`` of it only, so a chunk read with a halo of ``2r``
gives exactly the whole-scene result.
"""

from __future__ import annotations

import numpy as np


def halo(radius: int) -> int:
    """Pixels around a window a refined result depends on: two box filters of ``radius``."""
    return 2 * radius


def _run_sum(a: np.ndarray, n: int, axis: int) -> np.ndarray:
    """``out[i] = a[i] + ... + a[i + n - 1]`` along ``axis``, each sum formed in the same order for every ``i``.

    Power-of-two partial sums (doubling), combined in the order of the bits of ``n``: log2(n) adds per
    element instead of n.
    """
    a = np.moveaxis(a, axis, 0)
    length = a.shape[0] - n + 1
    out, start, power, size = None, 0, a, 1
    while True:
        if n & size:
            piece = power[start : start + length]
            out = piece.copy() if out is None else out + piece
            start += size
        if size * 2 > n:
            break
        power = power[:-size] + power[size:]
        size *= 2
    assert out is not None
    return np.moveaxis(out, 0, axis)


def box_sum(a: np.ndarray, radius: int) -> np.ndarray:
    """Sum over the ``(2 radius + 1)``-pixel square around each pixel of the last two axes (zeros outside)."""
    pad = [(0, 0)] * (a.ndim - 2) + [(radius, radius), (radius, radius)]
    n = 2 * radius + 1
    return _run_sum(_run_sum(np.pad(a, pad), n, a.ndim - 2), n, a.ndim - 1)


def guide_image(x: np.ndarray) -> np.ndarray:
    """The guide: the mean of the normalised bands ``x`` (bands, H, W), summed band by band in order."""
    g = x[0].astype(np.float32, copy=True)
    for b in range(1, x.shape[0]):
        g += x[b]
    return g / np.float32(x.shape[0])


def guided_filter(p: np.ndarray, guide: np.ndarray, mask: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """Class probabilities ``p`` (classes, H, W) filtered under ``guide`` (H, W); ``mask``: the pixels that count.

    Returns probabilities (clipped at 0, summing to 1 where ``mask``); pixels outside ``mask`` are 0.
    """
    m = mask.astype(np.float32)
    g = guide.astype(np.float32) * m
    count = box_sum(m, radius)
    inv = np.where(count > 0, 1.0 / np.maximum(count, 1), 0).astype(np.float32)
    mean_g = box_sum(g, radius) * inv
    var_g = box_sum(g * g, radius) * inv - mean_g * mean_g
    pm = p.astype(np.float32) * m
    mean_p = box_sum(pm, radius) * inv
    cov = box_sum(pm * g, radius) * inv - mean_g * mean_p
    a = cov / (np.maximum(var_g, 0) + np.float32(eps))
    b = mean_p - a * mean_g
    q = (box_sum(a * m, radius) * guide + box_sum(b * m, radius)) * inv
    q = np.maximum(q, 0) * m
    total = q.sum(axis=0)
    return np.where(total > 0, q / np.where(total > 0, total, 1), 0).astype(np.float32)
