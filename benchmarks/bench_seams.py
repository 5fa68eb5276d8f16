"""Seams against their cost: stitched = full frame, per overlap and blend, next to the tiles they need.

The stitched prediction (exactly the tiling and blending of ``geoseg run``, computed in memory with
``geoseg.segment.predict_array``) is compared with one forward pass over the whole scene, on the valid
pixels, overall and near tile boundaries; the cost of each setting is the number of 512 px tiles a
2048^2 and a 4096^2 scene need (time is proportional to it). Precision: fp32, and bf16 with channels_last.

    python benchmarks/bench_seams.py models/demo.safetensors data/sample-test/scene.tif
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, control_malloc, machine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("scenes", type=Path, nargs="+")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlaps", type=int, nargs="+", default=[32, 64, 96, 128, 192])
    p.add_argument("--blends", nargs="+", default=["cosine", "crop"])
    args = p.parse_args()
    malloc = control_malloc(True)

    import rasterio
    import torch

    from geoseg.config import SegmentConfig
    from geoseg.grid import TileGrid
    from geoseg.models import build_model, load_checkpoint
    from geoseg.segment import predict_array

    spec, state = load_checkpoint(args.model)
    model = build_model(spec, state)
    mean, std = np.float32(spec.mean)[:, None, None], np.float32(spec.std)[:, None, None]
    print(f"machine: {machine()}\nmalloc: {malloc}\nmodel: {args.model} ({spec.architecture}-{spec.encoder}, "
          f"stride {spec.output_stride}); tile {args.tile}", flush=True)
    rows = []
    for precision in ("fp32", "bf16"):
        dtype = torch.bfloat16 if precision == "bf16" else None
        fmt = torch.channels_last if precision == "bf16" else torch.contiguous_format
        net = model.to(memory_format=fmt)

        def forward(x: np.ndarray, net=net, fmt=fmt, dtype=dtype) -> np.ndarray:  # noqa: ANN001
            t = torch.from_numpy(np.ascontiguousarray(x)).contiguous(memory_format=fmt)
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32,
                                                        enabled=dtype is not None):
                return torch.softmax(net(t).float(), 1).numpy()

        for scene in args.scenes:
            with rasterio.open(scene) as src:
                image, valid = src.read([b.index for b in spec.bands]).astype(np.float32), src.read_masks(1) > 0
            x = (image - mean) / std
            x[:, ~valid] = 0
            pad = [(0, 0), (0, (-x.shape[1]) % spec.output_stride), (0, (-x.shape[2]) % spec.output_stride)]
            full = np.concatenate([forward(t[None]) for t in [np.pad(x, pad, mode="reflect")]])[0]
            full = full[:, : x.shape[1], : x.shape[2]].argmax(0)
            for overlap in args.overlaps:
                for blend in args.blends:
                    cfg = SegmentConfig(model=args.model, tile={"size": args.tile, "overlap": overlap},
                                        stitch={"blend": blend})
                    stitched = predict_array(lambda b, f=forward: np.concatenate([f(b[k : k + 4]) for k in
                                                                                  range(0, len(b), 4)]),
                                             x, valid, spec, cfg)
                    same = (stitched == full) & valid
                    grid = TileGrid(*x.shape[1:], args.tile, overlap, 1)
                    near = np.zeros(valid.shape, bool)
                    for (i, j), _ in grid.chunk_windows():
                        for t in grid.tiles_of(i, j):  # core edges: where one tile hands over to the next
                            r0, c0 = int(t.core.row_off), int(t.core.col_off)
                            r1, c1 = r0 + int(t.core.height), c0 + int(t.core.width)
                            for r in (r0, r1):
                                near[max(r - 8, 0) : r + 8, c0:c1] = True
                            for c in (c0, c1):
                                near[r0:r1, max(c - 8, 0) : c + 8] = True
                    row = {"precision": precision, "scene": str(scene), "overlap": overlap, "blend": blend,
                           "agreement": float(same.sum() / valid.sum()),
                           "near_boundaries": float(same[near & valid].mean()),
                           "elsewhere": float(same[~near & valid].mean()),
                           "tiles_2048": int(np.prod(TileGrid(2048, 2048, args.tile, overlap, 3).tiles_shape)),
                           "tiles_4096": int(np.prod(TileGrid(4096, 4096, args.tile, overlap, 3).tiles_shape))}
                    rows.append(row)
                    print(f"{precision} {scene.parent.name:>12} overlap {overlap:>3} {blend:>6}: agreement "
                          f"{100 * row['agreement']:.3f}% (near tile edges {100 * row['near_boundaries']:.3f}%, "
                          f"elsewhere {100 * row['elsewhere']:.3f}%); tiles {row['tiles_2048']} at 2048^2, "
                          f"{row['tiles_4096']} at 4096^2", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "seams.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
