"""`geoseg run` end to end: georeferencing, seamless stitching, determinism, nodata, odd shapes, COG output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from geoseg.errors import InputError, OutputExistsError
from geoseg.models import build_model, load_checkpoint
from geoseg.pipeline import run_pipeline
from tests.conftest import make_checkpoint, pipeline_config, record_tasks, write_raster


def full_frame(checkpoint, image: np.ndarray, valid: np.ndarray, tta: str = "none") -> np.ndarray:  # noqa: ANN001
    """Reference: one forward pass over the whole scene (one per view with ``tta``), mapped to class ids."""
    spec, state = load_checkpoint(checkpoint)
    model = build_model(spec, state)
    x = (image.astype(np.float32) - np.float32(spec.mean)[:, None, None]) / np.float32(spec.std)[:, None, None]
    x[:, ~valid] = 0
    if tta != "none":
        return spec.classes.index_to_id()[tta_reference(model, x[None], tta)[0].argmax(0)]
    with torch.inference_mode():
        index = model(torch.from_numpy(x)[None]).argmax(1)[0].numpy()
    return spec.classes.index_to_id()[index]


def read(path):  # noqa: ANN001
    with rasterio.open(path) as src:
        return src.read(1)


def random_scene(tmp_path, shape, *, crs="EPSG:32632", transform=None, nodata=None, dtype="uint16", seed=0):  # noqa: ANN001
    rng = np.random.default_rng(seed)
    # smooth-ish structure so classes form regions, plus noise
    base = rng.normal(900, 400, size=(4, *shape))
    data = np.clip(base, 1, 5000).astype(dtype)
    return write_raster(tmp_path / "in.tif", data, crs=crs, transform=transform, nodata=nodata), data


@pytest.mark.parametrize(
    "crs,transform",
    [("EPSG:32632", from_origin(600000.0, 5300000.0, 10.0, 10.0)), ("EPSG:4326", from_origin(7.5, 47.2, 1e-4, 1e-4))],
    ids=["projected", "geographic"],
)
def test_output_grid_is_identical_to_input(tmp_path, client, fcn_checkpoint, crs, transform):  # noqa: ANN001
    src_path, _ = random_scene(tmp_path, (130, 170), crs=crs, transform=transform)
    cfg = pipeline_config(src_path, fcn_checkpoint, tmp_path / "out", tile={"size": 64, "overlap": 16})
    result = run_pipeline(cfg, client=client)
    with rasterio.open(src_path) as src, rasterio.open(result.landcover) as out:
        assert out.crs == src.crs and out.transform == src.transform and out.shape == src.shape
        assert out.count == 1 and out.dtypes[0] == "uint8" and out.nodata == 255


def test_stitched_equals_full_frame_and_is_seamless(tmp_path, client, fcn_checkpoint):  # noqa: ANN001
    """1024 x 1024, tile 256, overlap 32: blended tiles agree with one full-frame pass."""
    from geoseg.sample import make_sample

    sample = make_sample(tmp_path / "s", 1024, seed=11)
    with rasterio.open(sample.image) as src:
        image, valid = src.read(), src.read_masks(1) > 0
    expected = full_frame(fcn_checkpoint, image, valid)
    cfg = pipeline_config(sample.image, fcn_checkpoint, tmp_path / "out", tile={"size": 256, "overlap": 32})
    out = read(run_pipeline(cfg, client=client).landcover)
    disagree = (out != expected) & valid
    assert 1 - disagree[valid].mean() >= 0.999
    stride = 256 - 32
    near = np.minimum(np.arange(1024) % stride, stride - np.arange(1024) % stride) <= 16
    boundary = (near[:, None] | near[None, :]) & valid
    interior = ~(near[:, None] | near[None, :]) & valid
    assert disagree[boundary].mean() <= 2 * disagree[interior].mean() + 1e-4
    assert (out[~valid] == 255).all()


def test_smp_unet_runs_and_agrees_with_full_frame(tmp_path, client, unet_checkpoint, sample_scene):  # noqa: ANN001
    """A deep smp model sees less context per tile than full frame, so agreement is not exact.

    The exactness of the stitching is shown with the FCN above; this checks the smp path end to end (an
    offset or transposed tile would agree on about 1/6 of the pixels). Untrained smp models are far more
    context-sensitive than trained ones: 91-92% here, 99.5% for the trained demo model (docs/tiling.md).
    """
    with rasterio.open(sample_scene.image) as src:
        image, valid = src.read(), src.read_masks(1) > 0
    cfg = pipeline_config(sample_scene.image, unet_checkpoint, tmp_path / "out",
                          tile={"size": 128, "overlap": 32}, read={"bands": [1, 2, 3, 4]})
    out = read(run_pipeline(cfg, client=client).landcover)
    pad = ((0, (-image.shape[1]) % 8), (0, (-image.shape[2]) % 8))
    padded = np.pad(image, ((0, 0), *pad), mode="reflect")
    expected = full_frame(unet_checkpoint, padded, np.pad(valid, pad, mode="reflect"))[: out.shape[0], : out.shape[1]]
    assert ((out == expected) | ~valid).mean() > 0.85


def test_identical_across_workers_and_reruns(tmp_path, client, fcn_checkpoint, sample_scene):  # noqa: ANN001
    from distributed import Client, LocalCluster

    def run(name, c, **kw):  # noqa: ANN001, ANN003
        cfg = pipeline_config(sample_scene.image, fcn_checkpoint, tmp_path / name,
                              tile={"size": 96, "overlap": 32}, infer={"torch_threads": 1}, **kw)
        return read(run_pipeline(cfg, client=c).landcover)

    one = run("a", client)
    assert np.array_equal(one, run("b", client))  # rerun
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
            Client(cl) as two_workers:
        assert len(two_workers.scheduler_info()["workers"]) == 2
        assert np.array_equal(one, run("c", two_workers))


def test_outputs_written_on_the_workers_are_the_bytes_the_client_writes(tmp_path, client, fcn_checkpoint,
                                                                        sample_scene):  # noqa: ANN001
    """write.on_workers: every output of the worker-side path (COGs, styles, categories, GeoPackage, reports,
    scores) byte for byte the streaming path's, run into the same folder (outputs name their folder)."""
    import shutil

    from tests.test_transaction import digests

    out = tmp_path / "out"

    def run(on_workers: bool) -> dict[str, str]:
        shutil.rmtree(out, ignore_errors=True)
        cfg = pipeline_config(sample_scene.image, fcn_checkpoint, out, tile={"size": 64, "overlap": 16},
                              write={"confidence": "uint8", "keep_scores": True, "on_workers": on_workers},
                              vectorize={"block": 64}, evaluate={"reference": str(sample_scene.labels)})
        result = run_pipeline(cfg, client=client)
        assert {"landcover", "confidence", "vector", "scores", "categories"} <= set(result.outputs)
        assert result.metrics is not None and result.stats["polygons"] > 0
        assert not (out / ".geoseg-work").exists()
        found = digests(out)
        found.pop("pipeline-config.json")  # records write.on_workers itself
        # the domain guard's sample is read on a worker too: the same report
        found["domain"] = json.dumps(json.loads((out / "run.json").read_text())["domain"], sort_keys=True)
        assert result.domain is not None and result.domain["input"]["pixels"] > 0
        return found

    from distributed import get_task_stream

    streamed = run(False)
    assert len([n for n in streamed if not n.startswith("scores.zarr")]) >= 10
    with get_task_stream(client) as stream:
        assert run(True) == streamed
    assert [r for r in stream.data if str(r["key"]).startswith("geoseg-finish-out-")]  # it ran as a task


def test_inference_tasks_reach_the_scheduler_with_priority_and_gpu_resource(tmp_path, fcn_checkpoint, monkeypatch):  # noqa: ANN001
    """Longest chunks first, and GPU tasks restricted to GPU workers, as the scheduler sees them."""
    from distributed import Client, LocalCluster

    import geoseg.segment as segment

    as_if_cuda = segment.infer_annotations
    monkeypatch.setattr(segment, "infer_annotations", lambda device, n, limited: as_if_cuda("cuda", n, limited))
    src_path, _ = random_scene(tmp_path, (200, 130))
    # tile 64, overlap 16, chunk_tiles 2: stride 48, chunks of 96 px; 200 x 130 -> 4 x 3 tiles inside the scene,
    # 3 x 2 chunks holding 2, 2, 0 (the last, 8 px, is covered by its neighbour's tiles) x 2, 1 tiles
    cfg = pipeline_config(src_path, fcn_checkpoint, tmp_path / "out", tile={"size": 64, "overlap": 16,
                                                                           "chunk_tiles": 2})
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                      resources={"GPU": 1}) as cluster, Client(cluster) as c:
        seen = record_tasks(cluster.scheduler)
        run_pipeline(cfg, client=c)
    infer = {key: task for key, task in seen.items() if key.startswith("geoseg-infer")}
    grid_tiles = {f"{i}-{j}": n for (i, j), n in np.ndenumerate(np.outer([2, 2, 0], [2, 1]))}
    assert len(infer) == 6
    for key, (priority, resources) in infer.items():
        assert resources == {"GPU": 1}
        i, j = key.rsplit("-", 2)[1:]
        assert -priority[0] == grid_tiles[f"{i}-{j}"]  # distributed stores -priority first


@pytest.mark.parametrize("blend", ["crop", "cosine"])
def test_chunking_batch_size_and_threads_do_not_change_the_result(tmp_path, client, fcn_checkpoint, sample_scene,
                                                                  blend):  # noqa: ANN001
    def run(name, chunk_tiles, batch, threads):  # noqa: ANN001
        cfg = pipeline_config(sample_scene.image, fcn_checkpoint, tmp_path / name, stitch={"blend": blend},
                              tile={"size": 64, "overlap": 16, "chunk_tiles": chunk_tiles},
                              infer={"batch_size": batch, "torch_threads": threads})
        return read(run_pipeline(cfg, client=client).landcover)

    base = run("a", 1, 1, 1)
    for name, args in {"b": (3, 1, 1), "c": (2, 4, 2), "d": (5, 2, 1)}.items():
        other = run(name, *args)
        if blend == "crop" and args[2] == 1:
            assert np.array_equal(base, other)
        assert (base == other).mean() >= 0.9999


def test_nodata_and_nan_become_output_nodata_never_class_zero(tmp_path, client):  # noqa: ANN001
    classes = [{"id": 0, "name": "zero", "color": "#000000"}, {"id": 1, "name": "one", "color": "#ffffff"}]
    ckpt = make_checkpoint(tmp_path / "m.safetensors", classes=classes)
    rng = np.random.default_rng(1)
    data = rng.normal(900, 300, size=(4, 90, 120)).astype("float32")
    data[:, :10, :] = -9999.0  # nodata rows
    data[2, 50:55, 60:70] = np.nan  # NaN in one band only
    data[0, 70, 5] = np.inf
    src = write_raster(tmp_path / "f.tif", data, nodata=-9999.0)
    out = read(run_pipeline(pipeline_config(src, ckpt, tmp_path / "o", tile={"size": 64, "overlap": 16}),
                            client=client).landcover)
    invalid = np.zeros(out.shape, bool)
    invalid[:10] = True
    invalid[50:55, 60:70] = True
    invalid[70, 5] = True
    assert (out[invalid] == 255).all()
    assert set(np.unique(out[~invalid])) <= {0, 1} and (out[~invalid] != 255).all()


def test_nodata_override_for_rasters_without_nodata(tmp_path, client, fcn_checkpoint):  # noqa: ANN001
    data = np.full((4, 40, 50), 1000, dtype="int16")
    data[:, :, :7] = -1
    src = write_raster(tmp_path / "i.tif", data)  # no nodata set
    cfg = pipeline_config(src, fcn_checkpoint, tmp_path / "o", tile={"size": 32, "overlap": 8}, read={"nodata": -1})
    out = read(run_pipeline(cfg, client=client).landcover)
    assert (out[:, :7] == 255).all() and (out[:, 7:] != 255).all()


def test_all_nodata_scene_skips_the_model(tmp_path, client, fcn_checkpoint, monkeypatch):  # noqa: ANN001
    import geoseg.segment.predict

    def boom(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("the model must not run on an all-nodata scene")

    monkeypatch.setattr(geoseg.segment.predict.Predictor, "predict", boom)
    src = write_raster(tmp_path / "e.tif", np.zeros((4, 70, 90), dtype="uint16"), nodata=0)
    result = run_pipeline(pipeline_config(src, fcn_checkpoint, tmp_path / "o", tile={"size": 32, "overlap": 8}),
                          client=client)
    assert (read(result.landcover) == 255).all()
    assert json.loads(result.manifest.read_text())["stats"]["valid_pixels"] == 0


@pytest.mark.parametrize("shape", [(1, 37), (29, 1), (1, 1), (20, 30), (301, 257)])
def test_odd_shapes_match_full_frame(tmp_path, client, fcn_checkpoint, shape):  # noqa: ANN001
    src, data = random_scene(tmp_path, shape, seed=sum(shape))
    cfg = pipeline_config(src, fcn_checkpoint, tmp_path / "o", tile={"size": 64, "overlap": 16})
    out = read(run_pipeline(cfg, client=client).landcover)
    assert out.shape == shape
    if min(shape) >= 16:  # reflect padding and zero padding agree only away from the scene border
        expected = full_frame(fcn_checkpoint, data, np.ones(shape, bool))
        assert np.array_equal(out[8:-8, 8:-8], expected[8:-8, 8:-8])
    assert (out != 255).all()


def test_smp_model_on_sizes_not_multiple_of_its_stride(tmp_path, client, unet_checkpoint):  # noqa: ANN001
    src, _ = random_scene(tmp_path, (45, 83))
    out = read(run_pipeline(pipeline_config(src, unet_checkpoint, tmp_path / "o", tile={"size": 64, "overlap": 16}),
                            client=client).landcover)
    assert out.shape == (45, 83) and (out != 255).all()


def test_cog_with_colour_table_overviews_names_and_confidence(tmp_path, client, fcn_checkpoint):  # noqa: ANN001
    src, _ = random_scene(tmp_path, (1100, 700))
    cfg = pipeline_config(src, fcn_checkpoint, tmp_path / "o", tile={"size": 256, "overlap": 32},
                          write={"confidence": "uint8", "keep_scores": True})
    result = run_pipeline(cfg, client=client)
    with rasterio.open(result.landcover) as out:
        assert out.colormap(1)[1] == (31, 120, 180, 255) and out.colormap(1)[255][3] == 0
        assert out.overviews(1) and out.profile["tiled"] and out.compression.name.lower() == "deflate"
        assert json.loads(out.tags()["CLASS_NAMES"])["1"] == "water"
        labels = out.read(1)
    assert "built-up" in result.landcover.with_suffix(".qml").read_text()
    with rasterio.open(result.outputs["confidence"]) as conf_ds:
        conf = conf_ds.read(1)
    assert conf.max() <= 250 and conf.min() >= 250 // 6 - 1  # top probability of 6 classes is at least 1/6
    import zarr

    scores = zarr.open_array(result.outputs["scores"], mode="r")[:]
    assert np.allclose(scores.astype(np.float32).sum(0), 1.0, atol=0.01)
    ids = np.array([1, 2, 3, 4, 5, 6])
    assert np.array_equal(ids[scores.argmax(0)], labels) or (ids[scores.argmax(0)] == labels).mean() > 0.999


def test_existing_output_is_not_overwritten_unless_asked(tmp_path, client, fcn_checkpoint):  # noqa: ANN001
    src, _ = random_scene(tmp_path, (40, 40))
    cfg = pipeline_config(src, fcn_checkpoint, tmp_path / "o", tile={"size": 32, "overlap": 8})
    first = run_pipeline(cfg, client=client)
    before = first.landcover.read_bytes()
    assert run_pipeline(cfg, client=client).landcover == first.landcover  # the same run: nothing to do
    other = cfg.model_copy(update={"tile": cfg.tile.model_copy(update={"overlap": 4})})
    with pytest.raises(OutputExistsError, match="landcover.tif: exists and won't be overwritten without --overwrite"):
        run_pipeline(other, client=client)
    assert first.landcover.read_bytes() == before
    fingerprint = json.loads(first.manifest.read_text())["fingerprint"]
    run_pipeline(other.model_copy(update={"overwrite": True}), client=client)
    assert json.loads(first.manifest.read_text())["fingerprint"] != fingerprint


def test_failed_run_leaves_no_output_that_looks_complete(tmp_path, client, fcn_checkpoint, monkeypatch):  # noqa: ANN001
    import geoseg.segment.tasks

    def broken(*a, **k):  # noqa: ANN002, ANN003
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(geoseg.segment.tasks, "classify", broken)
    src, _ = random_scene(tmp_path, (40, 40))
    out_dir = tmp_path / "o"
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_pipeline(pipeline_config(src, fcn_checkpoint, out_dir, tile={"size": 32, "overlap": 8}), client=client)
    names = sorted(p.name for p in out_dir.iterdir())
    # the hidden scratch folder stays so that a rerun resumes from the finished chunks
    assert names == [".geoseg-work", "pipeline-config.json", "run.json"]
    assert not list((out_dir / ".geoseg-work").glob("*.tif"))
    manifest = json.loads((out_dir / "run.json").read_text())
    assert manifest["status"] == "failed" and "disk on fire" in manifest["error"]


def test_run_manifest(tmp_path, client, fcn_checkpoint, sample_scene):  # noqa: ANN001
    cfg = pipeline_config(sample_scene.image, fcn_checkpoint, tmp_path / "o", tile={"size": 64, "overlap": 16})
    result = run_pipeline(cfg, client=client)
    manifest = json.loads(result.manifest.read_text())
    assert manifest["status"] == "done" and manifest["geoseg_version"]
    assert manifest["config"]["tile"]["size"] == 64 and manifest["config"]["input"] == str(sample_scene.image)
    assert manifest["inputs"]["raster"]["size"] == sample_scene.image.stat().st_size
    assert len(manifest["inputs"]["model"]["sha256"]) == 64
    assert set(manifest["timings_s"]) == {"read", "tile_infer_stitch", "write", "vectorize"}
    assert manifest["stats"]["polygons"] > 0 and manifest["outputs"]["vector"].endswith("landcover.gpkg")
    assert set(manifest["stats"]["task_seconds"]) == {"tile", "infer", "stitch"}
    assert all(v > 0 for v in manifest["stats"]["task_seconds"].values()), manifest["stats"]
    for path in manifest["outputs"].values():
        assert (tmp_path / "o" / path).exists()
    assert json.loads((tmp_path / "o" / "pipeline-config.json").read_text())["tile"]["overlap"] == 16
    assert len(manifest["fingerprint"]) == 64 and manifest["stats"]["chunks_resumed"] == 0
    # the scratch stores are gone once the outputs are complete, and no temporary file is left
    assert not (tmp_path / "o" / ".geoseg-work").exists() and not list((tmp_path / "o").glob(".*tmp*"))


def test_unusable_rasters_are_refused(tmp_path, fcn_checkpoint):  # noqa: ANN001
    from geoseg.config import ReadConfig
    from geoseg.models import read_model_spec
    from geoseg.read import read_raster

    spec = read_model_spec(fcn_checkpoint)
    (tmp_path / "x.tif").write_text("hello")
    with pytest.raises(InputError, match="not a raster GDAL can read"):
        read_raster(tmp_path / "x.tif", ReadConfig(), spec)
    three = write_raster(tmp_path / "three.tif", np.ones((3, 8, 8), "uint8"))
    with pytest.raises(InputError, match="has 3 bands but the model's bands asks for band 4"):
        read_raster(three, ReadConfig(), spec)
    with rasterio.open(tmp_path / "nocrs.tif", "w", driver="GTiff", width=8, height=8, count=4, dtype="uint8",
                       transform=from_origin(0, 8, 1, 1)) as dst:
        dst.write(np.ones((4, 8, 8), "uint8"))
    with pytest.raises(InputError, match="has no CRS"):
        read_raster(tmp_path / "nocrs.tif", ReadConfig(), spec)
    from affine import Affine

    sheared = write_raster(tmp_path / "rot.tif", np.ones((4, 8, 8), "uint8"), transform=Affine(1, 0.5, 0, 0.2, -1, 8))
    with pytest.raises(InputError, match="rotated or sheared"):
        read_raster(sheared, ReadConfig(), spec)


def test_band_order_mismatch_is_refused_with_the_fix(tmp_path, fcn_checkpoint):  # noqa: ANN001
    from geoseg.config import ReadConfig
    from geoseg.models import read_model_spec
    from geoseg.read import read_raster

    spec = read_model_spec(fcn_checkpoint)
    path = write_raster(tmp_path / "rgbn.tif", np.ones((4, 8, 8), "uint16"),
                        descriptions=["red", "green", "blue", "nir"])
    with pytest.raises(InputError, match=r"not the model's bands in order \(blue, green, red, nir\); "
                                         r"set read.bands: \[3, 2, 1, 4\]"):
        read_raster(path, ReadConfig(), spec)
    assert read_raster(path, ReadConfig(bands=[3, 2, 1, 4]), spec).bands == (3, 2, 1, 4)


def d4_views(tta: str) -> list[tuple[int, bool]]:
    """The views of each TTA mode, written out independently of geoseg's table."""
    return {"flips": [(0, False), (0, True), (2, False), (2, True)],
            "d4": [(k, m) for k in range(4) for m in (False, True)]}[tta]


def tta_reference(model, x: np.ndarray, tta: str) -> np.ndarray:  # noqa: ANN001
    """Class probabilities averaged over the views, with numpy doing the turning: (N, bands, H, W) in."""
    total = 0
    for k, mirror in d4_views(tta):
        v = np.rot90(x[..., ::-1] if mirror else x, k, axes=(-2, -1))
        with torch.inference_mode():
            p = torch.softmax(model(torch.from_numpy(np.ascontiguousarray(v))), 1).numpy()
        p = np.rot90(p, -k, axes=(-2, -1))
        total = total + (p[..., ::-1] if mirror else p)
    return total / len(d4_views(tta))


def fp32_predictor(checkpoint):  # noqa: ANN001
    from geoseg.fingerprint import model_digest
    from geoseg.segment.predict import ModelKey, Predictor

    return Predictor(ModelKey(str(checkpoint), model_digest(checkpoint), "cpu", "fp32", False))


@pytest.mark.parametrize("tta", ["flips", "d4"])
def test_tta_averages_the_probabilities_of_the_views(fcn_checkpoint, tta):  # noqa: ANN001
    pred = fp32_predictor(fcn_checkpoint)
    x = np.random.default_rng(3).normal(size=(3, 4, 24, 24)).astype(np.float32)
    got = pred.predict(x, batch_size=2, tta=tta, threads=1)
    assert np.allclose(got, tta_reference(pred.model, x, tta), atol=1e-6)
    assert not np.allclose(got, pred.predict(x, batch_size=2, threads=1), atol=1e-3)  # the views do differ


def test_d4_tta_is_exact_for_a_rotation_invariant_model_and_makes_any_model_equivariant(fcn_checkpoint):  # noqa: ANN001
    pred = fp32_predictor(fcn_checkpoint)
    x = np.random.default_rng(4).normal(size=(2, 4, 32, 32)).astype(np.float32)
    # Any model under d4: turning or mirroring the input turns or mirrors the probabilities.
    d4 = pred.predict(x, tta="d4", threads=1)
    turned = np.ascontiguousarray(np.rot90(x[..., ::-1], 1, axes=(-2, -1)))
    assert np.allclose(pred.predict(turned, tta="d4", threads=1), np.rot90(d4[..., ::-1], 1, axes=(-2, -1)),
                       atol=1e-6)
    # A model that is itself invariant (kernels with the square's symmetries): the views add nothing.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    with torch.no_grad():
        w = conv.weight
        conv.weight.copy_(sum(torch.rot90(w.flip(-1) if m else w, k, (-2, -1)) for k in range(4)
                              for m in (False, True)) / 8)
    pred.model = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Conv2d(8, pred.n_classes, 1)).eval()
    plain, d4 = pred.predict(x, threads=1), pred.predict(x, tta="d4", threads=1)
    assert np.allclose(d4, plain, atol=1e-6) and np.array_equal(d4.argmax(1), plain.argmax(1))


def test_tta_is_seamless_and_does_not_depend_on_chunking(tmp_path, client, fcn_checkpoint):  # noqa: ANN001
    """d4 through the pipeline's tiling and blending agrees with d4 over the whole frame at once."""
    from geoseg.sample import make_sample

    sample = make_sample(tmp_path / "s", 384, seed=12)
    with rasterio.open(sample.image) as src:
        image, valid = src.read(), src.read_masks(1) > 0
    expected = full_frame(fcn_checkpoint, image, valid, tta="d4")

    def run(name, chunk_tiles):  # noqa: ANN001
        cfg = pipeline_config(sample.image, fcn_checkpoint, tmp_path / name, infer={"tta": "d4"},
                              tile={"size": 128, "overlap": 32, "chunk_tiles": chunk_tiles})
        return read(run_pipeline(cfg, client=client).landcover)

    out = run("a", 1)
    assert np.array_equal(out, run("b", 2))
    disagree = (out != expected) & valid
    assert 1 - disagree[valid].mean() >= 0.999
    stride = 128 - 32
    near = np.minimum(np.arange(384) % stride, stride - np.arange(384) % stride) <= 16
    seams = (near[:, None] | near[None, :]) & valid
    assert disagree[seams].mean() <= 2 * disagree[~seams & valid].mean() + 1e-3


def test_tta_true_in_an_older_config_means_the_flips(tmp_path, fcn_checkpoint):  # noqa: ANN001
    from geoseg.config import InferConfig

    src, _ = random_scene(tmp_path, (8, 8))
    assert pipeline_config(src, fcn_checkpoint, tmp_path / "o", infer={"tta": True}).infer.tta == "flips"
    assert InferConfig(tta=False).tta == InferConfig().tta == "none"


@pytest.mark.real_data
@pytest.mark.parametrize("scene,bands", [("nc-landsat7/scene.tif", 6), ("flair2/IMG_000473.tif", 5)],
                         ids=["landsat7-epsg32119", "flair2-epsg2154"])
def test_real_imagery_keeps_its_grid(tmp_path, client, scene, bands):  # noqa: ANN001
    """Real rasters from ../shared/data (read in place, never copied): output on exactly their grid."""
    from tests.conftest import SHARED_DATA

    path = SHARED_DATA / scene
    if not path.exists():
        pytest.skip(f"real imagery not available: {path} is absent (see ../shared/data/README.md)")
    ckpt = make_checkpoint(tmp_path / "m.safetensors", bands=[{"index": i + 1, "name": f"b{i + 1}"}
                                                                 for i in range(bands)])
    result = run_pipeline(pipeline_config(path, ckpt, tmp_path / "o", tile={"size": 128, "overlap": 32}),
                          client=client)
    with rasterio.open(path) as src, rasterio.open(result.landcover) as out:
        assert (out.crs, out.transform, out.shape) == (src.crs, src.transform, src.shape)
        labels = out.read(1)
    assert (labels != 255).mean() > 0.95 and set(np.unique(labels)) <= {1, 2, 3, 4, 5, 6, 255}


def test_the_model_header_is_read_once_per_run(tmp_path, client, fcn_checkpoint, monkeypatch):  # noqa: ANN001
    import geoseg.models
    from geoseg.models import read_model_spec

    headers = []
    load = geoseg.models.load_checkpoint

    def counted(path, weights=True):  # noqa: ANN001, ANN202
        if not weights:
            headers.append(path)
        return load(path, weights)

    monkeypatch.setattr(geoseg.models, "load_checkpoint", counted)
    src_path, _ = random_scene(tmp_path, (70, 90))
    cfg = pipeline_config(src_path, fcn_checkpoint, tmp_path / "a", tile={"size": 32, "overlap": 8})
    run_pipeline(cfg, client=client)
    assert len(headers) == 1
    spec = read_model_spec(fcn_checkpoint)  # what geoseg run does: read and check once, then hand it on
    headers.clear()
    run_pipeline(cfg.model_copy(update={"output_dir": tmp_path / "b"}), client=client, spec=spec)
    assert headers == []


def test_writers_in_several_threads_keep_every_block(tmp_path):  # noqa: ANN001
    """Scenes in flight at once write their COGs from threads of one process while other threads read
    (in-process workers): GDAL lost parts of deflate GeoTIFF tiles rewritten in part (1 file in ~15)."""
    import threading

    from rasterio.windows import Window

    from geoseg.grid import RasterGrid
    from geoseg.workerenv import GDAL_CACHE_MB
    from geoseg.write import RasterWriter, scratch_block

    size, step = 1024, 96
    grid = RasterGrid(rasterio.crs.CRS.from_epsg(32632), from_origin(500000, 5000000, 10, 10), size, size)
    source = write_raster(tmp_path / "in.tif", np.random.default_rng(0).integers(0, 5000, (4, 2048, 2048),
                                                                                  dtype="uint16"))
    lost: list[tuple[int, int]] = []
    done = threading.Event()

    def read() -> None:
        rng = np.random.default_rng()
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), rasterio.open(source) as src:
            while not done.is_set():
                y, x = rng.integers(0, 1900, 2)
                src.read(window=Window(x, y, 148, 148))

    def write(k: int) -> None:
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):  # as each scene's run_pipeline does
            rng = np.random.default_rng(k)
            data = rng.integers(0, 7, (size, size), dtype="uint8")
            writer = RasterWriter(tmp_path / f"{k}.tif", grid, "uint8", 255, overviews=False,
                                  block=scratch_block(step))
            windows = [Window(j, i, min(step, size - j), min(step, size - i))
                       for i in range(0, size, step) for j in range(0, size, step)]
            for w in rng.permutation(len(windows)):
                writer.write(windows[w], data[windows[w].toslices()])
            with rasterio.open(writer.close()) as src:
                if (bad := int((src.read(1) != data).sum())):
                    lost.append((k, bad))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for round_ in range(16):
            threads = [threading.Thread(target=write, args=(3 * round_ + t,)) for t in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        done.set()
        for t in readers:
            t.join()
    assert not lost  # (file, pixels lost)
