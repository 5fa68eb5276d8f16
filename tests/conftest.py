"""Shared fixtures: tiny real rasters in tmp dirs, checkpoints the tests make themselves, a Dask client.

Also the test tiers (pyproject.toml's markers, docs/testing.md): a test marked ``slow``, ``slurm``, ``gis`` or
``real_data`` runs only with ``python3 dev.py test --all``; every other test is in the fast tier, where a
guard fails a test that connects to a network port it did not open itself (one listening before the
session began, or another machine's).
"""

from __future__ import annotations

import errno
import inspect
import ipaddress
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from geoseg.config import PipelineConfig, validate
from geoseg.sample import BANDS, CLASSES, make_sample

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: Markers that take a test out of the fast tier.
TIERS = ("slow", "slurm", "gis", "real_data")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Record what every collected test is and needs (before ``-m`` deselects any) for tests/test_tiers.py."""
    collected: list[dict] = []
    config.geoseg_collected = collected  # type: ignore[attr-defined]  # (this file is imported twice)
    for item in items:
        function = getattr(item, "function", None)
        try:
            source = inspect.getsource(function) if function is not None else ""
        except (OSError, TypeError):
            source = ""
        collected.append({"nodeid": item.nodeid, "markers": sorted({m.name for m in item.iter_markers()}),
                          "fixtures": sorted(getattr(item, "fixturenames", ())), "source": source})
    dump = os.environ.get("GEOSEG_DUMP_COLLECTED")
    if dump:
        Path(dump).write_text(json.dumps(collected))


def _listening_ports() -> set[int]:
    import psutil

    try:
        return {c.laddr.port for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    except (psutil.AccessDenied, OSError):
        return set()


def _local_addresses() -> set[str]:
    import psutil

    return {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)}


class PortGuard:
    """Lets sockets connect to this machine's ports other than ``outside`` (and to anything but TCP).

    (A UDP "connect" sends nothing: distributed uses one to 8.8.8.8 to learn the machine's own address.)

    Every other connection (another host, a service that was listening before the session) is recorded.
    """

    def __init__(self, outside: set[int], local: set[str] | None = None) -> None:
        self.outside = outside
        self.local = _local_addresses() if local is None else local
        self.refused: list[str] = []

    def allowed(self, family: int, address: object) -> bool:
        """Whether a socket of ``family`` may connect to ``address``; a refusal is recorded."""
        if family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
            return True
        host, port = address[0], address[1]
        try:
            here = ipaddress.ip_address(host).is_loopback or host in self.local
        except ValueError:
            here = host == "localhost"
        if here and port not in self.outside:
            return True
        self.refused.append(f"{host}:{port}")
        return False

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Route every ``socket.connect``/``connect_ex`` of this process through :meth:`allowed`."""
        real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

        def checked(sock: socket.socket, address: object) -> bool:
            return sock.type != socket.SOCK_STREAM or self.allowed(sock.family, address)

        def connect(sock: socket.socket, address: object) -> None:
            if not checked(sock, address):
                raise ConnectionRefusedError(errno.ECONNREFUSED, f"fast tier: {address} is not the test's own port")
            real_connect(sock, address)

        def connect_ex(sock: socket.socket, address: object) -> int:
            return real_connect_ex(sock, address) if checked(sock, address) else errno.ECONNREFUSED

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


#: Ports listening on this machine before the first fast test: services the fast tier must leave alone.
OUTSIDE_PORTS: set[int] | None = None


@pytest.fixture(autouse=True)
def _own_ports_only(request, monkeypatch):  # noqa: ANN001
    """In the fast tier: a connection to another host, or to a port already open when the session began, fails.

    The refused connection raises ECONNREFUSED in the code under test, and the test fails at its end whatever
    that code made of it (a retry loop, a timeout).
    """
    global OUTSIDE_PORTS
    if any(request.node.get_closest_marker(m) for m in TIERS):
        yield
        return
    if OUTSIDE_PORTS is None:
        OUTSIDE_PORTS = _listening_ports()
    guard = PortGuard(OUTSIDE_PORTS)
    guard.install(monkeypatch)
    yield
    if guard.refused:
        pytest.fail(f"a fast-tier test connected to {', '.join(sorted(set(guard.refused)))}, a port it did not "
                    f"open itself: mark it {' / '.join(TIERS)} or give it its own service")


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


def record_tasks(scheduler) -> dict[str, tuple]:  # noqa: ANN001
    """Watch a scheduler: {key: (priority, resource restrictions)} of each task as it starts processing."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    seen: dict[str, tuple] = {}

    class Record(SchedulerPlugin):
        def transition(self, key, start, finish, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
            if finish == "processing":
                ts = scheduler.tasks[key]
                seen[str(key)] = (ts.priority, dict(ts.resource_restrictions or {}))

    scheduler.add_plugin(Record())
    return seen


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
