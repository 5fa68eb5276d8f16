"""The bad-input catalogue (docs/errors.md): one test per row, through the CLI.

Every failing case must end in exactly one line ``geoseg: error: ...`` naming the file or key, exit code 1,
no traceback, no output that looks complete, and every file that existed before unchanged. The cases that
must work (all-nodata, NaN, 1 x 1, a reference in another CRS, ...) check their output instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.transform import Affine, from_origin

from geoseg.cli.main import main
from geoseg.sample import CLASSES
from tests.conftest import make_checkpoint, write_raster

#: Files that mark a finished output: none may appear when a case fails.
FINISHED = ("landcover.tif", "confidence.tif", "landcover.gpkg", "item.json", "metrics.json", "metrics.csv",
            "report.md", "model.safetensors")


@dataclass
class Ctx:
    """What a case builds on: a tmp folder, a valid scene and model, and the test session's cluster."""

    tmp: Path
    model: Path
    address: str
    monkeypatch: pytest.MonkeyPatch | None = None
    out: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out = self.tmp / "out"

    def scene(self, data: np.ndarray | None = None, name: str = "scene.tif", **kw) -> Path:  # noqa: ANN003
        if data is None:
            data = np.clip(np.random.default_rng(0).normal(900, 300, (4, 40, 50)), 1, 4000).astype("uint16")
        return write_raster(self.tmp / name, data, **kw)

    def pipeline(self, scene: Path | str | None = None, **sections) -> str:  # noqa: ANN003
        data = {"input": str(scene or self.scene()), "model": str(self.model), "output_dir": str(self.out),
                "tile": {"size": 32, "overlap": 8}, "vectorize": {"enabled": False},
                "cluster": {"backend": "address", "address": self.address}}
        for key, value in sections.items():
            data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
        path = self.tmp / "pipe.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    def prediction(self) -> Path:
        labels = np.random.default_rng(1).integers(1, 7, (40, 50)).astype("uint8")
        return write_raster(self.tmp / "pred.tif", labels, nodata=255,
                            tags={"GEOSEG_CLASSES": json.dumps(CLASSES)})


@dataclass
class Case:
    id: str
    build: Callable[[Ctx], list[str]]
    expect: str
    """Regex the one error line must match; for a case that works, what its check asserts."""
    works: Callable[[Ctx], None] | None = None


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()} if root.exists() else {}


# ----------------------------------------------------------------------------------------------- inputs


def _truncated(ctx: Ctx) -> list[str]:
    data = np.clip(np.random.default_rng(0).normal(900, 300, (4, 200, 200)), 1, 4000).astype("uint16")
    path = ctx.tmp / "cut.tif"
    with rasterio.open(path, "w", driver="GTiff", width=200, height=200, count=4, dtype="uint16", crs="EPSG:32632",
                       transform=from_origin(6e5, 5.3e6, 10, 10), tiled=True, blockxsize=64, blockysize=64,
                       compress="deflate") as dst:
        dst.write(data)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # the header and directory survive, the last tiles do not
    return ["run", ctx.pipeline(path)]


def _all_nodata_works(ctx: Ctx) -> None:
    with rasterio.open(ctx.out / "landcover.tif") as dst:
        assert (dst.read(1) == 255).all()


def _nan_inf_works(ctx: Ctx) -> None:
    with rasterio.open(ctx.out / "landcover.tif") as dst:
        out = dst.read(1)
    assert out[0, 0] == 255 and out[5, 7] == 255 and out[20, 20] != 255


def _one_pixel_works(ctx: Ctx) -> None:
    with rasterio.open(ctx.out / "landcover.tif") as dst, rasterio.open(ctx.tmp / "scene.tif") as src:
        assert dst.shape == (1, 1) and dst.transform == src.transform and dst.crs == src.crs


def _nan_scene(ctx: Ctx) -> list[str]:
    data = np.random.default_rng(0).normal(900, 300, (4, 40, 50)).astype("float32")
    data[0, 0, 0], data[2, 5, 7] = np.nan, np.inf
    return ["run", ctx.pipeline(ctx.scene(data))]


INPUTS = [
    Case("missing input file", lambda c: ["run", c.pipeline(c.tmp / "nope.tif")], r"pipe.yaml: input: file not found: .*nope.tif"),
    Case("a directory instead of a file", lambda c: ["run", c.pipeline(c.tmp)], r"input: is a directory, expected a file"),
    Case("not a raster", lambda c: ["run", c.pipeline(_text(c.tmp / "notes.tif"))],
         r"notes.tif: not a raster GDAL can read"),
    Case("truncated or corrupt TIFF", _truncated,
         r"cut.tif: cannot read pixels in rows \d+-\d+, columns \d+-\d+: file corrupt or truncated\?"),
    Case("raster without CRS", lambda c: ["run", c.pipeline(c.scene(crs=None))],
         r"scene.tif: has no CRS; set one first, e\.g\. rio edit-info --crs"),
    Case("rotated or sheared transform",
         lambda c: ["run", c.pipeline(c.scene(transform=Affine(10, 2, 6e5, 1, -10, 5.3e6)))],
         r"scene.tif: rotated or sheared geotransform is not supported; warp it north-up first"),
    Case("fewer bands than the model needs", lambda c: ["run", c.pipeline(c.scene(np.ones((2, 30, 30), "uint16")))],
         r"scene.tif: has 2 bands but the model's bands asks for band 4"),
    Case("wrong data type", lambda c: ["run", c.pipeline(c.scene(np.ones((4, 30, 30), "complex64")))],
         r"scene.tif: data type complex64 is not supported"),
    Case("all-nodata raster (works)", lambda c: ["run", c.pipeline(c.scene(np.zeros((4, 30, 30), "uint16"), nodata=0))],
         "writes an all-nodata raster", works=_all_nodata_works),
    Case("NaN and inf in float bands (works)", _nan_scene, "NaN and inf become nodata", works=_nan_inf_works),
    Case("1 x 1 raster (works)", lambda c: ["run", c.pipeline(c.scene(np.full((4, 1, 1), 700, "uint16")))],
         "one pixel on the input grid", works=_one_pixel_works),
]


def _text(path: Path) -> Path:
    path.write_text("this is not an image\n")
    return path


# ----------------------------------------------------------------------------------------------- references


def _reference(ctx: Ctx, *, shift: float = 0.0, crs: str = "EPSG:32632", codes=(1, 2, 3)) -> Path:  # noqa: ANN001
    ref = np.random.default_rng(2).choice(codes, (40, 50)).astype("uint8")
    return write_raster(ctx.tmp / "ref.tif", ref, nodata=0, crs=crs,
                        transform=from_origin(6e5 + shift, 5.3e6, 10, 10))


def _other_crs_works(ctx: Ctx) -> None:
    metrics = json.loads((ctx.out / "metrics.json").read_text())
    assert metrics["pixels"] > 1000


def _unmapped_works(ctx: Ctx) -> None:
    metrics = json.loads((ctx.out / "metrics.json").read_text())
    assert set(metrics["unmapped_reference_codes"]) == {"42"}


def _reprojected(ctx: Ctx) -> list[str]:
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    src = _reference(ctx)
    with rasterio.open(src) as s:
        transform, w, h = calculate_default_transform(s.crs, "EPSG:4326", s.width, s.height, *s.bounds)
        out = np.zeros((h, w), "uint8")
        reproject(s.read(1), out, src_transform=s.transform, src_crs=s.crs, dst_transform=transform,
                  dst_crs="EPSG:4326", resampling=Resampling.nearest)
    ref = write_raster(ctx.tmp / "ref4326.tif", out, crs="EPSG:4326", transform=transform, nodata=0)
    return ["evaluate", str(ctx.prediction()), str(ref), "--out-dir", str(ctx.out)]


def _vector_without_attribute(ctx: Ctx) -> list[str]:
    import geopandas as gpd
    from shapely.geometry import box

    path = ctx.tmp / "ref.gpkg"
    gpd.GeoDataFrame({"code": [1]}, geometry=[box(6e5, 5.2996e6, 6.005e5, 5.3e6)], crs="EPSG:32632").to_file(path)
    return ["evaluate", str(ctx.prediction()), str(path), "--out-dir", str(ctx.out)]


REFERENCES = [
    Case("reference with no overlap", lambda c: ["evaluate", str(c.prediction()), str(_reference(c, shift=1e5)),
                                                 "--out-dir", str(c.out)],
         r"ref.tif: reference does not overlap the prediction"),
    Case("reference in another CRS (works)", _reprojected, "warped onto the prediction grid", works=_other_crs_works),
    Case("codes not in the class map (works, reported)",
         lambda c: ["evaluate", str(c.prediction()), str(_reference(c, codes=(1, 2, 42))), "--out-dir", str(c.out)],
         "unmapped codes are reported, not counted", works=_unmapped_works),
    Case("vector reference without the class attribute", _vector_without_attribute,
         r"ref.gpkg: no attribute 'class'; available: code"),
]


# ----------------------------------------------------------------------------------------------- config


def _yaml_text(ctx: Ctx, text: str) -> list[str]:
    path = ctx.tmp / "pipe.yaml"
    path.write_text(text)
    return ["run", str(path)]


def _existing_output(ctx: Ctx) -> list[str]:
    ctx.out.mkdir()
    (ctx.out / "landcover.tif").write_bytes(b"yesterday's map")
    return ["run", ctx.pipeline()]


def _disk_full(ctx: Ctx) -> list[str]:
    import rasterio.shutil

    monkeypatch = ctx.monkeypatch

    def full(src, dst, **kw) -> None:  # noqa: ANN001, ANN003
        Path(dst).write_bytes(b"half a COG")  # what a full disk leaves behind
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(rasterio.shutil, "copy", full)
    return ["run", ctx.pipeline()]


def _not_writable(ctx: Ctx) -> list[str]:
    blocker = ctx.tmp / "a-file"
    blocker.write_text("")
    return ["run", ctx.pipeline(output_dir=str(blocker / "out"))]


CONFIG = [
    Case("YAML syntax error", lambda c: _yaml_text(c, "input: a.tif\ntile:\n  size: [512\n"),
         r"pipe.yaml:\d+:\d+: YAML syntax error"),
    Case("unknown key", lambda c: ["run", c.pipeline(tile={"overlapp": 8})],
         r"pipe.yaml: tile.overlapp: unknown key; did you mean 'overlap'\?"),
    Case("wrong type", lambda c: ["run", c.pipeline(infer={"batch_size": "four"})],
         r"pipe.yaml: infer.batch_size: .*'four'"),
    Case("zero or negative size", lambda c: ["run", c.pipeline(tile={"size": 0})],
         r"pipe.yaml: tile.size: Input should be greater than 0"),
    Case("overlap larger than the tile", lambda c: ["run", c.pipeline(tile={"size": 32, "overlap": 40})],
         r"pipe.yaml: tile: overlap 40 is more than half the tile size 32; use at most 16"),
    Case("tile not compatible with the model's stride", lambda c: ["run", c.pipeline(
        tile={"size": 100, "overlap": 8}, model=str(make_checkpoint(c.tmp / "unet.safetensors", architecture="unet",
                                                                     encoder="resnet18", arch_kwargs={"encoder_depth": 3, "decoder_channels": [16, 8, 4]})))],
         r"pipe.yaml: tile.size: 100 is not divisible by the model's output stride 8; use 104 or 96"),
    Case("output directory not writable", _not_writable, r"output_dir: cannot create .*a-file/out"),
    Case("disk full while writing", _disk_full, r"\.landcover\.tmp-\d+\.tif: No space left on device"),
    Case("an output that exists", _existing_output,
         r"landcover.tif: exists and won't be overwritten without --overwrite"),
]


# ----------------------------------------------------------------------------------------------- models


class _Runs:
    """Unpickling this runs code: creates the marker file named in its state."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(self.marker),))


def _model_file(ctx: Ctx, content: bytes) -> list[str]:
    path = ctx.tmp / "bad.safetensors"
    path.write_bytes(content)
    return ["run", ctx.pipeline(model=str(path))]


def _pickle_with_code(ctx: Ctx) -> list[str]:
    path = ctx.tmp / "evil.pt"
    path.write_bytes(pickle.dumps({"geoseg": "{}", "state_dict": _Runs(str(ctx.tmp / "PWNED"))}))
    return ["run", ctx.pipeline(model=str(path))]


MODELS = [
    Case("model missing", lambda c: ["run", c.pipeline(model=str(c.tmp / "none.safetensors"))],
         r"pipe.yaml: model: file not found: .*none.safetensors"),
    Case("model truncated", lambda c: _model_file(c, c.model.read_bytes()[:3000]), r"bad.safetensors: not a geoseg checkpoint"),
    Case("not a checkpoint", lambda c: _model_file(c, b"\x00\x01 certainly not weights" * 40),
         r"bad.safetensors: not a geoseg checkpoint"),
    Case("a pickle carrying code", _pickle_with_code,
         r"evil.pt: refused: the file is a pickle that needs code to load \(not executed\)"),
    Case("bands not matching the pipeline", lambda c: ["run", c.pipeline(read={"bands": [1, 2, 3]})],
         r"pipe.yaml: read.bands: selects 3 bands but the model expects 4 \(blue, green, red, nir\)"),
    Case("classes not matching the pipeline", lambda c: ["run", c.pipeline(write={"nodata": 3})],
         r"pipe.yaml: write.nodata: 3 is a class id of the model; use 255"),
]


# ----------------------------------------------------------------------------------------------- cluster, security


def _unsafe_yaml(ctx: Ctx) -> list[str]:
    marker = ctx.tmp / "PWNED"
    return _yaml_text(ctx, f"input: !!python/object/apply:os.system ['touch {marker}']\n")


CLUSTER_AND_SECURITY = [
    Case("scheduler address unreachable", lambda c: ["run", c.pipeline(
        cluster={"backend": "address", "address": "tcp://127.0.0.1:9", "timeout_s": 2})],
         r"cluster.address: tcp://127.0.0.1:9 refused the connection: no scheduler listens there"),
    Case("YAML with a code-running tag", _unsafe_yaml, r"pipe.yaml:1:\d+: YAML syntax error: could not determine a constructor"),
    Case("output path outside the output directory", lambda c: ["run", c.pipeline(
        vectorize={"enabled": True, "output": "../elsewhere.gpkg"})],
         r"pipe.yaml: vectorize.output: must be a file name inside output_dir, not a path"),
]


# ----------------------------------------------------------------------------------------------- training


def _train_yaml(ctx: Ctx, **extra) -> list[str]:  # noqa: ANN003
    scene = ctx.scene()
    labels = write_raster(ctx.tmp / "labels.tif", np.ones((30, 50), "uint8"))  # another grid than the scene
    data = {"output": str(ctx.out / "model.safetensors"), "bands": [{"index": i, "name": f"b{i}"} for i in (1, 2, 3, 4)],
            "classes": [{"id": 1, "name": "a", "color": "#ff0000"}, {"id": 2, "name": "b", "color": "#00ff00"}],
            "train": [{"image": str(scene), "labels": str(labels)}], "validation": {"window": {"row_off": 20}},
            "model": {"architecture": "fcn", "encoder": "none", "arch_kwargs": {"depth": 2, "width": 4}}, **extra}
    path = ctx.tmp / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    return ["train", str(path)]


TRAINING = [
    Case("training labels on another grid", _train_yaml, r"labels.tif: label grid differs from scene.tif"),
    Case("resume without a training state", lambda c: [*_train_yaml(c), "--resume"],
         r"model.train-state.pt: no training state to resume from; run without --resume"),
]

# ----------------------------------------------------------------------------------------------- run lifecycle


def _header(ctx: Ctx, **change) -> list[str]:  # noqa: ANN003
    """A checkpoint whose header has wrong-typed fields (the weights are fine)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(ctx.model), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()["geoseg"]) | change
    path = ctx.tmp / "bad-header.safetensors"
    save_file(state, str(path), metadata={"geoseg": json.dumps(header)})
    return ["run", ctx.pipeline(model=str(path))]


_BOMB = "".join(f"{a}: &{a} [" + ", ".join([f"*{p}"] * 9 if p else ['"lol"'] * 9) + "]\n"
                for p, a in zip(["", *"abcdefgh"], "abcdefghi"))


def _bomb_in_preset(ctx: Ctx) -> list[str]:
    (ctx.tmp / "preset.yaml").write_text(_BOMB + "tile: {size: *i}\n")
    path = Path(ctx.pipeline())
    path.write_text("extends: preset.yaml\n" + path.read_text())
    return ["run", str(path)]


def _self_cycle(ctx: Ctx) -> list[str]:
    (ctx.tmp / "sub").mkdir()
    path = Path(ctx.pipeline())
    path.write_text("extends: sub/../pipe.yaml\n" + path.read_text())
    return ["run", str(path)]


def _gcp_only(ctx: Ctx) -> list[str]:
    from rasterio.control import GroundControlPoint

    path = ctx.tmp / "gcps.tif"
    gcps = [GroundControlPoint(0, 0, 6e5, 5.3e6), GroundControlPoint(0, 50, 6.005e5, 5.3e6),
            GroundControlPoint(40, 0, 6e5, 5.2996e6)]
    with rasterio.open(path, "w", driver="GTiff", width=50, height=40, count=4, dtype="uint16") as dst:
        dst.write(np.full((4, 40, 50), 900, "uint16"))
        dst.gcps = (gcps, rasterio.crs.CRS.from_epsg(32632))
    return ["run", ctx.pipeline(path)]


def _vrt_missing_source(ctx: Ctx) -> list[str]:
    """A VRT as gdalbuildvrt writes it, over a tile that was moved away afterwards."""
    ctx.scene(name="part.tif")
    bands = "".join(f"""<VRTRasterBand dataType="UInt16" band="{b}"><SimpleSource>
        <SourceFilename relativeToVRT="1">part.tif</SourceFilename><SourceBand>{b}</SourceBand>
        <SrcRect xOff="0" yOff="0" xSize="50" ySize="40"/><DstRect xOff="0" yOff="0" xSize="50" ySize="40"/>
        </SimpleSource></VRTRasterBand>""" for b in (1, 2, 3, 4))
    vrt = ctx.tmp / "mosaic.vrt"
    vrt.write_text(f"""<VRTDataset rasterXSize="50" rasterYSize="40"><SRS>EPSG:32632</SRS>
        <GeoTransform>600000, 10, 0, 5300000, 0, -10</GeoTransform>{bands}</VRTDataset>""")
    with rasterio.open(vrt) as src:
        assert src.read(1).mean() > 0  # a working VRT
    (ctx.tmp / "part.tif").rename(ctx.tmp / "moved.tif")
    return ["run", ctx.pipeline(vrt)]


def _scaled(ctx: Ctx) -> list[str]:
    path = ctx.scene(name="scaled.tif")
    with rasterio.open(path, "r+") as dst:
        dst.scales, dst.offsets = (0.0001,) * 4, (-0.1,) * 4
    return ["run", ctx.pipeline(path)]


def _scaled_applied_works(ctx: Ctx) -> None:
    with rasterio.open(ctx.out / "landcover.tif") as dst:
        assert (dst.read(1) != 255).all()


def _gdal_disk_full(ctx: Ctx) -> list[str]:
    import rasterio.shutil
    from rasterio.errors import RasterioIOError

    def full(src, dst, **kw) -> None:  # noqa: ANN001, ANN003
        raise RasterioIOError("Free disk space available is 0 bytes, whereas 1048576 are at least necessary.")

    ctx.monkeypatch.setattr(rasterio.shutil, "copy", full)
    return ["run", ctx.pipeline()]


def _two_layers(ctx: Ctx) -> list[str]:
    import geopandas as gpd
    from shapely.geometry import box

    path = ctx.tmp / "ref2.gpkg"
    for layer in ("classes_2020", "classes_2024"):
        gpd.GeoDataFrame({"class": [1]}, geometry=[box(6e5, 5.2996e6, 6.005e5, 5.3e6)], crs="EPSG:32632").to_file(
            path, layer=layer)
    return ["evaluate", str(ctx.prediction()), str(path), "--out-dir", str(ctx.out)]


def _output_is_input(ctx: Ctx) -> list[str]:
    scene = ctx.scene(name="landcover.tif")
    return ["run", ctx.pipeline(scene, output_dir=str(ctx.tmp)), "--overwrite"]


def _folder_in_use(ctx: Ctx) -> list[str]:
    import os
    import subprocess
    import sys

    from geoseg.transaction import LOCK, _process_start

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ctx.monkeypatch.setattr(Ctx, "_holder", holder, raising=False)
    ctx.out.mkdir()
    (ctx.out / LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid,
                                            "start": _process_start(holder.pid), "started": "2026-12-01T01:00:00Z"}))
    return ["run", ctx.pipeline()]


def _own_style(ctx: Ctx) -> list[str]:
    ctx.out.mkdir()
    (ctx.out / "landcover.qml").write_text("<qgis>my own style</qgis>")
    return ["run", ctx.pipeline()]


def _batch_list(ctx: Ctx, lines: list[str]) -> list[str]:
    listing = ctx.tmp / "scenes.txt"
    listing.write_text("\n".join(lines) + "\n")
    return ["batch", ctx.pipeline(), "--scenes", str(listing)]


def _list_with_comments(ctx: Ctx) -> list[str]:
    ctx.scene(name="a.tif")
    ctx.scene(name="b#2.tif")
    return _batch_list(ctx, ["# tonight's scenes", "a.tif   # the first one", "b#2.tif"])


def _list_comments_work(ctx: Ctx) -> None:
    manifest = json.loads((ctx.out / "batch.json").read_text())
    assert [r["scene"] for r in manifest["scenes"]] == ["a", "b_2"] and manifest["ok"]


def _percent_href(ctx: Ctx) -> list[str]:
    (ctx.tmp / "S2 A").mkdir()
    scene = ctx.scene(name="S2 A/scene 1.tif")
    items = {"type": "FeatureCollection", "features": [{"type": "Feature", "id": "s2a", "properties": {},
             "assets": {"image": {"href": scene.absolute().as_uri()}}, "links": []}]}
    assert "%20" in items["features"][0]["assets"]["image"]["href"]
    (ctx.tmp / "items.json").write_text(json.dumps(items))
    return ["batch", ctx.pipeline(), "--scenes", str(ctx.tmp / "items.json")]


def _percent_href_works(ctx: Ctx) -> None:
    assert (ctx.out / "s2a" / "landcover.tif").exists()


def _manifest_name(ctx: Ctx) -> list[str]:
    ctx.scene(name="batch.json.tif")
    ctx.scene(name="other.tif")
    return _batch_list(ctx, ["batch.json.tif", "other.tif"])


def _manifest_name_works(ctx: Ctx) -> None:
    manifest = json.loads((ctx.out / "batch.json").read_text())
    assert manifest["ok"] and {r["scene"] for r in manifest["scenes"]} == {"batch.json-scene", "other"}
    assert (ctx.out / "batch.json-scene" / "landcover.tif").exists()


def _train_classes(ctx: Ctx, classes: list[dict]) -> list[str]:
    argv = _train_yaml(ctx)
    path = Path(argv[1])
    data = yaml.safe_load(path.read_text())
    data["classes"] = classes
    path.write_text(yaml.safe_dump(data))
    return argv


LIFECYCLE = [
    Case("scheduler address not a URL", lambda c: ["run", c.pipeline(cluster={"address": "not a url"})],
         r"pipe.yaml: cluster.address: 'not a url' is not a scheduler address; expected tcp://HOST:PORT"),
    Case("scheduler address with another scheme", lambda c: ["run", c.pipeline(cluster={"address": "udp://h:1"})],
         r"cluster.address: 'udp://h:1': scheme 'udp' is not one Dask speaks"),
    Case("scheduler address with a port that is not a number",
         lambda c: ["run", c.pipeline(cluster={"address": "tcp://host:abc"})],
         r"cluster.address: 'tcp://host:abc' is not a scheduler address"),
    Case("checkpoint header: normalisation not a list", lambda c: _header(c, mean=0),
         r"bad-header.safetensors: not a valid geoseg checkpoint: mean: expected one number per band"),
    Case("checkpoint header: a band without index", lambda c: _header(c, bands=[{"name": "blue"}] * 4),
         r"not a valid geoseg checkpoint: bands.0.index: Field required"),
    Case("checkpoint header: classes not a list", lambda c: _header(c, classes=7),
         r"not a valid geoseg checkpoint: classes: expected a list of \{id, name, color\}, got int"),
    Case("checkpoint header: encoder depth not a number",
         lambda c: _header(c, arch_kwargs={"depth": "five", "width": 12}),
         r"not a valid geoseg checkpoint: arch_kwargs: depth: 'five' is not a positive integer"),
    Case("class colour out of range", lambda c: _train_classes(c, [
        {"id": 1, "name": "a", "color": [0, 0, 999]}, {"id": 2, "name": "b", "color": "#00ff00"}]),
         r"train.yaml: classes.0.color: colour \[0, 0, 999\] is not three integers 0-255"),
    Case("class id outside 0-254", lambda c: _train_classes(c, [
        {"id": 1, "name": "a", "color": "#ff0000"}, {"id": 255, "name": "b", "color": "#00ff00"}]),
         r"train.yaml: classes.1.id: Input should be less than or equal to 254"),
    Case("duplicate class ids", lambda c: _train_classes(c, [
        {"id": 1, "name": "a", "color": "#ff0000"}, {"id": 1, "name": "b", "color": "#00ff00"}]),
         r"train.yaml: classes: class ids must be unique \(got \[1, 1\]\)"),
    Case("tile size beyond the limit", lambda c: ["run", c.pipeline(tile={"size": 100000})],
         r"pipe.yaml: tile.size: Input should be less than or equal to 8192"),
    Case("chunk beyond the limit", lambda c: ["run", c.pipeline(tile={"chunk_tiles": 100000})],
         r"pipe.yaml: tile: chunk_tiles 100000 makes chunks of 2,400,000 px a side, more than a task may hold "
         r"\(16,384\); use at most 682"),
    Case("YAML alias bomb", lambda c: _yaml_text(c, _BOMB + "tile: {size: *i}\n"),
         r"pipe.yaml: YAML aliases expand to more than 100,000 values; is it an alias bomb"),
    Case("YAML alias bomb in a preset", _bomb_in_preset, r"preset.yaml: YAML aliases expand to more than 100,000"),
    Case("extends cycle through another path", _self_cycle,
         r"pipe.yaml: extends: circular include \(pipe.yaml -> pipe.yaml\)"),
    Case("duplicate YAML keys", lambda c: _yaml_text(c, "tile:\n  size: 64\n  size: 128\n"),
         r"pipe.yaml:3:3: YAML syntax error: duplicate key 'size' \(first at line 2\)"),
    Case("raster with GCPs only", _gcp_only,
         r"gcps.tif: has ground control points but no geotransform; warp it onto a map grid first, e.g. gdalwarp"),
    Case("VRT whose source is missing", _vrt_missing_source,
         r"mosaic.vrt: source file missing: .*part.tif \(named in the VRT\)"),
    Case("scale/offset metadata", _scaled, r"scaled.tif: its bands carry scale/offset metadata \(scale 0.0001, "
         r"offset -0.1\); set read.scale_offset: apply"),
    Case("scale/offset applied (works)", lambda c: [*_scaled(c), "--set", "read.scale_offset=apply"],
         "the model sees physical values", works=_scaled_applied_works),
    Case("disk full, told by GDAL without a file name", _gdal_disk_full,
         r"out/landcover.tif: cannot write \(Free disk space available is 0 bytes.*\); is the disk full\?"),
    Case("reference with two layers and none named", _two_layers,
         r"ref2.gpkg: has 2 layers \(classes_2020, classes_2024\); name one with evaluate.layer"),
    Case("output that is the input, even with --overwrite", _output_is_input,
         r"output_dir: .*landcover.tif would replace the run's input"),
    Case("output folder in use by another run", _folder_in_use,
         r"out: another geoseg run is using this folder \(host .*, pid \d+, started 2026-12-01T01:00:00Z\)"),
    Case("the user's own style file in the output folder", _own_style,
         r"out/landcover.qml: exists and won't be overwritten without --overwrite"),
    Case("scene list with comments after paths (works)", _list_with_comments, "comments are not paths",
         works=_list_comments_work),
    Case("percent-encoded file:// href (works)", _percent_href, "decoded", works=_percent_href_works),
    Case("scene named like the batch manifest (works)", _manifest_name, "its folder gets a suffix",
         works=_manifest_name_works),
]

CATALOGUE = INPUTS + REFERENCES + CONFIG + MODELS + CLUSTER_AND_SECURITY + TRAINING + LIFECYCLE


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_catalogue(case: Case, tmp_path, fcn_checkpoint, client, capsys, monkeypatch):  # noqa: ANN001
    import time

    ctx = Ctx(tmp_path, fcn_checkpoint, client.scheduler.address, monkeypatch)
    argv = case.build(ctx)
    before = _snapshot(tmp_path)
    t0 = time.perf_counter()
    try:
        code = main(["-q", *argv])
    finally:
        holder = getattr(Ctx, "_holder", None)
        if holder is not None:
            holder.kill()
            holder.wait()
    assert time.perf_counter() - t0 < 60, "every case ends within a minute"
    err = capsys.readouterr().err
    if case.works:
        assert code == 0, err
        case.works(ctx)
        return
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("geoseg: error: ") and re.search(case.expect, lines[0]), lines[0]
    assert "Traceback" not in err
    after = _snapshot(tmp_path)
    assert all(after.get(name) == digest for name, digest in before.items()), "an existing file changed"
    new = set(after) - set(before)
    assert not [n for n in new if Path(n).name in FINISHED or Path(n).name.startswith(".") and "tmp" in n], new
    for name in new:
        if Path(name).name == "run.json":
            assert json.loads((tmp_path / name).read_text())["status"] == "failed"
    assert not (tmp_path / "PWNED").exists()


def test_the_catalogue_documents_every_case():
    """docs/errors.md lists each case of this file, and nothing else."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    rows = {m.group(1) for m in re.finditer(r"^\| ([^|]+?) \|", doc, re.M)} - {"case", "---"}
    documented_elsewhere = {"raster far larger than memory", "worker dying mid-task", "Ctrl-C or SIGTERM",
                            "no shell invocation with user strings", "dashboard on localhost only",
                            "killed at any moment (kill -9)", "two runs into one folder at once",
                            "input changed during the run", "scene across the antimeridian",
                            "paths relative to the config file", "a port that accepts but never answers as Dask"}
    assert rows == {c.id for c in CATALOGUE} | documented_elsewhere


def test_no_shell_invocations():
    """No user string can reach a shell: geoseg never asks for one."""
    package = Path(__file__).resolve().parents[1] / "geoseg"
    forbidden = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|subprocess\.getoutput")
    hits = [f"{p.name}:{n}" for p in package.rglob("*.py") for n, line in enumerate(p.read_text().splitlines(), 1)
            if forbidden.search(line)]
    assert hits == []


def test_dashboard_listens_on_localhost_only(tmp_path):  # noqa: ANN001
    """The scheduler's HTTP server (dashboard) of a local cluster and of a jobqueue cluster: 127.0.0.1 only."""
    import psutil

    from geoseg.cluster import open_client
    from geoseg.config import ClusterConfig
    from geoseg.hpc import jobqueue_cluster

    def http_listeners(link: str) -> set[str]:
        port = int(link.split(":")[2].split("/")[0])
        return {c.laddr.ip for c in psutil.Process().net_connections() if c.status == "LISTEN" and c.laddr.port == port}

    with open_client(ClusterConfig(n_workers=1, threads_per_worker=1)) as client:
        assert http_listeners(client.dashboard_link) == {"127.0.0.1"}
    cluster, _ = jobqueue_cluster(ClusterConfig(backend="slurm"))
    try:
        assert http_listeners(cluster.dashboard_link) == {"127.0.0.1"}
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):  # noqa: ANN001
    return tmp_path_factory.mktemp("fuzz")


def _fuzz_case():  # noqa: ANN202
    from hypothesis import strategies as st

    @st.composite
    def case(draw):  # noqa: ANN001, ANN202
        h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
        bands = draw(st.sampled_from([1, 4, 4, 5]))  # the model reads bands 1-4: mostly runs that get through
        dtype = draw(st.sampled_from(["uint8", "int16", "uint16", "float32"]))
        nodata = draw(st.sampled_from([None, 0, 7]))
        pattern = draw(st.sampled_from(["none", "corner", "all", "nan", "random"]))
        crs = draw(st.sampled_from(["EPSG:32632", "EPSG:4326"]))
        size = draw(st.sampled_from([8, 16, 24, 32, 64]))
        overlap = draw(st.integers(0, size // 4)) * 2
        seed = draw(st.integers(0, 2**16))
        return {"h": h, "w": w, "bands": bands, "dtype": dtype, "nodata": nodata, "pattern": pattern, "crs": crs,
                "tile": {"size": size, "overlap": overlap, "chunk_tiles": draw(st.integers(1, 3))},
                "stitch": {"blend": draw(st.sampled_from(["cosine", "crop"]))}, "seed": seed}

    return case()


def test_random_rasters_and_configs_either_work_or_fail_cleanly(fuzz_dir, fcn_checkpoint, client):  # noqa: ANN001
    from hypothesis import HealthCheck, given, settings

    from geoseg.config import PipelineConfig, validate
    from geoseg.errors import GeosegError
    from geoseg.pipeline import run_pipeline

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=_fuzz_case())
    def check(case) -> None:  # noqa: ANN001
        rng = np.random.default_rng(case["seed"])
        data = (rng.random((case["bands"], case["h"], case["w"])) * 120).astype(case["dtype"])
        if case["pattern"] == "corner":
            data[:, : case["h"] // 2, : case["w"] // 2] = case["nodata"] or 0
        elif case["pattern"] == "all":
            data[:] = case["nodata"] or 0
        elif case["pattern"] == "nan" and case["dtype"] == "float32":
            data[0, rng.random((case["h"], case["w"])) < 0.3] = np.nan
        elif case["pattern"] == "random":
            data[:, rng.random((case["h"], case["w"])) < 0.3] = case["nodata"] or 0
        transform = from_origin(6e5, 5.3e6, 10, 10) if case["crs"] != "EPSG:4326" else from_origin(7.5, 47.2, 1e-4, 1e-4)
        folder = fuzz_dir / f"c{case['seed']}-{abs(hash(json.dumps(case, sort_keys=True))) % 10**8}"
        folder.mkdir(exist_ok=True)
        scene = write_raster(folder / "in.tif", data, crs=case["crs"], transform=transform, nodata=case["nodata"])
        try:
            cfg = validate(PipelineConfig, {"input": str(scene), "model": str(fcn_checkpoint),
                                            "output_dir": str(folder / "out"), "overwrite": True, "tile": case["tile"],
                                            "stitch": case["stitch"], "vectorize": {"enabled": False}}, "fuzz.yaml", None)
            result = run_pipeline(cfg, client=client, progress=False)
        except GeosegError as exc:
            assert "\n" not in str(exc) and str(exc), repr(exc)
            return
        with rasterio.open(scene) as src, rasterio.open(result.landcover) as out:
            assert (out.crs, out.transform, out.shape) == (src.crs, src.transform, src.shape)

    check()
