"""Shared fixtures: tiny real rasters in tmp dirs, checkpoints the tests make themselves, a Dask client."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from geoseg.config import PipelineConfig, validate
from geoseg.sample import BANDS, CLASSES, make_sample

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_raster(path: Path, data: np.ndarray, *, crs: str = "EPSG:32632", transform=None, nodata=None,
                 descriptions=None, tags=None) -> Path:  # noqa: ANN001
    """Write a (bands, rows, cols) or (rows, cols) array as a GeoTIFF."""
    if data.ndim == 2:
        data = data[None]
    transform = transform or from_origin(600000.0, 5300000.0, 10.0, 10.0)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(data)
        if tags:
            dst.update_tags(**tags)
        if descriptions:
            for i, d in enumerate(descriptions, 1):
                dst.set_band_description(i, d)
    return path


def make_checkpoint(path: Path, *, architecture: str = "fcn", encoder: str = "none", arch_kwargs=None,
                    classes=None, bands=None, seed: int = 0, tile_size: int = 256) -> Path:  # noqa: ANN001
    """An untrained but deterministic model saved as a geoseg checkpoint."""
    import torch

    from geoseg.models import ModelSpec, create_model, output_stride, save_checkpoint

    classes = classes or CLASSES
    bands = bands or [{"index": i + 1, "name": b} for i, b in enumerate(BANDS)]
    arch_kwargs = arch_kwargs if arch_kwargs is not None else {"depth": 4, "width": 12}
    torch.manual_seed(seed)
    model = create_model(architecture, encoder, len(bands), len(classes), **arch_kwargs).eval()
    spec = ModelSpec(architecture=architecture, encoder=encoder, bands=bands, mean=[900.0] * len(bands),
                     std=[700.0] * len(bands), classes=classes, tile_size=tile_size, arch_kwargs=arch_kwargs,
                     output_stride=output_stride(model))
    return save_checkpoint(path, model, spec)


@pytest.fixture(scope="session")
def fcn_checkpoint(tmp_path_factory) -> Path:  # noqa: ANN001
    return make_checkpoint(tmp_path_factory.mktemp("models") / "fcn.safetensors")


@pytest.fixture(scope="session")
def unet_checkpoint(tmp_path_factory) -> Path:  # noqa: ANN001
    return make_checkpoint(tmp_path_factory.mktemp("models") / "unet.safetensors", architecture="unet",
                           encoder="resnet18", arch_kwargs={"encoder_depth": 3, "decoder_channels": [32, 16, 8]})


@pytest.fixture(scope="session")
def sample_scene(tmp_path_factory):  # noqa: ANN001
    return make_sample(tmp_path_factory.mktemp("sample"), 300, seed=5, width=340)


@pytest.fixture(scope="session")
def client():
    """An in-process Dask cluster shared by the tests (processes=False keeps start-up fast)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        yield c


def pipeline_config(input_path: Path, model: Path, output_dir: Path, **sections) -> PipelineConfig:  # noqa: ANN003
    """A validated PipelineConfig from keyword sections (tile={...}, write={...})."""
    data = {"input": str(input_path), "model": str(model), "output_dir": str(output_dir)}
    data.update(sections)
    return validate(PipelineConfig, data, "test.yaml", None)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):  # noqa: ANN001
    """A private single-node SLURM (tests/private_slurm.py), installed when missing; skipped where it cannot run.

    ``GEOSEG_REQUIRE_SLURM=1`` (CI) turns the skip into a failure, so that the SLURM tests never vanish quietly.
    """
    import os

    from tests.private_slurm import PrivateSlurm, Unavailable

    cluster = PrivateSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Unavailable as exc:
        if os.environ.get("GEOSEG_REQUIRE_SLURM") == "1":
            pytest.fail(f"GEOSEG_REQUIRE_SLURM=1 but no private SLURM: {exc}")
        pytest.skip(f"no private SLURM here: {exc}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        cluster.stop()
