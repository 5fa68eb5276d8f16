"""Chunked vectorization vs one rasterio.features.shapes call over the whole raster, in one run.

    python benchmarks/bench_vectorize.py --sizes 8192 16384

For each size: a land-cover raster with realistic patches (the sample generator's label map, written
window by window), then, each in its own child process so peak RSS is its own:
  geoseg    vectorize_classes on a LocalCluster of 2 workers x 1 thread, written to a GeoPackage
  baseline  read the raster whole, shapes(..., mask=) over it, build a GeoDataFrame (not written)
  baseline+gpkg  the same, then the GeoPackage geoseg writes (class names, area, perimeter, QGIS style)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, PeakRSS, control_malloc, machine  # noqa: E402


def make_labels(size: int) -> Path:
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from geoseg.sample import CLASSES, labels_window

    path = RESULTS / "data" / f"labels-only-{size}.tif"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.tif")
    with rasterio.open(tmp, "w", driver="GTiff", width=size, height=size, count=1, dtype="uint8", nodata=0,
                       crs="EPSG:32631", transform=from_origin(500000, 5000000, 10, 10), tiled=True,
                       compress="deflate", BIGTIFF="IF_SAFER") as dst:
        dst.update_tags(GEOSEG_CLASSES=json.dumps(CLASSES))
        for r0 in range(0, size, 2048):
            for c0 in range(0, size, 2048):
                w = Window(c0, r0, min(2048, size - c0), min(2048, size - r0))
                dst.write(labels_window(w, size, size, 0).astype(np.uint8), 1, window=w)
    tmp.rename(path)
    return path


def _import_libraries() -> None:
    """What the workers use."""
    import pyproj  # noqa: F401
    import rasterio.features  # noqa: F401
    import shapely  # noqa: F401

    import geoseg.vectorize  # noqa: F401


def run_geoseg(raster: str, out: str, block: int) -> dict:
    import pyogrio.raw  # noqa: F401  the client's imports, before the clock as the baseline's
    from distributed import Client, LocalCluster

    import geoseg.read  # noqa: F401
    from geoseg.config import VectorizeConfig
    from geoseg.vectorize import vectorize_classes

    with PeakRSS() as rss, LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(_import_libraries)  # the workers' imports, likewise
        t0 = time.perf_counter()
        info = vectorize_classes(Path(raster), Path(out), VectorizeConfig(block=block), client=client, overwrite=True)
        wall = time.perf_counter() - t0
    return {"seconds": wall, "peak_rss_gib": rss.peak / 2**30, "features": info["features"]}


def run_baseline(raster: str, out: str | None = None) -> dict:
    """The single call; with ``out``, also the same GeoPackage geoseg writes (names, area, perimeter, style)."""
    import geopandas as gpd
    import rasterio
    from rasterio.features import shapes
    from shapely.geometry import shape

    with PeakRSS() as rss:
        t0 = time.perf_counter()
        with rasterio.open(raster) as src:
            data, mask = src.read(1), src.read_masks(1) > 0
            transform, crs = src.transform, src.crs
            classes = json.loads(src.tags()["GEOSEG_CLASSES"])
        feats = [(shape(g), int(v)) for g, v in shapes(data, mask=mask, transform=transform)]
        gdf = gpd.GeoDataFrame({"class_id": [v for _, v in feats]}, geometry=[g for g, _ in feats], crs=crs)
        if out:
            import pyogrio

            from geoseg.classes import ClassMap
            from geoseg.vectorize import add_measures, qgis_vector_style, write_layer_style

            cmap = ClassMap.from_records(classes)
            gdf["class_name"] = [cmap.name_of(v) for v in gdf["class_id"]]
            gdf = add_measures(gdf)
            Path(out).unlink(missing_ok=True)
            pyogrio.write_dataframe(gdf, out, layer="landcover", driver="GPKG", promote_to_multi=True)
            write_layer_style(Path(out), "landcover", qgis_vector_style(cmap))
        wall = time.perf_counter() - t0
    return {"seconds": wall, "peak_rss_gib": rss.peak / 2**30, "features": len(gdf)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--block", type=int, default=2048)
    p.add_argument("--part", choices=["geoseg", "baseline", "baseline+gpkg"], help=argparse.SUPPRESS)
    p.add_argument("--raster", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--skip-baseline-above", type=int, default=16384)
    args = p.parse_args()
    if args.part:
        res = (run_geoseg(args.raster, args.out, args.block) if args.part == "geoseg" else
               run_baseline(args.raster, args.out if args.part == "baseline+gpkg" else None))
        print(json.dumps(res))
        return
    malloc = control_malloc(True)
    print(f"machine: {machine()}\nmalloc: {malloc}\nblock {args.block}, 2 workers x 1 thread")
    rows = {}
    for size in args.sizes:
        raster = make_labels(size)
        px = size * size
        row = {}
        parts = ["geoseg"] + (["baseline", "baseline+gpkg"] if size <= args.skip_baseline_above else [])
        for part in parts:
            cmd = [sys.executable, __file__, "--part", part, "--raster", str(raster), "--block", str(args.block),
                   "--out", str(RESULTS / "data" / f"vector-{size}.gpkg")]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                row[part] = {"error": done.stderr.strip().splitlines()[-1]}
                print(f"{size}: {part} failed: {row[part]['error']}")
                continue
            row[part] = json.loads(done.stdout.splitlines()[-1])
            r = row[part]
            print(f"{size}x{size} {part:13s}: {r['seconds']:.1f}s, {px / r['seconds'] / 1e6:.2f} MPix/s, "
                  f"peak RSS {r['peak_rss_gib']:.2f} GiB, {r['features']} polygons", flush=True)
        for base in ("baseline", "baseline+gpkg"):
            if "seconds" in row.get(base, {}) and "seconds" in row.get("geoseg", {}):
                assert row[base]["features"] == row["geoseg"]["features"], "polygon counts differ"
                print(f"  geoseg vs {base}: speed x{row[base]['seconds'] / row['geoseg']['seconds']:.2f}, "
                      f"RSS x{row['geoseg']['peak_rss_gib'] / row[base]['peak_rss_gib']:.2f}; same polygon count")
        rows[size] = row
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vectorize.json").write_text(json.dumps({"machine": machine(), "malloc": malloc, "sizes": rows},
                                                       indent=2))


if __name__ == "__main__":
    main()
