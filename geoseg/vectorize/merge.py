"""Border pieces merged across block edges.

Grouped row by row on the client (STR-tree + union-find) and unioned on a worker, so the result is what one
``shapes`` call over the whole raster gives.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import shapely

from geoseg.grid import RasterGrid
from geoseg.vectorize.attributes import features

if TYPE_CHECKING:

    pass

log = logging.getLogger("geoseg")


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
