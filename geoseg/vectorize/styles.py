"""How GIS tools draw the polygons.

A QGIS categorized renderer (QML), an SLD, and the GeoPackage ``layer_styles`` table QGIS reads them from.
"""

from __future__ import annotations

import logging
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

from geoseg.classes import ClassMap

if TYPE_CHECKING:

    pass

log = logging.getLogger("geoseg")


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
