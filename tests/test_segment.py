"""The scene graph from Python: same classes as `geoseg run`, a model loaded once, nothing left on the cluster."""

from __future__ import annotations

import numpy as np
import rasterio

from geoseg.config import ReadConfig, SegmentConfig
from geoseg.models import read_model_spec
from geoseg.pipeline import run_pipeline
from geoseg.read import read_raster
from geoseg.segment import SegmentStats, model_key, segment_scene
from tests.conftest import pipeline_config, record_tasks


def worker_plugins(client) -> list[str]:
    return list(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.worker_plugins)))


def test_scene_graph_from_python_gives_the_classes_of_geoseg_run(tmp_path, client, unet_checkpoint, sample_scene):
    tile = {"size": 64, "overlap": 16, "chunk_tiles": 2}
    cfg = SegmentConfig(model=unet_checkpoint, tile=tile)
    raster = read_raster(sample_scene.image, ReadConfig(), read_model_spec(unet_checkpoint))
    stats = SegmentStats()
    labels = np.full((raster.height, raster.width), 254, dtype=np.uint8)
    for block in segment_scene(raster, cfg, client, tmp_path / "scratch", stats=stats):
        labels[block.window.toslices()] = block.labels
    assert not (tmp_path / "scratch").exists()  # the scratch folder goes once every block is out
    assert stats.tiles_inferred > 0 and stats.valid_pixels == int((labels != 255).sum())

    result = run_pipeline(pipeline_config(sample_scene.image, unet_checkpoint, tmp_path / "run", tile=tile,
                                          vectorize={"enabled": False}), client=client)
    with rasterio.open(result.landcover) as src:
        assert np.array_equal(src.read(1), labels)


def test_the_model_plugin_is_removed_when_the_run_ends(tmp_path, client, fcn_checkpoint, sample_scene):
    before = worker_plugins(client)
    run_pipeline(pipeline_config(sample_scene.image, fcn_checkpoint, tmp_path / "o", tile={"size": 64, "overlap": 16},
                                 vectorize={"enabled": False}), client=client)
    assert not [p for p in worker_plugins(client) if p.startswith("geoseg-model")]
    assert worker_plugins(client) == before


def test_scenes_with_other_settings_reuse_the_loaded_model(tmp_path, client, fcn_checkpoint, monkeypatch):
    """Batch size and threads are per-call settings: a batch of scenes loads the model once per worker."""
    import geoseg.segment.predict as predict
    from geoseg.batch import expand_scenes, run_batch
    from tests.test_batch import scenes_in

    loads = []
    real = predict.Predictor.__init__

    def counting(self, key):
        loads.append(key)
        real(self, key)

    monkeypatch.setattr(predict.Predictor, "__init__", counting)
    predict._MODELS.clear()
    scenes_in(tmp_path / "in", n=2)
    scenes_in(tmp_path / "in2", n=1, shape=(70, 150))
    cfg = pipeline_config(tmp_path / "in" / "scene0.tif", fcn_checkpoint, tmp_path / "out",
                          tile={"size": 64, "overlap": 16}, vectorize={"enabled": False},
                          batch={"concurrent_scenes": 1})
    other = cfg.model_copy(update={"infer": cfg.infer.model_copy(update={"batch_size": 5, "torch_threads": 1}),
                                   "output_dir": tmp_path / "out2"})
    # Scenes of two sizes, then other batch sizes and threads, while the model stays on the workers.
    with predict.model_on_workers(client, model_key(cfg.segment)):
        report = run_batch(cfg, expand_scenes(str(tmp_path / "in*" / "*.tif")), client=client)
        assert report.ok and len(report.rows) == 3
        assert run_batch(other, expand_scenes(str(tmp_path / "in" / "*.tif")), client=client).ok
    assert len(loads) == 1, loads
    assert not [p for p in worker_plugins(client) if p.startswith("geoseg-model")]


def test_the_device_path_blends_as_the_host_path_does(tmp_path, unet_checkpoint, sample_scene):
    """Normalising, blending and accumulating where the model runs (the CUDA path), run here on the CPU."""
    import zarr

    from geoseg.fingerprint import model_digest
    from geoseg.segment import tile_grid
    from geoseg.segment.accumulate import AccumulatorLayout
    from geoseg.segment.predict import ModelKey
    from geoseg.segment.tasks import InferSettings, infer_chunk
    from geoseg.segment.tiles import create_tile_store, write_chunk

    raster = read_raster(sample_scene.image, ReadConfig(), read_model_spec(unet_checkpoint))
    cfg = SegmentConfig(model=unet_checkpoint, tile={"size": 128, "overlap": 32, "chunk_tiles": 2})
    grid = tile_grid(raster.height, raster.width, cfg)
    key = ModelKey(str(unet_checkpoint), model_digest(unet_checkpoint), "cpu", "fp32", False)
    create_tile_store(tmp_path / "t.zarr", raster, grid)
    for (i, j), _ in grid.chunk_windows():
        write_chunk(raster, str(tmp_path / "t.zarr"), grid, i, j)
    sums = {}
    for on_device in (False, True):
        layout = AccumulatorLayout(grid, 6)
        path = str(tmp_path / f"a{on_device}.zarr")
        layout.create(path)
        for blend, tta in (("crop", "none"), ("cosine", "none"), ("crop", "d4")):
            n = infer_chunk(str(tmp_path / "t.zarr"), path, layout, 0, 0, key,
                            InferSettings(batch_size=3, tta=tta, blend=blend, threads=1, on_device=on_device), 1)
            assert n == 4
            sums[on_device, blend, tta] = zarr.open_group(path)["core"][:]
    for blend, tta in (("crop", "none"), ("cosine", "none"), ("crop", "d4")):
        assert np.allclose(sums[True, blend, tta], sums[False, blend, tta], atol=1e-5)
    assert not np.allclose(sums[False, "crop", "d4"], sums[False, "crop", "none"], atol=1e-3)


def test_only_inference_tasks_hold_the_inference_slot(tmp_path, fcn_checkpoint, sample_scene):
    """The scheduler sees the INFER restriction on inference tasks alone: reading and stitching never wait for
    a slot, so a worker with more threads than slots reads while it infers."""
    from distributed import Client, LocalCluster

    from geoseg.workerenv import INFER

    cfg = SegmentConfig(model=fcn_checkpoint, tile={"size": 64, "overlap": 16, "chunk_tiles": 1})
    raster = read_raster(sample_scene.image, ReadConfig(), read_model_spec(fcn_checkpoint))
    with LocalCluster(n_workers=1, threads_per_worker=3, processes=False, resources={INFER: 1},
                      dashboard_address=None) as cluster, Client(cluster) as c:
        seen = record_tasks(cluster.scheduler)
        blocks = list(segment_scene(raster, cfg, c, tmp_path / "scratch"))
    stages = {"tile": [], "infer": [], "stitch": []}
    for key, (_, held) in seen.items():
        stages[key.split("-")[1]].append(held)
    assert len(blocks) == len(stages["stitch"]) == len(stages["infer"]) == len(stages["tile"]) > 4
    assert all(held == {INFER: 1} for held in stages["infer"])
    assert all(held == {} for held in stages["tile"] + stages["stitch"])
