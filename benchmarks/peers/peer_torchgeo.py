"""TorchGeo: a ``RasterDataset`` over the scene, ``GridGeoSampler`` chips, a ``DataLoader``, then stitching.

TorchGeo leaves stitching to the user; this does what its docs suggest: chips overlap by ``overlap`` pixels
and their softmax scores are averaged into a scene-sized array, then the argmax is written.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _model import arguments, load, normaliser, report, write_classes  # noqa: E402


def _bounds(query) -> tuple[float, float, float, float]:  # noqa: ANN001
    """(xmin, xmax, ymin, ymax) of a sample's bounds: slices (TorchGeo 0.8+) or a BoundingBox (earlier)."""
    if isinstance(query, tuple | list):
        x, y = query[0], query[1]
        return float(x.start), float(x.stop), float(y.start), float(y.stop)
    return float(query.minx), float(query.maxx), float(query.miny), float(query.maxy)


def main() -> None:
    args = arguments(__doc__)
    import rasterio
    import torch
    from torch.utils.data import DataLoader
    from torchgeo.datasets import RasterDataset, stack_samples
    from torchgeo.samplers import GridGeoSampler

    model, meta = load(args)
    norm = normaliser(meta)
    scene = Path(args.scene)

    class Scene(RasterDataset):
        filename_glob = scene.name
        is_image = True

    t0 = time.perf_counter()
    with rasterio.open(scene) as src:
        h, w, transform = src.height, src.width, src.transform
    dataset = Scene(paths=str(scene.parent))
    sampler = GridGeoSampler(dataset, size=args.tile, stride=args.tile - args.overlap)
    loader = DataLoader(dataset, batch_size=args.batch, sampler=sampler, collate_fn=stack_samples, num_workers=0)
    sums = np.zeros((len(meta["class_ids"]), h, w), np.float32)
    hits = np.zeros((h, w), np.float32)
    tiles = 0
    for batch in loader:
        x = np.stack([norm(img.numpy()[[b - 1 for b in meta["bands"]]]) for img in batch["image"]])
        with torch.inference_mode():
            probs = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
        for p, query in zip(probs, batch["bounds"]):
            xmin, _, _, ymax = _bounds(query)
            c0 = int(round((xmin - transform.c) / transform.a))
            r0 = int(round((ymax - transform.f) / transform.e))
            rr0, cc0 = max(r0, 0), max(c0, 0)
            rr1, cc1 = min(r0 + p.shape[1], h), min(c0 + p.shape[2], w)
            sums[:, rr0:rr1, cc0:cc1] += p[:, rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0]
            hits[rr0:rr1, cc0:cc1] += 1
            tiles += 1
    write_classes(args.out, str(scene), (sums / np.maximum(hits, 1)).argmax(0), meta)
    report(t0, tiles)


if __name__ == "__main__":
    main()
