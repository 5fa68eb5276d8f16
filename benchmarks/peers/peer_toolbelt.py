"""pytorch-toolbelt's tiler: ``ImageSlicer`` splits the scene, ``TileMerger`` blends the tiles back."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _model import arguments, load, normaliser, report, write_classes  # noqa: E402


def main() -> None:
    args = arguments(__doc__)
    import rasterio
    import torch
    from pytorch_toolbelt.inference.tiles import ImageSlicer, TileMerger

    model, meta = load(args)
    norm = normaliser(meta)
    t0 = time.perf_counter()
    with rasterio.open(args.scene) as src:
        image = norm(src.read(meta["bands"])).transpose(1, 2, 0)  # the slicer works on H x W x C
    slicer = ImageSlicer(image.shape, tile_size=args.tile, tile_step=args.tile - args.overlap, weight="pyramid")
    merger = TileMerger(slicer.target_shape, len(meta["class_ids"]), slicer.weight)
    tiles = [t.transpose(2, 0, 1) for t in slicer.split(image)]
    for s in range(0, len(tiles), args.batch):
        batch = torch.from_numpy(np.ascontiguousarray(np.stack(tiles[s : s + args.batch])))
        with torch.inference_mode():
            merger.integrate_batch(torch.softmax(model(batch), 1), slicer.crops[s : s + args.batch])
    merged = merger.merge().numpy()  # C x H x W
    index = slicer.crop_to_orignal_size(merged.transpose(1, 2, 0)).argmax(-1)
    write_classes(args.out, args.scene, index, meta)
    report(t0, len(tiles))


if __name__ == "__main__":
    main()
