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


def _disk_full(ctx: Ctx, monkeypatch) -> list[str]:  # noqa: ANN001
    import rasterio.shutil

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
         r"cluster.address: cannot reach scheduler tcp://127.0.0.1:9 within 2s"),
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

CATALOGUE = INPUTS + REFERENCES + CONFIG + MODELS + CLUSTER_AND_SECURITY + TRAINING


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_catalogue(case: Case, tmp_path, fcn_checkpoint, client, capsys, monkeypatch):  # noqa: ANN001
    ctx = Ctx(tmp_path, fcn_checkpoint, client.scheduler.address)
    build = case.build
    argv = build(ctx, monkeypatch) if build is _disk_full else build(ctx)
    before = _snapshot(tmp_path)
    code = main(["-q", *argv])
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
                            "paths relative to the config file"}
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

    from geoseg.cluster import jobqueue_cluster, open_client
    from geoseg.config import ClusterConfig

    def http_listeners(link: str) -> set[str]:
        port = int(link.split(":")[2].split("/")[0])
        return {c.laddr.ip for c in psutil.Process().net_connections() if c.status == "LISTEN" and c.laddr.port == port}

    with open_client(ClusterConfig(n_workers=1, threads_per_worker=1)) as client:
        assert http_listeners(client.dashboard_link) == {"127.0.0.1"}
    cluster = jobqueue_cluster(ClusterConfig(backend="slurm"))
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
