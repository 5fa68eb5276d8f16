"""Vectorize stage: class-id raster -> polygons in a GeoPackage (or FlatGeobuf), block by block.

Each block is polygonized on a worker with :func:`rasterio.features.shapes` (``mask=`` skips nodata) in
*pixel* coordinates, so edges shared by two blocks have bit-identical coordinates. Polygons inside a block
leave the worker finished (CRS coordinates, area, perimeter, WKB). Those touching an inner block edge are
grouped on the client with their same-class neighbours across it (STR-tree + union-find; only these take
part, so memory stays bounded), and each group is unioned on a worker. The client only groups and writes.
The result is the set of polygons one ``shapes`` call over the whole raster gives.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape

import numpy as np
import shapely
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from geoseg._io import atomic_path, check_overwrite
from geoseg.classes import ClassMap
from geoseg.config import VectorizeConfig
from geoseg.errors import ConfigError, InputError, OutputWriteError
from geoseg.grid import RasterGrid

if TYPE_CHECKING:
    from distributed import Client

    from geoseg.progress import Progress

log = logging.getLogger("geoseg")


#: Widest window a block may read (block plus halo on both sides): 32768^2 uint8 is 1 GiB per task.
MAX_READ = 32768


def min_area_pixels(cfg: VectorizeConfig, grid: RasterGrid) -> int:
    """The minimum mapping unit in pixels: the larger of ``min_area_px`` and ``min_area_m2`` on this grid."""
    px = cfg.min_area_px
    if cfg.min_area_m2 > 0:
        if not grid.crs.is_projected:
            raise ConfigError("vectorize.min_area_m2: needs a projected CRS; use vectorize.min_area_px")
        factor = grid.crs.linear_units_factor[1]
        px = max(px, int(np.ceil(cfg.min_area_m2 / (grid.pixel_area * factor**2))))
    return px


def sieve_halo(min_area: int, block: int) -> int:
    """Context a block needs for an exact minimum mapping unit: ``2 * min_area + 2`` pixels, or 0 without one.

    Too large a unit for the block is refused rather than clipped (a clipped halo would change the result).
    """
    if min_area <= 1:
        return 0
    halo = 2 * min_area + 2
    if block + 2 * halo > MAX_READ:
        raise ConfigError(f"vectorize.min_area_px: a minimum mapping unit of {min_area} px needs {halo} px of "
                          f"context around each block, more than a task may read ({MAX_READ} px); use at most "
                          f"{(MAX_READ - block) // 4 - 1} px or a smaller vectorize.block")
    return halo


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
    table = votes.reshape(offset + 1, n_values)
    winner = table.argmax(1)
    has_vote = table.max(1) > 0
    out = data.copy()
    replace = is_small & has_vote[labels]
    out[replace] = winner[labels[replace]].astype(data.dtype)
    return out


def _read_block(path: str, window: Window, halo: int, min_area: int,
                connectivity: int) -> tuple[np.ndarray, np.ndarray]:
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
    data = sieve_block(data, valid, min_area, connectivity)
    tr, tc = int(window.row_off) - rr0, int(window.col_off) - cc0
    core = (slice(tr, tr + int(window.height)), slice(tc, tc + int(window.width)))
    return data[core], valid[core]


def _polygons(found: list[tuple[dict, float]]) -> np.ndarray:
    """Shapely polygons of ``shapes()`` GeoJSON, built in bulk.

    ``shapely.geometry.shape`` walks every vertex in Python; one array of all the vertices and two
    vectorized constructors (rings, then polygons, the first ring of each being its shell) take a third of
    the time of the whole block.
    """
    coords: list = []
    ring_sizes, ring_owner = [], []
    for k, (geom, _) in enumerate(found):
        for ring in geom["coordinates"]:
            coords.extend(ring)
            ring_sizes.append(len(ring))
            ring_owner.append(k)
    rings = shapely.linearrings(np.array(coords, dtype=np.float64),
                                indices=np.repeat(np.arange(len(ring_sizes)), ring_sizes))
    return shapely.polygons(rings, indices=np.array(ring_owner))


def polygonize_block(path: str, window: Window, min_area: int, cfg: VectorizeConfig,
                     grid: RasterGrid) -> tuple[dict, list]:
    """Polygons of one block: ``(features, border)``.

    ``features`` holds the polygons inside the block, finished (:func:`features`); ``border`` the
    ``(wkb, class_id)`` of those touching an inner block edge, in pixel coordinates, to be merged.
    """
    from rasterio.features import shapes

    halo = sieve_halo(min_area, cfg.block)
    data, valid = _read_block(path, window, halo, min_area, cfg.connectivity)
    n_rows, n_cols = grid.height, grid.width
    r0, c0 = int(window.row_off), int(window.col_off)
    r1, c1 = r0 + int(window.height), c0 + int(window.width)
    # rasterio warns NotGeoreferenced on the first block's identity transform (pixel coordinates on purpose)
    # and, spuriously, when threads make in-memory datasets at once (odc-geo#131). catch_warnings is not
    # thread-safe, so the filter is process-wide, for rasterio.features only.
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio.features")
    found = list(shapes(data, mask=valid, connectivity=cfg.connectivity, transform=Affine.translation(c0, r0)))
    if not found:
        return features(np.empty(0, dtype=object), [], grid), []
    polys = _polygons(found)
    values = np.array([int(v) for _, v in found])
    bad = ~shapely.is_valid(polys)
    if bad.any():  # 8-connected pixels give rings that touch themselves (OGC-invalid)
        polys[bad] = shapely.make_valid(polys[bad])
    minx, miny, maxx, maxy = shapely.bounds(polys).T
    touches = (((minx == c0) & (c0 > 0)) | ((maxx == c1) & (c1 < n_cols)) | ((miny == r0) & (r0 > 0))
               | ((maxy == r1) & (r1 < n_rows)))
    border = list(zip(shapely.to_wkb(polys[touches]).tolist(), values[touches].tolist()))
    return features(polys[~touches], values[~touches], grid), border


# ----------------------------------------------------------------------------------------------- merging


def union_groups(groups: list[tuple[list[bytes], int]], grid: RasterGrid) -> dict:
    """The polygons of groups of same-class pieces (pixel WKB) that share edges: their unions, finished."""
    geoms = np.empty(len(groups), dtype=object)
    for k, (pieces, _) in enumerate(groups):
        if len(pieces) == 1:
            geoms[k] = shapely.from_wkb(pieces[0])
        else:
            # simplify(0) drops the collinear vertices left where block edges were, as one shapes() call has none.
            geoms[k] = shapely.simplify(shapely.union_all(shapely.from_wkb(pieces)), 0.0, preserve_topology=False)
    return features(geoms, [value for _, value in groups], grid)


_SCATTER_BYTES = 4 * 2**20


def _balanced(groups: list[tuple[list[bytes], int]], parts: int) -> list[tuple[list, np.ndarray]]:
    """``groups`` in up to ``parts`` lists of about equal WKB size, largest first (LPT), with their indexes."""
    bins: list[list] = [[] for _ in range(max(1, min(parts, len(groups))))]
    where: list[list[int]] = [[] for _ in bins]
    load = [0] * len(bins)
    for k in sorted(range(len(groups)), key=lambda g: -sum(map(len, groups[g][0]))):
        b = load.index(min(load))
        bins[b].append(groups[k])
        where[b].append(k)
        load[b] += sum(map(len, groups[k][0]))
    return [(part, np.array(index, dtype=np.int64)) for part, index in zip(bins, where)]


class RowMerger:
    """Groups the border polygons of block rows, top to bottom, as the rows arrive.

    A border polygon (a *piece*: one block's polygon touching an inner block edge) is joined to the
    same-class pieces it shares an edge with (a corner too when 8-connected): STR-tree candidates, exact
    DE-9IM tests, union-find. Only this row's pieces and the previous row's pieces on their common edge are
    tested. A group none of whose pieces reaches the row's bottom edge can grow no more and is handed out
    (its pieces, to be unioned by :func:`union_groups`). Only the pieces of groups still open are held, so
    memory follows the polygons crossing the current row edge, not the raster's area.
    """

    def __init__(self, connectivity: int, n_rows: int) -> None:
        self.n_rows = n_rows
        # 4-connected: they share an edge (boundaries meet in a line); 8-connected: a corner is enough.
        self.pattern = "F***1****" if connectivity == 4 else "F***T****"
        self.pieces: dict[int, tuple[shapely.Geometry, bytes, int]] = {}
        self.parent: dict[int, int] = {}
        self.on_edge: list[int] = []  # pieces touching the bottom edge of the last row
        self.next_id = 0

    def _find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def add_row(self, bottom: int, border: list[tuple[bytes, int]]) -> list[tuple[list[bytes], int]]:
        """Groups completed by a row ending at pixel row ``bottom``: ``(pieces' WKB, class)`` each.

        ``border`` holds the row's border polygons as ``(wkb, class)``.
        """
        new_ids = list(range(self.next_id, self.next_id + len(border)))
        self.next_id += len(border)
        new = shapely.from_wkb([w for w, _ in border]) if border else np.empty(0, dtype=object)
        for i, geom, (wkb, value) in zip(new_ids, new, border):
            self.pieces[i] = (geom, wkb, value)
            self.parent[i] = i
        ids = np.array(self.on_edge + new_ids, dtype=np.int64)
        if len(ids) > 1:
            geoms = np.array([self.pieces[i][0] for i in ids], dtype=object)
            values = np.array([self.pieces[i][2] for i in ids])
            left, right = shapely.STRtree(geoms).query(geoms)  # bounding boxes: cheap; exact tests on few pairs
            keep = (left < right) & (values[left] == values[right])
            left, right = left[keep], right[keep]
            if len(left):
                shapely.prepare(geoms)
                touch = shapely.relate_pattern(geoms[left], geoms[right], self.pattern)
                for a, b in zip(ids[left[touch]], ids[right[touch]]):
                    ra, rb = self._find(int(a)), self._find(int(b))
                    if ra != rb:
                        self.parent[max(ra, rb)] = min(ra, rb)
        if bottom < self.n_rows and len(new):
            self.on_edge = [i for i, y in zip(new_ids, shapely.bounds(new)[:, 3]) if y == bottom]
        else:
            self.on_edge = []
        still_open = {self._find(i) for i in self.on_edge}
        groups: dict[int, list[int]] = {}
        for i in self.pieces:
            root = self._find(i)
            if root not in still_open:
                groups.setdefault(root, []).append(i)
        final = []
        for members in groups.values():
            final.append(([self.pieces[i][1] for i in members], int(self.pieces[members[0]][2])))
            for i in members:
                del self.pieces[i], self.parent[i]
        return final


# ----------------------------------------------------------------------------------------------- attributes


def to_world(pixel: np.ndarray, transform: Affine) -> np.ndarray:
    """Polygons in pixel coordinates mapped through the raster's affine ``transform``."""
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    world = shapely.transform(pixel, lambda xy: np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c,
                                                                  d * xy[:, 0] + e * xy[:, 1] + f]))
    if e > 0 or a < 0:  # a flipped grid reverses ring orientation; keep polygons valid and oriented
        world = shapely.orient_polygons(world)
    return world


def measures(geoms: np.ndarray, crs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Area (m²) and perimeter (m): in the CRS's metres when projected, else in an equal-area CRS."""
    from pyproj import CRS, Transformer

    crs = CRS.from_user_input(crs)
    if crs.is_projected:
        factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
        return shapely.area(geoms) * factor**2, shapely.length(geoms) * factor
    # World cylindrical equal-area (EPSG:6933): areas are right; perimeters are close near the data.
    to_eq = Transformer.from_crs(crs, "EPSG:6933", always_xy=True)
    eq = shapely.transform(geoms, lambda xy: np.column_stack(to_eq.transform(xy[:, 0], xy[:, 1])))
    return shapely.area(eq), shapely.length(eq)


def features(pixel: np.ndarray, values: Any, grid: RasterGrid) -> dict:
    """Polygons in pixel coordinates, finished for writing: CRS coordinates (WKB), class id, area, perimeter.

    Done where the polygons are made (on the workers), so the writer only writes.
    """
    world = to_world(np.asarray(pixel, dtype=object), grid.transform)
    area, perimeter = measures(world, grid.crs)
    return {"wkb": shapely.to_wkb(world), "class_id": np.asarray(values, dtype=np.int32), "area_m2": area,
            "perimeter_m": perimeter}


def add_measures(gdf):  # noqa: ANN001, ANN201
    """``area_m2`` and ``perimeter_m`` columns (:func:`measures`) of a GeoDataFrame."""
    gdf["area_m2"], gdf["perimeter_m"] = measures(np.asarray(gdf.geometry.values), gdf.crs)
    return gdf


# ----------------------------------------------------------------------------------------------- styles


def qgis_vector_style(classes: ClassMap, field: str = "class_id") -> str:
    """QGIS categorized renderer (QML) colouring polygons by class, from the same class table as the raster."""
    cats, symbols = [], []
    for k, c in enumerate(classes):
        r, g, b = c.color
        label = escape(c.name, {chr(34): "&quot;"})
        cats.append(f'<category render="true" symbol="{k}" value="{c.id}" label="{label}"/>')
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


def sld_vector_style(classes: ClassMap, field: str = "class_id") -> str:
    """The same categorized style as OGC SLD 1.1 / SE (what GIS tools other than QGIS read)."""
    rules = []
    for c in classes:
        r, g, b = c.color
        rules.append(
            f"<se:Rule><se:Name>{escape(c.name)}</se:Name><se:Description><se:Title>{escape(c.name)}</se:Title>"
            f"</se:Description><ogc:Filter><ogc:PropertyIsEqualTo><ogc:PropertyName>{field}</ogc:PropertyName>"
            f"<ogc:Literal>{c.id}</ogc:Literal></ogc:PropertyIsEqualTo></ogc:Filter><se:PolygonSymbolizer>"
            f'<se:Fill><se:SvgParameter name="fill">{c.hex}</se:SvgParameter></se:Fill><se:Stroke>'
            f'<se:SvgParameter name="stroke">#{r // 2:02x}{g // 2:02x}{b // 2:02x}</se:SvgParameter>'
            f'<se:SvgParameter name="stroke-width">0.1</se:SvgParameter></se:Stroke></se:PolygonSymbolizer>'
            "</se:Rule>")
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<StyledLayerDescriptor version="1.1.0" '
            'xmlns="http://www.opengis.net/sld" xmlns:ogc="http://www.opengis.net/ogc" '
            'xmlns:se="http://www.opengis.net/se" xmlns:xlink="http://www.w3.org/1999/xlink" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:schemaLocation="http://www.opengis.net/sld '
            'http://schemas.opengis.net/sld/1.1.0/StyledLayerDescriptor.xsd"><NamedLayer><se:Name>landcover'
            f"</se:Name><UserStyle><se:Name>landcover</se:Name><se:FeatureTypeStyle>{''.join(rules)}"
            "</se:FeatureTypeStyle></UserStyle></NamedLayer></StyledLayerDescriptor>\n")


def gpkg_timestamp(when: datetime) -> str:
    """A GeoPackage timestamp: ISO 8601 in UTC with milliseconds and a Z (``%Y-%m-%dT%H:%M:%fZ``)."""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def write_layer_style(gpkg: Path, layer: str, qml: str, when: datetime | None = None, sld: str = "") -> None:
    """Store ``qml`` as the default style of ``layer`` in the GeoPackage's ``layer_styles`` table (QGIS reads it).

    ``when`` (default now) stamps the style and the layer's ``last_change``: a fixed time makes the file
    byte-identical when the same polygons are written again.
    """
    stamp = gpkg_timestamp(when or datetime.now(timezone.utc))
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
            " ('', '', ?, 'geom', ?, ?, ?, 1, 'land-cover classes (geoseg)', '', '', ?)",
            (layer, layer, qml, sld, stamp),
        )
        # Registered as an attribute table, as the GeoPackage spec wants for every user table (and as QGIS
        # does when it saves a style itself).
        con.execute(
            "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier) VALUES"
            " ('layer_styles', 'attributes', 'layer_styles')"
        )
        con.execute("UPDATE gpkg_contents SET last_change = ?", (stamp,))
        con.commit()
    finally:
        con.close()


# ----------------------------------------------------------------------------------------------- driver


def block_rows(height: int, width: int, block: int) -> list[list[Window]]:
    """The raster's blocks, row by row."""
    return [[Window(c0, r0, min(block, width - c0), min(block, height - r0)) for c0 in range(0, width, block)]
            for r0 in range(0, height, block)]


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
#: GeoPackage version written: 1.2 opens without warnings in GDAL 3.6 / QGIS 3.22 (GDAL 3.12 writes 1.4).
GPKG_VERSION = "1.2"


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


_COLUMNS = ["class_id", "class_name", "area_m2", "perimeter_m"]


class _OgrSink:
    """Batches into an OGR layer through pyogrio's raw writer (the workers' WKB as it is, no GeoDataFrame)."""

    def __init__(self, path: Path, driver: str, layer: str, grid: RasterGrid) -> None:
        self.path, self.driver, self.layer, self.crs = path, driver, layer, grid.crs.to_wkt()
        self.written = False

    def write(self, feats: dict) -> None:
        from pyogrio.raw import write as write_raw

        options = {"VERSION": GPKG_VERSION} if self.driver == "GPKG" and not self.written else None
        write_raw(self.path, feats["wkb"], [feats[c] for c in _COLUMNS], _COLUMNS, layer=self.layer,
                  driver=self.driver, geometry_type="MultiPolygon", promote_to_multi=True, crs=self.crs,
                  encoding="UTF-8", append=self.written, dataset_options=options)
        self.written = True

    def close(self) -> None:
        """Nothing held open."""


class _ParquetSink:
    """Batches as row groups of a GeoParquet 1.1 file: MultiPolygon WKB, PROJJSON CRS (streamed: flat memory)."""

    def __init__(self, path: Path, grid: RasterGrid) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"{path.name}: GeoParquet output needs pyarrow: pip install 'geoseg[parquet]'") from None
        geo = {"version": "1.1.0", "primary_column": "geometry",
               "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["MultiPolygon"],
                                        "crs": _projjson(grid.crs)}}}
        schema = pa.schema([("class_id", pa.int32()), ("class_name", pa.string()), ("area_m2", pa.float64()),
                            ("perimeter_m", pa.float64()), ("geometry", pa.binary())],
                           metadata={b"geo": json.dumps(geo).encode()})
        self.writer = pq.ParquetWriter(str(path), schema)
        self.schema = schema
        self.written = False

    def write(self, feats: dict) -> None:
        import pyarrow as pa

        geoms = shapely.from_wkb(feats["wkb"])
        single = shapely.get_type_id(geoms) == 3  # polygons become one-part multipolygons, as in the GeoPackage
        if single.any():
            geoms[single] = shapely.multipolygons(geoms[single], indices=np.arange(int(single.sum())))
        table = pa.table({"class_id": pa.array(feats["class_id"], pa.int32()),
                          "class_name": pa.array(feats["class_name"].tolist(), pa.string()),
                          "area_m2": pa.array(feats["area_m2"], pa.float64()),
                          "perimeter_m": pa.array(feats["perimeter_m"], pa.float64()),
                          "geometry": pa.array(shapely.to_wkb(geoms).tolist(), pa.binary())}, schema=self.schema)
        self.writer.write_table(table)
        self.written = True

    def close(self) -> None:
        """Finish the file."""
        self.writer.close()


def _projjson(crs: Any) -> Any:
    from pyproj import CRS

    return CRS.from_user_input(crs).to_json_dict()
