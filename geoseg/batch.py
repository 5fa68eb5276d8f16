"""Batch runs: the pipeline over many scenes on one cluster, idempotent, resumable and failure-isolated.

Each scene gets its own folder ``output_dir/<scene>/`` named from the file stem or the STAC item id. A scene
whose ``run.json`` says it finished with the same fingerprint (input, model, settings; see
:mod:`geoseg.fingerprint`) and whose outputs are all there is skipped; a scene whose input, model or settings
changed is redone, and a scene interrupted earlier continues from its finished chunks. A scene that fails
is recorded and the others carry on. The manifest (``batch.csv``, then ``batch.json`` last) has one row per
scene: status (done, skipped, failed, interrupted), seconds, outputs and the error.

Failures are remembered by kind (:func:`failure_kind`): a scene that failed because of its input (an
unreadable raster, bands or CRS the model cannot use: :data:`INPUT_FAILURES`) is not run again by later
batches while its fingerprint stays the same (``retry_failed`` does); a failure on the output side (its
folder cannot be created or written, the disk is full), of the cluster, or a transient one (a worker lost,
a time limit) is retried by the next batch.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import re
import socket
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoseg import interrupt
from geoseg._io import write_text_atomic
from geoseg.config import PipelineConfig
from geoseg.errors import (
    CheckpointError,
    ClusterError,
    ConfigError,
    GeosegError,
    InputError,
    NoScenesError,
    OutputError,
    OutputWriteError,
)
from geoseg.fingerprint import output_fingerprint
from geoseg.pipeline import holds_run, previous_status, run_pipeline

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger("geoseg")

BATCH_MANIFEST = "batch.json"
#: Errors that come from a scene's input (or the model's fit to it): the same input fails the same way.
INPUT_FAILURES = (InputError, CheckpointError, ConfigError)
#: The kinds of failure a batch row records; only ``input`` failures are remembered (not retried).
FAILURE_KINDS = ("input", "output", "cluster", "transient")


@dataclass(frozen=True)
class Scene:
    """One input of a batch: its folder name, raster path and, for STAC input, its source item."""

    name: str
    path: Path
    source: dict | None = None
    """``{"id", "datetime", "href"}`` of the STAC item the scene came from."""


#: Names in the batch folder that belong to the batch itself: no scene folder may take one.
RESERVED = frozenset({BATCH_MANIFEST, "batch.csv", "logs", "batch-shards"})


def scene_name(text: str, taken: set[str]) -> str:
    """Deterministic folder name: ``text`` made filesystem-safe and unique within the batch.

    Names of the batch's own files (``batch.json``, ...) get a ``-scene`` suffix.
    """
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "scene"
    if base.lower() in RESERVED:
        base = f"{base}-scene"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


def expand_scenes(spec: str, stac_asset: str = "image") -> list[Scene]:
    """Scenes from a glob, a text file of paths (``.txt``/``.lst``), or a STAC Item/ItemCollection (``.json``).

    Relative paths in a list file and relative asset hrefs resolve against the file's folder.
    """
    path = Path(spec)
    taken: set[str] = set()
    if path.is_file() and path.suffix.lower() in (".json", ".geojson"):
        scenes = _stac_scenes(path, stac_asset, taken)
    elif path.is_file() and path.suffix.lower() in (".txt", ".lst", ".list"):
        # Comments: whole lines starting with #, and `  # ...` after a path (a # inside a name stays).
        lines = [re.sub(r"\s+#.*$", "", ln).strip() for ln in path.read_text().splitlines()]
        paths = [Path(ln) if Path(ln).is_absolute() else path.parent / ln
                 for ln in lines if ln and not ln.startswith("#")]
        scenes = [Scene(scene_name(p.stem, taken), p.absolute()) for p in paths]
    else:
        scenes = [Scene(scene_name(Path(p).stem, taken), Path(p).absolute())
                  for p in sorted(glob.glob(spec, recursive=True))]
    if not scenes:
        raise NoScenesError(f"--scenes {spec!r}: matches no file")
    return scenes


def _stac_scenes(path: Path, asset: str, taken: set[str]) -> list[Scene]:
    try:
        data = json.loads(path.read_text())
        items = data["features"] if data.get("type") == "FeatureCollection" else [data]
        if data.get("type") not in ("FeatureCollection", "Feature"):
            raise ValueError("type is neither FeatureCollection nor Feature")
    except (ValueError, KeyError, AttributeError) as exc:
        raise InputError(f"{path}: not a STAC Item or ItemCollection ({exc})") from None
    scenes = []
    for k, item in enumerate(items):
        item_id = str(item.get("id") or f"item-{k}")
        assets = item.get("assets") or {}
        if asset not in assets:
            raise InputError(f"{path}: item {item_id!r} has no asset {asset!r} (batch.stac_asset); it has: "
                             f"{', '.join(assets) or 'none'}")
        href = str(assets[asset].get("href", ""))
        if href.startswith("file:"):
            from urllib.parse import unquote, urlparse

            href = unquote(urlparse(href).path)  # file:///data/S2%20A.tif is /data/S2 A.tif
        elif "://" in href:
            raise InputError(f"{path}: item {item_id!r}: asset {asset!r} is remote ({href}); geoseg reads local "
                             "or mounted files: download or mount it first")
        raster = Path(href) if Path(href).is_absolute() else path.parent / href
        props = item.get("properties") or {}
        self_link = next((ln.get("href") for ln in item.get("links", []) if ln.get("rel") == "self"), None)
        source = {"id": item_id, "datetime": props.get("datetime"), "href": self_link or path.absolute().as_uri()}
        scenes.append(Scene(scene_name(item_id, taken), raster.absolute(), source))
    return scenes


@dataclass
class SceneRow:
    """One scene's row of the batch manifest (``batch.json`` ``scenes``, ``batch.csv``)."""

    scene: str
    input: str
    output_dir: str
    status: str = "pending"
    """pending, running, done, skipped, failed or interrupted."""
    seconds: float = 0.0
    started: str | None = None
    """When the scene began to run (UTC, seconds)."""
    landcover: str = ""
    error: str = ""
    failure: str = ""
    """For a failed scene, one of :data:`FAILURE_KINDS`."""
    fingerprint: str | None = None
    failed_at: str | None = None
    outputs: dict[str, str] | None = None
    timings_s: dict[str, float] | None = None

    def update(self, **values: Any) -> None:
        """Set fields by name (an unknown name is a bug, not a new column)."""
        names = {f.name for f in fields(self)}
        for key, value in values.items():
            if key not in names:
                raise TypeError(f"SceneRow has no field {key!r}")
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's JSON object: the fields that are set, in the manifest's order."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class BatchReport:
    """Rows of the batch manifest and where it was written."""

    path: Path
    rows: list[SceneRow] = field(default_factory=list)
    merge: tuple[list[Scene], int] | None = None
    """For one shard of a batch: every scene of the batch and the number of shards, whose manifests are
    merged into the batch's own after each write of this one."""

    def counts(self) -> dict[str, int]:
        """Scenes per status."""
        return dict(Counter(r.status for r in self.rows))

    @property
    def ok(self) -> bool:
        """Every scene done or skipped."""
        return all(r.status in ("done", "skipped") for r in self.rows)

    @property
    def interrupted(self) -> bool:
        """Some scene was stopped by a stop request (and none failed for another reason since)."""
        return any(r.status == "interrupted" for r in self.rows)


def run_batch(cfg: PipelineConfig, scenes: list[Scene], *, force: bool = False, retry_failed: bool = False,
              client: Client | None = None, shard: tuple[int, int] | None = None) -> BatchReport:
    """Run every scene into ``cfg.output_dir/<scene>/``; failures are recorded, not raised.

    ``force`` redoes finished scenes too; ``retry_failed`` runs scenes whose unchanged input failed before.
    ``client``: an existing Dask client instead of ``cfg.cluster``'s. The batch folder is locked for the
    batch, and each scene's folder for its run. A stop request (SIGINT, SIGTERM) ends it within seconds: the
    unfinished scenes are ``interrupted`` in the manifest, and ``KeyboardInterrupt`` is raised.

    ``shard = (k, n)``: run only the scenes ``k, k + n, k + 2n, ...`` of ``scenes`` (one task of a SLURM job
    array, :func:`geoseg.hpc.submit_array`). Shards of one batch run at once: each locks and records its own
    part (``batch-shards/K-of-N.json``) and merges every shard's rows into ``batch.json``/``.csv``.
    """
    from geoseg.transaction import FolderLock

    try:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(f"output_dir: cannot create {cfg.output_dir} ({exc.strerror})") from None
    if shard is None:
        report = BatchReport(cfg.output_dir / BATCH_MANIFEST)
        with FolderLock(cfg.output_dir, what="batch"):
            return _run_batch(cfg, scenes, report, force, retry_failed, client)
    k, n = shard
    if not 0 <= k < n:
        raise ConfigError(f"--shard {k}/{n}: the shard index must be 0 to {n - 1}")
    (cfg.output_dir / SHARDS).mkdir(exist_ok=True)
    report = BatchReport(cfg.output_dir / SHARDS / f"{k}-of-{n}.json", merge=(scenes, n))
    with FolderLock(cfg.output_dir, what=f"batch shard {k}/{n}", name=shard_lock(k, n)):
        return _run_batch(cfg, scenes[k::n], report, force, retry_failed, client)


#: Folder of a sharded batch's per-shard manifests (``K-of-N.json``) in the batch folder.
SHARDS = "batch-shards"


def shard_lock(k: int, n: int) -> str:
    """Name of the lock file shard ``k`` of ``n`` holds in the batch folder while it runs."""
    return f".geoseg-shard-{k}-of-{n}.lock"


def previous_rows(path: Path) -> dict[str, dict]:
    """The rows of an earlier batch manifest by scene (empty when there is none or it is unreadable)."""
    try:
        return {r["scene"]: r for r in json.loads(path.read_text()).get("scenes", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _run_batch(cfg: PipelineConfig, scenes: list[Scene], report: BatchReport, force: bool, retry_failed: bool,
               client: Client | None) -> BatchReport:
    from geoseg.cluster import open_client
    from geoseg.segment import model_key
    from geoseg.segment.predict import model_on_workers

    started = datetime.now(timezone.utc)
    earlier = previous_rows(cfg.output_dir / BATCH_MANIFEST)
    todo: list[tuple[PipelineConfig, Scene, SceneRow]] = []
    remembered = 0
    for scene in scenes:
        out = cfg.output_dir / scene.name
        row = SceneRow(scene.name, str(scene.path), str(out))
        report.rows.append(row)
        scene_cfg = cfg.model_copy(update={"input": scene.path, "output_dir": out})
        try:
            fingerprint = output_fingerprint(scene_cfg)
        except OSError as exc:
            row.update(status="failed", failure="input", error=f"{scene.path}: {exc.strerror or exc}")
            continue
        row.fingerprint = fingerprint
        if not force and holds_run(scene_cfg, fingerprint):
            row.update(status="skipped", landcover=str(out / "landcover.tif"))
            continue
        before = earlier.get(scene.name, {})
        if (not (force or retry_failed) and before.get("status") == "failed" and before.get("failure") == "input"
                and before.get("fingerprint") == fingerprint):
            # The same input fails the same way: not worth a worker job every night.
            error = str(before.get("error", ""))
            row.update(status="failed", failure="input", failed_at=before.get("failed_at", ""),
                       error=error if error.startswith("not retried") else
                       f"not retried (its input is unchanged since it failed; --retry-failed to retry): {error}")
            remembered += 1
            continue
        # A scene redone because its input, model or settings changed replaces its own earlier outputs.
        redo = force or previous_status(out) == "done"
        todo.append((scene_cfg.model_copy(update={"overwrite": cfg.overwrite or redo}), scene, row))
    skipped = len(scenes) - len(todo) - remembered
    log.info("batch: %d scenes, %d to run, %d complete already%s", len(scenes), len(todo), skipped,
             f", {remembered} known to fail (--retry-failed to retry)" if remembered else "")

    key = model_key(cfg.segment)  # the device, precision and model every scene's inference uses
    progress = _Progress(report, started)
    progress.write()
    pool: ThreadPoolExecutor | None = None
    running: dict[Future, SceneRow] = {}
    try:
        if todo:
            opened = nullcontext(client) if client is not None else open_client(
                cfg.cluster, use_gpu=key.device == "cuda", name=f"geoseg-{cfg.output_dir.name}",
                log_directory=str(cfg.output_dir / "logs" / "workers"))
            with opened as c, model_on_workers(c, key):
                # The batch holds the model on the workers: scenes reuse it, whatever their settings.
                pool = ThreadPoolExecutor(max_workers=concurrent_scenes(cfg, c), thread_name_prefix="geoseg-scene")
                for scene_cfg, scene, row in todo:
                    running[pool.submit(_run_scene, scene_cfg, scene, c, force, row)] = row
                progress.write()
                pending = set(running)
                while pending:
                    finished, pending = wait(pending, timeout=MANIFEST_EVERY_S, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        running[fut].update(**fut.result())
                    progress.write(due=True)
    except BaseException as exc:
        stopping = isinstance(exc, KeyboardInterrupt) or interrupt.requested()
        # Scenes in flight see the request at their next check (within a second) and end as interrupted.
        for fut, row in running.items():
            if stopping:
                try:
                    row.update(**fut.result(timeout=15))
                except BaseException:  # noqa: BLE001 - still running, or stopped without a row of its own
                    pass
        for row in report.rows:
            if row.status in ("pending", "running"):
                if stopping:
                    row.update(status="interrupted", error="batch interrupted; rerun to continue")
                else:
                    row.update(status="failed", failure="cluster",
                               error=str(exc) if isinstance(exc, GeosegError) else f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        _write_manifest(report, started, finished=True)
    return report


#: Most scenes in flight under ``batch.concurrent_scenes: auto`` (each is a thread of the client).
MAX_CONCURRENT_SCENES = 256


def concurrent_scenes(cfg: PipelineConfig, client: Client) -> int:
    """Scenes in flight at once: ``batch.concurrent_scenes``, or for auto one per inference slot plus one."""
    from geoseg.cluster import inference_slots

    if cfg.batch.concurrent_scenes != "auto":
        return int(cfg.batch.concurrent_scenes)
    n = min(MAX_CONCURRENT_SCENES, max(2, inference_slots(client, cfg.cluster) + 1))
    log.info("batch: %d scenes in flight at once (batch.concurrent_scenes: auto)", n)
    return n


def failure_kind(exc: BaseException) -> str:
    """One of :data:`FAILURE_KINDS` for a scene's failure.

    ``input`` for a failure the same input would repeat (not retried while it is unchanged); ``output``,
    ``cluster`` or ``transient`` for one the next batch retries.
    """
    if isinstance(exc, OutputError):  # before INPUT_FAILURES: the folder, not the scene, is at fault
        return "output"
    if isinstance(exc, INPUT_FAILURES):
        return "input"
    return "cluster" if isinstance(exc, ClusterError) else "transient"


def _run_scene(cfg: PipelineConfig, scene: Scene, client: Client, fresh: bool, row: SceneRow) -> dict[str, Any]:
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    row.update(status="running", started=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    try:
        interrupt.check()
        result = run_pipeline(cfg, client=client, progress=False, item_id=scene.name, source=scene.source,
                              fresh=fresh)
        out.update(status="done", landcover=result.outputs.get("landcover", ""), outputs=result.outputs,
                   timings_s=result.timings, failure="", error="")
    except (KeyboardInterrupt, CancelledError):
        out.update(status="interrupted", error="interrupted; rerun to continue")
    except Exception as exc:  # noqa: BLE001 - one bad scene never sinks the batch
        if interrupt.requested():  # the stop broke its waits (a closed client, cancelled futures)
            out.update(status="interrupted", error="interrupted; rerun to continue")
        else:
            out.update(status="failed", failure=failure_kind(exc), failed_at=datetime.now(timezone.utc).isoformat(),
                       error=str(exc) if isinstance(exc, GeosegError) else f"{type(exc).__name__}: {exc}")
    out["seconds"] = round(time.perf_counter() - t0, 2)
    if out["status"] != "done":
        log.warning("%s: %s: %s", scene.name, out["status"], out["error"])
    else:
        log.info("%s: done in %.1fs", scene.name, out["seconds"])
    return out


#: Seconds between two rewrites of the manifest while scenes finish: the night's progress on disk.
MANIFEST_EVERY_S = 2.0


class _Progress:
    """The batch manifest rewritten while the batch runs, at most every :data:`MANIFEST_EVERY_S` seconds."""

    def __init__(self, report: BatchReport, started: datetime) -> None:
        self.report, self.started = report, started
        self._last, self._seen = 0.0, ""

    def write(self, due: bool = False) -> None:
        """Rewrite the manifest (``due``: only if it changed and the last rewrite is old enough)."""
        now = time.monotonic()
        state = repr([(r.status, r.seconds) for r in self.report.rows])
        if due and (state == self._seen or now - self._last < MANIFEST_EVERY_S):
            return
        _write_manifest(self.report, self.started, finished=False)
        self._last, self._seen = now, state


def _write_manifest(report: BatchReport, started: datetime, finished: bool) -> None:
    """``batch.csv``, then ``batch.json``, each replaced atomically; ``finished``: the batch has ended.

    A shard writes its own manifest, then merges every shard's into the batch's (:func:`merge_shards`).
    """
    rows = [r.to_dict() for r in report.rows]
    now = datetime.now(timezone.utc).isoformat()
    summary = {"state": "finished" if finished else "running", "pid": os.getpid(), "host": socket.gethostname(),
               "started": started.isoformat(), "updated": now, **({"finished": now} if finished else {}),
               "counts": report.counts(), "ok": report.ok, "scenes": rows}
    if report.merge is None:
        _write_pair(report.path, summary)
        return
    write_text_atomic(report.path, json.dumps(summary, indent=2, default=str) + "\n")
    scenes, n = report.merge
    merge_shards(report.path.parent.parent, scenes, n)


def _write_pair(path: Path, summary: dict[str, Any]) -> None:
    """Write ``batch.csv`` from ``summary``'s rows, then ``batch.json`` last.

    When ``batch.json`` says the batch finished, every scene's outputs are final.
    """
    columns = ["scene", "status", "seconds", "started", "input", "output_dir", "landcover", "failure", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(summary["scenes"])
    write_text_atomic(path.with_suffix(".csv"), buf.getvalue())
    write_text_atomic(path, json.dumps(summary, indent=2, default=str) + "\n")


def merge_shards(folder: Path, scenes: list[Scene], n: int) -> None:
    """Rewrite ``folder``'s batch.json/.csv from the manifests of its ``n`` shards, under a file lock.

    Every scene of the batch gets a row, ``pending`` where its shard has not written one yet; the batch is
    finished when every shard's manifest says its shard is. The shards' own files stay the record of each.
    """
    import fcntl

    with open(folder / ".geoseg-merge.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # shards finishing at once take turns; each write stays atomic
        shards, rows = [], {}
        for k in range(n):
            try:
                data = json.loads((folder / SHARDS / f"{k}-of-{n}.json").read_text())
            except (OSError, ValueError):
                shards.append({"shard": f"{k}/{n}", "state": "pending"})
                continue
            shards.append({"shard": f"{k}/{n}", **{key: data.get(key) for key in ("state", "pid", "host", "updated")}})
            rows.update({r["scene"]: r for r in data.get("scenes", [])})
        merged = [rows.get(s.name) or SceneRow(s.name, str(s.path), str(folder / s.name)).to_dict() for s in scenes]
        counts = dict(Counter(r["status"] for r in merged))
        finished = all(sh["state"] == "finished" for sh in shards)
        now = datetime.now(timezone.utc).isoformat()
        _write_pair(folder / BATCH_MANIFEST, {
            "state": "finished" if finished else "running", "updated": now, **({"finished": now} if finished else {}),
            "shards": shards, "counts": counts, "ok": all(r["status"] in ("done", "skipped") for r in merged),
            "scenes": merged})


def batch_status(folder: Path, slowest: int = 5) -> str:
    """What the batch manifest in ``folder`` says: state, counts, the running, failed and slowest scenes.

    A manifest left ``running`` by a batch process that is gone (killed, its node lost) says so.
    """
    from geoseg.transaction import FolderLock

    path = Path(folder) / BATCH_MANIFEST
    try:
        data = json.loads(path.read_text())
        rows = list(data["scenes"])
    except FileNotFoundError:
        raise InputError(f"{path}: no batch manifest here; is {folder} the output_dir of a geoseg batch?") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a batch manifest ({exc})") from None
    counts = Counter(r.get("status", "?") for r in rows)
    state = data.get("state", "finished")
    gone = ("stopped before it finished (the batch process is gone: killed or its node lost); rerun the batch "
            "to continue")
    shard_lines = []
    if state == "running" and "shards" in data:
        live = 0
        for sh in data["shards"]:
            k, n = (int(v) for v in sh["shard"].split("/"))
            holder = FolderLock(Path(folder), name=shard_lock(k, n)).holder()
            if sh.get("state") == "finished":
                what = "finished"
            elif holder is not None:
                what, live = f"running (pid {holder.get('pid')} on {holder.get('host')})", live + 1
            else:
                what = "not started yet" if sh.get("state") == "pending" else "stopped before it finished"
            shard_lines.append(f"  shard {sh['shard']}: {what}")
        state = f"running: {live} of {len(data['shards'])} shards at work"
    elif state == "running":
        holder = FolderLock(Path(folder)).holder()
        if holder is None or holder.get("what") != "batch":
            state = gone
        else:
            state = f"running (pid {holder.get('pid')} on {holder.get('host')})"
    lines = [f"{path}: {state}; updated {data.get('updated', data.get('finished', '?'))}",
             f"{len(rows)} scenes: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])),
             *shard_lines]
    now = datetime.now(timezone.utc)
    for r in rows:
        if r.get("status") == "running" and r.get("started"):
            since = (now - datetime.fromisoformat(r["started"])).total_seconds()
            lines.append(f"  running  {r['scene']}: for {since:.0f}s")
    for r in rows:
        if r.get("status") in ("failed", "interrupted"):
            lines.append(f"  {r['status']:<8} {r['scene']}: {r.get('error', '')}")
    done = sorted((r for r in rows if r.get("status") == "done"), key=lambda r: -float(r.get("seconds", 0)))
    for r in done[:slowest]:
        lines.append(f"  slowest  {r['scene']}: {float(r.get('seconds', 0)):.1f}s")
    return "\n".join(lines)
