"""A Dask worker preload for bench_scale.py: inference by a stand-in "GPU" of fixed cost per tile.

``dask worker --preload benchmarks/_standin.py``: the worker's predictors keep their real normalisation,
tiling, blending and stitching, but a forward pass sleeps ``GEOSEG_STANDIN_MS`` milliseconds per tile
(releasing the GIL, as a GPU kernel does) and returns plausible class scores: a softmax of fixed linear
functions of the bands, smooth where the image is smooth, so the stitched map and its polygons look like
a land-cover map's.
"""

from __future__ import annotations

import os
import time

import numpy as np


def dask_setup(worker) -> None:  # noqa: ANN001, ARG001 - Dask's preload hook
    import geoseg.segment.predict as predict
    import geoseg.segment.tasks as tasks

    cost = float(os.environ.get("GEOSEG_STANDIN_MS", "20")) / 1000

    class StandIn(predict.Predictor):
        def predict(self, tiles, batch_size=2, tta="none", threads=None, done=None):  # noqa: ANN001, ANN201, ARG002
            n, bands = tiles.shape[:2]
            time.sleep(cost * n)
            rng = np.random.default_rng(0)
            k = len(self.spec.classes)
            w = rng.normal(size=(k, bands)).astype(np.float32)
            logits = np.einsum("kb,nbhw->nkhw", w, tiles, optimize=True)
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            if done is not None:
                done(n)
            return p.astype(np.float32)

    def get_standin(key):  # noqa: ANN001, ANN202
        with predict._LOCK:
            if key not in predict._MODELS:
                predict._MODELS[key] = StandIn(key)
            return predict._MODELS[key]

    tasks.get_predictor = get_standin
