"""The sample scene generator: georeferenced, deterministic, windowed with bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import rasterio

from geoseg.sample import BANDS, NODATA, make_sample


def test_scene_is_georeferenced_and_plausible(tmp_path):  # noqa: ANN001
    paths = make_sample(tmp_path, 256, seed=1, crs="EPSG:32633", resolution=5.0)
    with rasterio.open(paths.image) as img, rasterio.open(paths.labels) as lab:
        assert img.crs.to_epsg() == 32633 and img.crs.is_projected and img.res == (5.0, 5.0)
        assert img.count == 4 and img.dtypes[0] == "uint16" and img.nodata == NODATA
        assert list(img.descriptions) == BANDS
        assert (img.transform, img.shape, img.crs) == (lab.transform, lab.shape, lab.crs)
        labels, data = lab.read(1), img.read()
        assert lab.colormap(1)[1][:3] == (31, 120, 180)
    present = set(np.unique(labels)) - {NODATA}
    assert present >= {1, 2, 3, 4, 5}  # water, forest, grassland, cropland, built-up (bare soil is patchy)
    nodata = labels == NODATA
    assert 0.005 < nodata.mean() < 0.3 and (data[:, nodata] == 0).all() and (data[:, ~nodata] > 0).all()
    # Spectral signatures: water is dark in NIR, vegetation bright.
    nir = data[3].astype(float)
    assert nir[labels == 1].mean() < 0.3 * nir[labels == 2].mean()


def test_same_seed_same_scene_other_seed_other_scene(tmp_path):  # noqa: ANN001
    a = make_sample(tmp_path / "a", 128, seed=7)
    b = make_sample(tmp_path / "b", 128, seed=7)
    c = make_sample(tmp_path / "c", 128, seed=8)
    read = lambda p: rasterio.open(p).read()  # noqa: E731
    assert np.array_equal(read(a.image), read(b.image)) and np.array_equal(read(a.labels), read(b.labels))
    assert not np.array_equal(read(a.labels), read(c.labels))


def test_windowed_writing_does_not_depend_on_block_size(tmp_path):  # noqa: ANN001
    a = make_sample(tmp_path / "a", 300, seed=2, width=200, block=64)
    b = make_sample(tmp_path / "b", 300, seed=2, width=200, block=1000)
    assert np.array_equal(rasterio.open(a.image).read(), rasterio.open(b.image).read())
    assert np.array_equal(rasterio.open(a.labels).read(), rasterio.open(b.labels).read())


def test_large_scene_memory_is_bounded_by_the_block(tmp_path):  # noqa: ANN001
    """A 2048 x 2048 scene (32 MiB of pixels) is written with block 256 in a few MiB of Python memory."""
    tracemalloc.start()
    make_sample(tmp_path, 2048, seed=3, block=256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    full_image = 2048 * 2048 * 4 * 2
    assert peak < full_image / 4, f"peak {peak / 2**20:.1f} MiB"
    with rasterio.open(tmp_path / "scene.tif") as src:
        assert src.shape == (2048, 2048)
