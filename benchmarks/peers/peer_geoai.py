"""geoai ``predict_geotiff``: rasterio windows, batches, cosine blending, its own accumulators."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _model import arguments, load, normaliser, report  # noqa: E402


def main() -> None:
    args = arguments(__doc__)
    import rasterio
    from geoai.inference import predict_geotiff

    model, meta = load(args)
    norm = normaliser(meta)
    ids = np.asarray(meta["class_ids"], np.uint8)
    t0 = time.perf_counter()
    predict_geotiff(model, args.scene, args.out, tile_size=args.tile, overlap=args.overlap, batch_size=args.batch,
                    input_bands=meta["bands"], num_classes=len(ids), output_dtype="uint8", output_nodata=255,
                    blend_mode="cosine", preprocess_fn=norm, postprocess_fn=lambda p: ids[p.argmax(0)][None],
                    device="cpu", verbose=False)
    with rasterio.open(args.scene) as src:
        h, w = src.height, src.width
    stride = args.tile - args.overlap
    tiles = len({(max(0, min(r + args.tile, h) - args.tile), max(0, min(c + args.tile, w) - args.tile))
                 for r in range(0, h, stride) for c in range(0, w, stride)})  # geoai's own tile list
    report(t0, tiles)


if __name__ == "__main__":
    main()
