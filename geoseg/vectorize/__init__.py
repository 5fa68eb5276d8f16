"""Vectorize stage: class-id raster -> polygons in a GeoPackage (or FlatGeobuf), block by block.

Each block is polygonized on a worker with :func:`rasterio.features.shapes` (``mask=`` skips nodata) in
*pixel* coordinates, so edges shared by two blocks have bit-identical coordinates. Polygons inside a block
leave the worker finished (CRS coordinates, area, perimeter, WKB). Those touching an inner block edge are
grouped on the client with their same-class neighbours across it (STR-tree + union-find; only these take
part, so memory stays bounded), and each group is unioned on a worker. The client only groups and writes.
The result is the set of polygons one ``shapes`` call over the whole raster gives.

This module drives the stage; its parts, in the order data flows: :mod:`.polygonize` (a block on a
worker), :mod:`.merge` (pieces across block edges), :mod:`.attributes` (coordinates, area, perimeter),
:mod:`.sinks` (GeoPackage/FlatGeobuf, GeoParquet) and :mod:`.styles` (QML, SLD, ``layer_styles``).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely

from geoseg._io import atomic_path, check_overwrite
from geoseg.classes import ClassMap
from geoseg.config import VectorizeConfig
from geoseg.errors import InputError, OutputWriteError
from geoseg.grid import RasterGrid, block_rows
from geoseg.vectorize.attributes import add_measures, features, measures, to_world
from geoseg.vectorize.merge import RowMerger, _balanced, union_groups
from geoseg.vectorize.polygonize import MAX_READ, min_area_pixels, polygonize_block, sieve_block, sieve_halo
from geoseg.vectorize.sinks import GPKG_VERSION, _OgrSink, _ParquetSink
from geoseg.vectorize.styles import gpkg_timestamp, qgis_vector_style, sld_vector_style, write_layer_style

if TYPE_CHECKING:
    from distributed import Client

    from geoseg.progress import Progress

__all__ = [
    "FORMATS", "GPKG_VERSION", "MAX_READ", "RowMerger", "add_measures", "block_rows", "features", "gpkg_timestamp",
    "measures", "min_area_pixels", "polygon_features", "polygonize_block", "qgis_vector_style", "sieve_block",
    "sieve_halo", "sld_vector_style", "style_sidecar", "to_world", "union_groups", "vectorize_classes",
    "write_layer_style",
]

log = logging.getLogger("geoseg")

_SCATTER_BYTES = 4 * 2**20
"""Union groups larger than this (WKB bytes) are scattered to the workers before they are submitted."""


def polygon_features(raster: str, cfg: VectorizeConfig, grid: RasterGrid, *, min_area: int | None = None,
                     client: Client | None = None, lookahead: int = 2,
                     on_row: Callable[[int], None] | None = None) -> Iterator[dict]:
    """The raster's polygons as finished :func:`features` batches, block row by block row.

    Together they are the polygons of one ``shapes`` call over the whole raster. ``lookahead`` rows are
    polygonized ahead, and the polygons merged across block edges are unioned (:func:`union_groups`), on
    the Dask ``client``'s workers when given, else on local threads, while the caller consumes a batch.
    The batches come in a fixed order (block rows, then each row's merged polygons one row later, in the
    order they were grouped), whatever the timing or the number of workers.
    """
    import dask

    from geoseg.cluster import local_pool, map_in_order

    min_area = min_area_pixels(cfg, grid) if min_area is None else min_area
    sieve_halo(min_area, cfg.block)  # refused here, before any task runs
    rows = block_rows(grid.height, grid.width, cfg.block)
    tasks = [[dask.delayed(polygonize_block, pure=False)(raster, w, min_area, cfg, grid) for w in row]
             for row in rows]
    merger = RowMerger(cfg.connectivity, grid.height)
    unions: deque = deque()  # per row that completed groups: [(future of union_groups, group indexes)]
    local = local_pool() if client is None else None
    parts = 2 if client is None else max(1, sum(client.nthreads().values()))

    def submit_union(groups: list) -> None:
        # Split so that the last row's unions, the largest, run on every worker at once.
        row: list[tuple[Any, np.ndarray]] = []
        for part, index in _balanced(groups, parts):
            if client is None:
                assert local is not None
                row.append((local.submit(union_groups, part, grid), index))
                continue
            if sum(len(w) for pieces, _ in part for w in pieces) > _SCATTER_BYTES:
                # Scattered when large (a scene-wide polygon): Dask warns about big task arguments.
                [part] = client.scatter([part], hash=False)
            row.append((client.submit(union_groups, part, grid, pure=False, priority=1), index))
        unions.append(row)

    def merged(keep: int) -> Iterator[dict]:
        """The merged polygons of all but the last ``keep`` rows, each row's in its groups' order."""
        while len(unions) > keep:
            row = unions.popleft()
            if client is not None:
                from geoseg.cluster import completed

                for _ in completed(client, [fut for fut, _ in row]):  # bounded, as every wait on the cluster
                    pass
            done = [(fut.result(), index) for fut, index in row]
            if local is None:
                for fut, _ in row:
                    fut.release()
            order = np.argsort(np.concatenate([index for _, index in done]), kind="stable")
            yield {k: np.concatenate([feats[k] for feats, _ in done])[order] for k in done[0][0]}

    try:
        for row, results in zip(rows, map_in_order(tasks, client, lookahead)):
            if on_row is not None:
                on_row(len(row))
            groups = merger.add_row(int(row[0].row_off + row[0].height), [b for _, border in results for b in border])
            if groups:
                submit_union(groups)
            yield from (feats for feats, _ in results)
            yield from merged(keep=1)  # a row later: its unions ran while this row was polygonized
        yield from merged(keep=0)
    finally:
        if local is not None:
            local.shutdown(wait=True, cancel_futures=True)


#: Vector formats by extension: their OGR driver, and whether batches can be appended as they come.
FORMATS = {".gpkg": "GPKG", ".fgb": "FlatGeobuf", ".parquet": "Parquet"}


def style_sidecar(output: Path) -> Path | None:
    """The ``.qml`` QGIS loads beside a vector file (FlatGeobuf, GeoParquet); a GeoPackage holds its own."""
    return None if output.suffix.lower() == ".gpkg" else output.with_suffix(".qml")


def vectorize_classes(raster: Path, output: Path, cfg: VectorizeConfig | None = None, *,
                      client: Client | None = None, overwrite: bool = False,
                      timestamp: datetime | None = None, progress: Progress | None = None) -> dict:
    """Polygonize a class-id GeoTIFF into ``output``: GeoPackage, FlatGeobuf or GeoParquet by extension.

    Blocks run on the Dask ``client`` when given, else on local threads; polygons are written in batches
    in a fixed order, so the same raster gives the same file. The class colours go with it: as the
    GeoPackage's default style (QML and SLD in ``layer_styles``), else as a ``.qml`` beside the file.
    ``timestamp`` (default now) is the GeoPackage's change time. Returns counts and paths.
    """
    from geoseg import _faults
    from geoseg.read import open_raster

    cfg = cfg if cfg is not None else VectorizeConfig()
    output = Path(output)
    if not output.parent.is_dir():
        raise OutputWriteError(f"{output}: folder {output.parent} does not exist")
    driver = FORMATS.get(output.suffix.lower())
    if driver is None:
        raise InputError(f"{output}: unsupported vector format; use .gpkg, .fgb or .parquet")
    sidecar = style_sidecar(output)
    if sidecar is not None:
        check_overwrite(sidecar, overwrite)
    with open_raster(raster) as src:
        if src.crs is None:
            raise InputError(f"{raster}: has no CRS; polygons would not be georeferenced")
        if np.dtype(src.dtypes[0]).kind not in "iu":
            raise InputError(f"{raster}: class rasters must hold integers, not {src.dtypes[0]}")
        grid = RasterGrid.of(src)
        raw = src.tags().get("GEOSEG_CLASSES")
    classes = ClassMap.from_records(json.loads(raw)) if raw else ClassMap(())
    # FlatGeobuf cannot append, and simplification needs the whole coverage: those are written at the end.
    streaming = driver != "FlatGeobuf" and cfg.simplify <= 0
    min_area = min_area_pixels(cfg, grid)
    pending: list[dict] = []
    count = 0
    with atomic_path(output, overwrite=overwrite) as tmp:
        sink = _ParquetSink(tmp, grid) if driver == "Parquet" else _OgrSink(tmp, driver, cfg.layer, grid)

        def write(batches: list[dict]) -> None:
            feats = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]} if batches else \
                features(np.empty(0, dtype=object), [], grid)  # an all-nodata raster: a valid, empty layer
            if cfg.simplify > 0 and len(feats["wkb"]):
                geoms = shapely.coverage_simplify(shapely.from_wkb(feats["wkb"]), cfg.simplify)
                feats["area_m2"], feats["perimeter_m"] = measures(geoms, grid.crs)
                feats["wkb"] = shapely.to_wkb(geoms)
            feats["class_name"] = np.array([classes.name_of(int(v)) for v in feats["class_id"]], dtype=object)
            sink.write(feats)
            _faults.point("vectorize")  # a layer half written

        n_blocks = sum(map(len, block_rows(grid.height, grid.width, cfg.block)))
        with progress.stage("vectorizing", n_blocks, "blocks") if progress else nullcontext() as stage:
            for feats in polygon_features(str(raster), cfg, grid, min_area=min_area, client=client,
                                          on_row=stage.advance if stage else None):
                count += len(feats["wkb"])
                if len(feats["wkb"]):
                    pending.append(feats)
                if streaming and sum(len(b["wkb"]) for b in pending) >= 20_000:
                    write(pending)
                    pending = []
        if pending or not sink.written:
            write(pending)
        sink.close()
        if driver == "GPKG":
            write_layer_style(tmp, cfg.layer, qgis_vector_style(classes), timestamp, sld=sld_vector_style(classes))
    styles = None
    if sidecar is not None:
        with atomic_path(sidecar, overwrite=True) as tmp:
            tmp.write_text(qgis_vector_style(classes))
        styles = str(sidecar)
    blocks = sum(map(len, block_rows(grid.height, grid.width, cfg.block)))
    return {"path": str(output), "features": count, "blocks": blocks, "style": styles}
