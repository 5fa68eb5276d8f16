"""Batch runs: the pipeline over many scenes, each isolated, with a manifest of what happened."""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from geoseg._io import write_text_atomic
from geoseg.cluster import open_client
from geoseg.config import PipelineConfig
from geoseg.errors import GeosegError, InputError
from geoseg.infer import resolve_device
from geoseg.pipeline import run_pipeline

log = logging.getLogger("geoseg")


def expand_scenes(spec: str) -> list[Path]:
    """Scene paths from a glob or a text file of paths (relative lines resolve against the file)."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in (".txt", ".lst", ".list"):
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        scenes = [Path(ln) if Path(ln).is_absolute() else path.parent / ln for ln in lines if ln and not ln.startswith("#")]
    else:
        scenes = [Path(p) for p in sorted(glob.glob(spec, recursive=True))]
    if not scenes:
        raise InputError(f"--scenes {spec!r}: matches no file")
    return [s.absolute() for s in scenes]


def scene_name(path: Path, taken: set[str]) -> str:
    """Deterministic folder name for a scene: its file stem, made unique."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem) or "scene"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


@dataclass
class BatchReport:
    path: Path
    rows: list[dict] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out


def run_batch(cfg: PipelineConfig, scenes: list[Path]) -> BatchReport:
    """Run every scene into ``output_dir/<scene>/`` on one cluster; failures are recorded, not raised."""
    report = BatchReport(cfg.output_dir / "batch.json")
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    device, _ = resolve_device(cfg.infer)
    with open_client(cfg.cluster, use_gpu=device == "cuda") as client:
        for scene in scenes:
            name = scene_name(scene, taken)
            out = cfg.output_dir / name
            row = {"scene": str(scene), "name": name, "output_dir": str(out), "status": "failed", "error": "",
                   "seconds": 0.0, "landcover": ""}
            t0 = time.perf_counter()
            try:
                scene_cfg = cfg.model_copy(update={"input": scene, "output_dir": out})
                result = run_pipeline(scene_cfg, client=client, progress=False)
                row.update(status="done", landcover=result.outputs.get("landcover", ""))
            except GeosegError as exc:
                row["error"] = str(exc)
            except Exception as exc:  # noqa: BLE001 - one bad scene never sinks the batch
                row["error"] = f"{type(exc).__name__}: {exc}"
            row["seconds"] = round(time.perf_counter() - t0, 2)
            if row["error"]:
                log.warning("%s: failed: %s", name, row["error"])
            report.rows.append(row)
    _write_manifest(report)
    return report


def _write_manifest(report: BatchReport) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(report.rows[0]))
    writer.writeheader()
    writer.writerows(report.rows)
    write_text_atomic(report.path.with_suffix(".csv"), buf.getvalue())
    # The JSON manifest is written last: its presence means the batch finished.
    write_text_atomic(report.path, json.dumps({"scenes": report.rows, "counts": report.counts()}, indent=2) + "\n")
