"""Vectorize stage: class-id raster -> polygons in a GeoPackage (or FlatGeobuf), block by block.

Each block is polygonized with :func:`rasterio.features.shapes` (``mask=`` skips nodata) in *pixel*
coordinates, so edges shared by two blocks have bit-identical coordinates. Polygons that touch an inner
block edge are merged with their same-class neighbours across it (STR-tree + union-find; only these take
part, so memory stays bounded), then every geometry is mapped to the raster's CRS with its affine
transform. The result is the set of polygons one ``shapes`` call over the whole raster gives.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import shapely
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from geoseg._io import atomic_path
from geoseg.classes import ClassMap
from geoseg.errors import InputError

log = logging.getLogger("geoseg")


@dataclass(frozen=True)
class VectorizeOptions:
    """What to vectorize and how (see ``VectorizeConfig`` for the YAML keys)."""

    layer: str = "landcover"
    connectivity: int = 4
    min_area_px: int = 0
    """Minimum mapping unit in pixels: smaller patches take the majority class around them."""
    simplify: float = 0.0
    """Topology-preserving simplification tolerance in CRS units (0: none)."""
    block: int = 2048


# ----------------------------------------------------------------------------------------------- raster side


def sieve_block(data: np.ndarray, valid: np.ndarray, min_area: int, connectivity: int) -> np.ndarray:
    """Replace patches smaller than ``min_area`` pixels by the most common class on their outer edge.

    A single pass with a local rule (deviating from GDAL's iterative ``sieve``, which merges into the
    largest neighbour polygon: how large a neighbour is depends on how much of it a block sees, so that
    rule cannot be made seamless block by block). With a halo of ``2 * min_area + 2`` pixels every block
    decides exactly as a whole-raster pass would.
    """
    from scipy import ndimage

    if min_area <= 1:
        return data
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels = np.zeros(data.shape, dtype=np.int64)
    offset = 0
    for value in np.unique(data[valid]):
        lab, n = ndimage.label((data == value) & valid, structure=structure)
        labels[lab > 0] = lab[lab > 0] + offset
        offset += n
    if offset == 0:
        return data
    sizes = np.bincount(labels.ravel(), minlength=offset + 1)
    small = (sizes < min_area) & (np.arange(offset + 1) > 0)
    is_small = small[labels]
    if not is_small.any():
        return data
    # Votes: (small patch label, class of a 4-neighbour pixel that belongs to a large patch).
    n_values = int(data.max()) + 1
    votes = np.zeros((offset + 1) * n_values, dtype=np.int64)
    for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        src = (slice(max(dr, 0), data.shape[0] + min(dr, 0)), slice(max(dc, 0), data.shape[1] + min(dc, 0)))
        dst = (slice(max(-dr, 0), data.shape[0] + min(-dr, 0)), slice(max(-dc, 0), data.shape[1] + min(-dc, 0)))
        here, there = labels[dst], labels[src]
        pick = is_small[dst] & valid[src] & ~is_small[src] & (there > 0)
        np.add.at(votes, here[pick] * n_values + data[src][pick].astype(np.int64), 1)
    votes = votes.reshape(offset + 1, n_values)
    winner = votes.argmax(1)
    has_vote = votes.max(1) > 0
    out = data.copy()
    replace = is_small & has_vote[labels]
    out[replace] = winner[labels[replace]].astype(data.dtype)
    return out


def _read_block(path: str, window: Window, halo: int, opts: VectorizeOptions) -> tuple[np.ndarray, np.ndarray]:
    import rasterio
    from rasterio.enums import MaskFlags

    with rasterio.open(path) as src:
        r0, c0 = int(window.row_off) - halo, int(window.col_off) - halo
        r1, c1 = int(window.row_off + window.height) + halo, int(window.col_off + window.width) + halo
        rr0, cc0, rr1, cc1 = max(r0, 0), max(c0, 0), min(r1, src.height), min(c1, src.width)
        ext = Window(cc0, rr0, cc1 - cc0, rr1 - rr0)
        data = src.read(1, window=ext)
        if src.mask_flag_enums[0] == [MaskFlags.nodata]:
            valid = data != src.nodata  # what GDAL's mask would say, without decoding the block again
        else:
            valid = src.read_masks(1, window=ext) > 0
    if not halo:
        return data, valid
    data = sieve_block(data, valid, opts.min_area_px, opts.connectivity)
    tr, tc = int(window.row_off) - rr0, int(window.col_off) - cc0
    core = (slice(tr, tr + int(window.height)), slice(tc, tc + int(window.width)))
    return data[core], valid[core]


def polygonize_block(path: str, window: Window, halo: int, opts: VectorizeOptions, n_rows: int,
                     n_cols: int) -> tuple[list, list]:
    """Polygons of one block in pixel coordinates, split into (inner, touching an inner block edge).

    Each item is ``(wkb, class_id)``.
    """
    from rasterio.features import shapes

    data, valid = _read_block(path, window, halo, opts)
    r0, c0 = int(window.row_off), int(window.col_off)
    r1, c1 = r0 + int(window.height), c0 + int(window.width)
    with warnings.catch_warnings():  # pixel coordinates on purpose: the first block's transform is the identity
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        found = list(shapes(data, mask=valid, connectivity=opts.connectivity, transform=Affine.translation(c0, r0)))
    if not found:
        return [], []
    polys = np.empty(len(found), dtype=object)
    polys[:] = [shapely.geometry.shape(geom) for geom, _ in found]
    values = np.array([int(v) for _, v in found])
    bad = ~shapely.is_valid(polys)
    if bad.any():  # 8-connected pixels give rings that touch themselves (OGC-invalid)
        polys[bad] = shapely.make_valid(polys[bad])
    minx, miny, maxx, maxy = shapely.bounds(polys).T
    touches = (((minx == c0) & (c0 > 0)) | ((maxx == c1) & (c1 < n_cols)) | ((miny == r0) & (r0 > 0))
               | ((maxy == r1) & (r1 < n_rows)))
    wkb, values = shapely.to_wkb(polys).tolist(), values.tolist()
    return ([(w, v) for w, v, t in zip(wkb, values, touches) if not t],
            [(w, v) for w, v, t in zip(wkb, values, touches) if t])


# ----------------------------------------------------------------------------------------------- merging


def merge_border_polygons(items: list[tuple[shapely.Geometry | bytes, int]],
                          connectivity: int) -> list[tuple[shapely.Geometry, int]]:
    """Union same-class polygons connected across block edges (STR-tree candidates, union-find groups)."""
    if not items:
        return []
    raw = [g for g, _ in items]
    geoms = shapely.from_wkb(raw) if isinstance(raw[0], bytes) else np.asarray(raw, dtype=object)
    values = np.array([v for _, v in items])
    parent = np.arange(len(geoms))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    tree = shapely.STRtree(geoms)
    left, right = tree.query(geoms)  # bounding boxes only: cheap, then exact tests on same-class pairs
    keep = (left < right) & (values[left] == values[right])
    left, right = left[keep], right[keep]
    if len(left):
        shapely.prepare(geoms)
        # 4-connected: they share an edge (boundaries meet in a line); 8-connected: a corner is enough.
        pattern = "F***1****" if connectivity == 4 else "F***T****"
        touch = shapely.relate_pattern(geoms[left], geoms[right], pattern)
        left, right = left[touch], right[touch]
    for a, b in zip(left, right):
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(len(geoms)):
        groups.setdefault(find(i), []).append(i)
    out = []
    for members in groups.values():
        geom = geoms[members[0]] if len(members) == 1 else shapely.union_all(geoms[members])
        # Drop the collinear vertices left where block edges were, as a single shapes() call has none.
        geom = shapely.simplify(geom, 0.0, preserve_topology=False)
        out.append((geom, int(values[members[0]])))
    return out


class RowMerger:
    """Merges the border polygons of block rows, top to bottom, as the rows arrive.

    Polygons of a row that touch a block edge are merged with each other and with the polygons carried
    from the rows above. A merged polygon that does not reach the row's bottom edge can grow no more and is
    final; one that does is carried to the next row. Only polygons on one row edge are ever held, so memory
    follows the raster's width, not its area.
    """

    def __init__(self, connectivity: int, n_rows: int):
        self.connectivity, self.n_rows = connectivity, n_rows
        self.carried: list[tuple[shapely.Geometry, int]] = []

    def add_row(self, bottom: int, border: list[tuple[bytes, int]]) -> list[tuple[shapely.Geometry, int]]:
        """Final polygons after adding a row ending at pixel row ``bottom`` (its border polygons' WKB, class)."""
        items = self.carried + [(shapely.from_wkb(w), v) for w, v in border]
        merged = merge_border_polygons(items, self.connectivity)
        final, self.carried = [], []
        for geom, value in merged:
            reaches_next = bottom < self.n_rows and shapely.bounds(geom)[3] == bottom
            (self.carried if reaches_next else final).append((geom, value))
        return final


# ----------------------------------------------------------------------------------------------- attributes


def _frame(geoms: list, values: list[int], crs, transform: Affine, classes: ClassMap):  # noqa: ANN001, ANN202
    import geopandas as gpd

    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    pixel = np.asarray(geoms, dtype=object)
    world = shapely.transform(pixel, lambda xy: np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c,
                                                                  d * xy[:, 0] + e * xy[:, 1] + f]))
    if e > 0 or a < 0:  # a flipped grid reverses ring orientation; keep polygons valid and oriented
        world = shapely.orient_polygons(world)
    gdf = gpd.GeoDataFrame({"class_id": np.asarray(values, dtype=np.int32),
                            "class_name": [classes.name_of(v) for v in values]}, geometry=world, crs=crs)
    return gdf


def add_measures(gdf):  # noqa: ANN001, ANN201
    """``area_m2`` and ``perimeter_m``: in the CRS's metres when projected, else in an equal-area CRS."""
    crs = gdf.crs
    if crs is not None and crs.is_projected:
        factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
        gdf["area_m2"] = gdf.geometry.area * factor**2
        gdf["perimeter_m"] = gdf.geometry.length * factor
    else:
        # World cylindrical equal-area (EPSG:6933): areas are right; perimeters are close near the data.
        eq = gdf.geometry.to_crs("EPSG:6933")
        gdf["area_m2"] = eq.area
        gdf["perimeter_m"] = eq.length
    return gdf


# ----------------------------------------------------------------------------------------------- styles


def qgis_vector_style(classes: ClassMap, field: str = "class_id") -> str:
    """QGIS categorized renderer (QML) colouring polygons by class, from the same class table as the raster."""
    cats, symbols = [], []
    for k, c in enumerate(classes):
        r, g, b = c.color
        cats.append(f'<category render="true" symbol="{k}" value="{c.id}" label="{escape(c.name, {chr(34): "&quot;"})}"/>')
        symbols.append(
            f'<symbol type="fill" name="{k}" alpha="1" clip_to_extent="1" force_rhr="0">'
            f'<layer class="SimpleFill" enabled="1" locked="0" pass="0"><Option type="Map">'
            f'<Option type="QString" name="color" value="{r},{g},{b},255"/>'
            f'<Option type="QString" name="outline_color" value="{r // 2},{g // 2},{b // 2},255"/>'
            f'<Option type="QString" name="outline_width" value="0.1"/>'
            f'<Option type="QString" name="style" value="solid"/></Option></layer></symbol>'
        )
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.34" styleCategories="Symbology">\n'
        f'  <renderer-v2 type="categorizedSymbol" attr="{field}" enableorderby="0" forceraster="0">\n'
        f"    <categories>{''.join(cats)}</categories>\n"
        f"    <symbols>{''.join(symbols)}</symbols>\n"
        "  </renderer-v2>\n</qgis>\n"
    )


def write_layer_style(gpkg: Path, layer: str, qml: str) -> None:
    """Store ``qml`` as the default style of ``layer`` in the GeoPackage's ``layer_styles`` table (QGIS reads it)."""
    con = sqlite3.connect(gpkg)
    try:
        con.execute(
            """CREATE TABLE IF NOT EXISTS layer_styles (id INTEGER PRIMARY KEY AUTOINCREMENT, f_table_catalog TEXT,
            f_table_schema TEXT, f_table_name TEXT, f_geometry_column TEXT, styleName TEXT, styleQML TEXT,
            styleSLD TEXT, useAsDefault BOOLEAN, description TEXT, owner TEXT, ui TEXT, update_time DATETIME)"""
        )
        con.execute(
            "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, styleName,"
            " styleQML, styleSLD, useAsDefault, description, owner, ui, update_time) VALUES"
            " ('', '', ?, 'geom', ?, ?, '', 1, 'land-cover classes (geoseg)', '', '', ?)",
            (layer, layer, qml, datetime.now(timezone.utc).isoformat()),
        )
        # Registered as an attribute table, as the GeoPackage spec wants for every user table (and as QGIS
        # does when it saves a style itself).
        con.execute(
            "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier) VALUES"
            " ('layer_styles', 'attributes', 'layer_styles')"
        )
        con.commit()
    finally:
        con.close()


# ----------------------------------------------------------------------------------------------- driver


def block_rows(height: int, width: int, block: int) -> list[list[Window]]:
    """The raster's blocks, row by row."""
    return [[Window(c0, r0, min(block, width - c0), min(block, height - r0)) for c0 in range(0, width, block)]
            for r0 in range(0, height, block)]


def pixel_polygons(raster: str, opts: VectorizeOptions, height: int, width: int, *, client=None,  # noqa: ANN001
                   lookahead: int = 2) -> Iterator[tuple[list, list]]:
    """Polygons of the raster in pixel coordinates, block row by block row: yields ``(inner, merged)``.

    ``inner`` holds ``(wkb, class)`` of polygons inside one block, ``merged`` the ``(geometry, class)`` of
    polygons completed by merging across block edges. Together they are the polygons of one ``shapes`` call
    over the whole raster. ``lookahead`` rows are computed ahead (on the Dask ``client`` when given) while
    the caller consumes a row.
    """
    import dask

    from geoseg.cluster import map_in_order

    halo = min(2 * opts.min_area_px + 2, opts.block) if opts.min_area_px > 1 else 0
    rows = block_rows(height, width, opts.block)
    tasks = [[dask.delayed(polygonize_block, pure=False)(raster, w, halo, opts, height, width) for w in row]
             for row in rows]
    merger = RowMerger(opts.connectivity, height)
    for row, results in zip(rows, map_in_order(tasks, client, lookahead)):
        inner = [item for block_inner, _ in results for item in block_inner]
        border = [item for _, block_border in results for item in block_border]
        bottom = int(row[0].row_off + row[0].height)
        yield inner, merger.add_row(bottom, border)


def vectorize_classes(raster: Path, output: Path, opts: VectorizeOptions = VectorizeOptions(), *,
                      client=None, overwrite: bool = False) -> dict:  # noqa: ANN001
    """Polygonize a class-id GeoTIFF into ``output`` (.gpkg, or .fgb by extension).

    Blocks run on the Dask ``client`` when given, else on local threads; rows are written as they are
    merged. Returns counts and paths.
    """
    import pyogrio

    from geoseg.read import open_raster

    if opts.connectivity not in (4, 8):
        raise InputError(f"vectorize.connectivity: must be 4 or 8 (got {opts.connectivity})")
    with open_raster(raster) as src:
        if src.crs is None:
            raise InputError(f"{raster}: has no CRS; polygons would not be georeferenced")
        if np.dtype(src.dtypes[0]).kind not in "iu":
            raise InputError(f"{raster}: class rasters must hold integers, not {src.dtypes[0]}")
        crs, transform, height, width = src.crs, src.transform, src.height, src.width
        raw = src.tags().get("GEOSEG_CLASSES")
    classes = ClassMap.from_records(json.loads(raw)) if raw else ClassMap(())
    suffix = output.suffix.lower()
    driver = {".gpkg": "GPKG", ".fgb": "FlatGeobuf"}.get(suffix)
    if driver is None:
        raise InputError(f"{output}: unsupported vector format; use .gpkg or .fgb")
    # FlatGeobuf cannot append, and simplification needs the whole coverage: those are written at the end.
    streaming = driver == "GPKG" and opts.simplify <= 0
    parts: list = []
    counts = {"features": 0, "merged": 0}
    with atomic_path(output, overwrite=overwrite) as tmp:
        written = False

        def write(gdf) -> None:  # noqa: ANN001
            nonlocal written
            pyogrio.write_dataframe(gdf, tmp, layer=opts.layer, driver=driver, append=written, promote_to_multi=True)
            written = True

        for inner, merged in pixel_polygons(str(raster), opts, height, width, client=client):
            counts["merged"] += len(merged)
            if not inner and not merged:
                continue
            geoms = np.concatenate([shapely.from_wkb([g for g, _ in inner]) if inner else np.empty(0, object),
                                    np.array([g for g, _ in merged], dtype=object)])
            values = [v for _, v in inner] + [v for _, v in merged]
            gdf = add_measures(_frame(geoms, values, crs, transform, classes))
            counts["features"] += len(gdf)
            if streaming:
                write(gdf)
            else:
                parts.append(gdf)
        if parts:
            import pandas as pd

            gdf = pd.concat(parts, ignore_index=True)
            if opts.simplify > 0:
                gdf["geometry"] = shapely.coverage_simplify(gdf.geometry.values, opts.simplify)
                gdf = add_measures(gdf)
            write(gdf)
        if not written:  # an all-nodata raster still gets a valid, empty layer
            import geopandas as gpd

            empty = gpd.GeoDataFrame({"class_id": [], "class_name": [], "area_m2": [], "perimeter_m": []},
                                     geometry=[], crs=crs)
            pyogrio.write_dataframe(empty, tmp, layer=opts.layer, driver=driver, geometry_type="MultiPolygon")
        if driver == "GPKG":
            write_layer_style(tmp, opts.layer, qgis_vector_style(classes))
    return {"path": str(output), "features": counts["features"], "blocks": sum(map(len, block_rows(
        height, width, opts.block))), "merged": counts["merged"]}
