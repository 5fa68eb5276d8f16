"""What every peer script shares: the same network and weights, the same normalisation, timing, output.

Peer scripts run in their own virtual environments (their packages conflict with geoseg's pins), so they
import nothing from geoseg: the model is rebuilt from the plain smp class and a safetensors state dict.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def arguments(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--scene", required=True)
    p.add_argument("--weights", required=True, help="safetensors state dict of the smp model")
    p.add_argument("--meta", required=True, help="JSON: architecture, encoder, kwargs, bands, classes, mean, std")
    p.add_argument("--out", required=True, help="class-id GeoTIFF to write")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    return p.parse_args()


def load(args: argparse.Namespace):
    """(model, meta): the smp network with the benchmark's weights, in eval mode, on the CPU."""
    import segmentation_models_pytorch as smp
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    meta = json.loads(open(args.meta).read())
    cls = getattr(smp, meta["smp_class"])
    model = cls(encoder_name=meta["encoder"], encoder_weights=None, in_channels=len(meta["mean"]),
                classes=len(meta["class_ids"]), **meta["kwargs"])
    model.load_state_dict(load_file(args.weights))
    model.eval()
    with torch.inference_mode():  # warm-up: one-off kernel set-up is not what the clock measures
        model(torch.zeros(min(args.batch, 2), len(meta["mean"]), args.tile, args.tile))
    return model, meta


def normaliser(meta: dict):
    """(bands, H, W) raw values -> float32 normalised exactly as geoseg does (band mean/std)."""
    mean = np.asarray(meta["mean"], np.float32)[:, None, None]
    std = np.asarray(meta["std"], np.float32)[:, None, None]
    return lambda x: (np.asarray(x, np.float32) - mean) / std


def write_classes(path: str, scene: str, index: np.ndarray, meta: dict) -> None:
    """Class ids (the model's ids, not channel indexes) on the scene's grid."""
    import rasterio

    ids = np.asarray(meta["class_ids"], np.uint8)[index]
    with rasterio.open(scene) as src:
        profile = {**src.profile, "count": 1, "dtype": "uint8", "nodata": 255, "tiled": True, "compress": "deflate"}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(ids, 1)


def report(t0: float, tiles: int, **extra) -> None:
    print(json.dumps({"seconds": time.perf_counter() - t0, "tiles": tiles, **extra}), flush=True)
