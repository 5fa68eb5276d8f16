"""Land-cover class tables: ids, names and colours shared by the raster, the vector, the styles and the reports.

A value module (numpy only): the config, the checkpoint header and every writer use the same ``ClassMap``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class ClassInfo:
    """One land-cover class: the id written to rasters, a name and an RGB colour."""

    id: int
    name: str
    color: tuple[int, int, int]

    @property
    def hex(self) -> str:
        """Colour as ``#rrggbb``."""
        return "#{:02x}{:02x}{:02x}".format(*self.color)


def parse_color(value: str | Sequence[int]) -> tuple[int, int, int]:
    """Parse ``#rrggbb`` or an ``[r, g, b]`` list into an RGB tuple.

    >>> parse_color("#1f78b4")
    (31, 120, 180)
    """
    if isinstance(value, str):
        text = value.lstrip("#")
        if len(text) != 6:
            raise ValueError(f"colour {value!r} is not #rrggbb")
        try:
            return (int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16))
        except ValueError:
            raise ValueError(f"colour {value!r} is not #rrggbb") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"colour {value!r} is not #rrggbb or three integers 0-255")
    if len(value) != 3 or not all(0 <= v <= 255 for v in value):
        raise ValueError(f"colour {list(value)!r} is not three integers 0-255")
    return (value[0], value[1], value[2])


@dataclass(frozen=True, slots=True)
class ClassMap:
    """Ordered class table; model output channel ``i`` is ``classes[i]``."""

    classes: tuple[ClassInfo, ...]

    def __post_init__(self) -> None:
        ids = [c.id for c in self.classes]
        bad = [i for i in ids if not 0 <= i <= 254]
        if bad:
            raise ValueError(f"class id {bad[0]} is outside 0-254 (255 is kept for nodata)")
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"class id {dupes[0]} is used by two classes; ids must be unique")

    @classmethod
    def from_records(cls, records: Iterable[dict]) -> ClassMap:
        """Build from ``{"id", "name", "color"}`` dicts (as stored in checkpoints); a bad record is a ValueError."""
        out = []
        for k, r in enumerate(records):
            if not isinstance(r, dict) or not {"id", "name", "color"} <= set(r):
                raise ValueError(f"class {k}: expected {{id, name, color}}, got {r!r}"[:120])
            if isinstance(r["id"], bool) or not isinstance(r["id"], int):
                raise ValueError(f"class {k}: id must be an integer, got {r['id']!r}")
            out.append(ClassInfo(r["id"], str(r["name"]), parse_color(r["color"])))
        return cls(tuple(out))

    def to_records(self) -> list[dict]:
        """Plain-JSON form, the inverse of :meth:`from_records`."""
        return [{"id": c.id, "name": c.name, "color": c.hex} for c in self.classes]

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self) -> Iterator[ClassInfo]:
        return iter(self.classes)

    @property
    def ids(self) -> list[int]:
        """Class ids in model output order."""
        return [c.id for c in self.classes]

    @property
    def names(self) -> list[str]:
        """Class names in model output order."""
        return [c.name for c in self.classes]

    def name_of(self, class_id: int) -> str:
        """Name of a class id, or ``class_<id>`` for an unknown one."""
        for c in self.classes:
            if c.id == class_id:
                return c.name
        return f"class_{class_id}"

    def index_to_id(self) -> np.ndarray:
        """Lookup table from model output channel to class id (uint8)."""
        return np.asarray(self.ids, dtype=np.uint8)

    def colormap(self, nodata: int | None = None) -> dict[int, tuple[int, int, int, int]]:
        """GDAL colour table: every class opaque, ``nodata`` transparent."""
        table = {c.id: (*c.color, 255) for c in self.classes}
        if nodata is not None:
            table[int(nodata)] = (0, 0, 0, 0)
        return table
