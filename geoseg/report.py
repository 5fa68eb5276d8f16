"""Evaluation reports: metrics.json, metrics.csv and a Markdown report with its figures."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from geoseg._io import atomic_path, check_overwrite
from geoseg.evaluate import Metrics

FILES = {"metrics_json": "metrics.json", "metrics_csv": "metrics.csv", "report": "report.md",
         "confusion_png": "confusion.png", "iou_png": "iou.png"}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def write_reports(metrics: Metrics, out_dir: Path, overwrite: bool = False) -> dict[str, str]:
    """Write every report file into ``out_dir`` (atomically); return their paths by kind."""
    report = metrics.to_dict()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / v for k, v in FILES.items()}
    for p in paths.values():
        check_overwrite(p, overwrite)

    with atomic_path(paths["metrics_json"], overwrite) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")

    buf = io.StringIO()
    fields = ["id", "name", "iou", "precision", "recall", "f1", "support", "predicted"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(report["classes"])
    with atomic_path(paths["metrics_csv"], overwrite) as tmp:
        tmp.write_text(buf.getvalue())

    _figures(report, paths["confusion_png"], paths["iou_png"], overwrite)

    lines = [
        "# Land-cover evaluation", "",
        f"- prediction: `{report.get('prediction', '')}`", f"- reference: `{report.get('reference', '')}`",
        f"- pixels compared: {report['pixels']:,}", "",
        "| metric | value |", "| --- | --- |",
        f"| mean IoU ({len(report['mean_iou_classes'])} classes present in the reference) | "
        f"{_fmt(report['mean_iou'])} |",
        f"| frequency-weighted IoU | {_fmt(report['frequency_weighted_iou'])} |",
        f"| overall accuracy | {_fmt(report['overall_accuracy'])} |",
        f"| Cohen's kappa | {_fmt(report['kappa'])} |", "",
        "| id | class | IoU | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["classes"]:
        lines.append(f"| {r['id']} | {r['name']} | {_fmt(r['iou'])} | {_fmt(r['precision'])} | "
                     f"{_fmt(r['recall'])} | {_fmt(r['f1'])} | {r['support']:,} |")
    unmapped = report.get("unmapped_reference_codes") or {}
    if unmapped:
        lines += ["", "Reference codes that map to no class (not counted): "
                  + ", ".join(f"{k} ({v:,} px)" for k, v in unmapped.items())]
    lines += ["", "![confusion matrix](confusion.png)", "", "![per-class IoU](iou.png)", ""]
    with atomic_path(paths["report"], overwrite) as tmp:
        tmp.write_text("\n".join(lines))
    return {k: str(v) for k, v in paths.items()}


def _figures(report: dict, confusion_png: Path, iou_png: Path, overwrite: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c["name"] for c in report["classes"]]
    cm = np.asarray(report["confusion_matrix"], dtype=np.float64)
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(names), 0.8 + 0.6 * len(names)))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    for i in range(len(names)):
        for j in range(len(names)):
            if cm[i, j]:
                ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="share of reference pixels")
    ax.set_title("Confusion matrix (row-normalised)")
    fig.tight_layout()
    with atomic_path(confusion_png, overwrite) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(names), 3.2))
    ious = [c["iou"] if c["iou"] is not None else 0.0 for c in report["classes"]]
    colors = [c.get("color", "#4477aa") for c in report["classes"]]
    ax.bar(range(len(names)), ious, color=colors, edgecolor="black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    if report["mean_iou"] is not None:
        ax.axhline(report["mean_iou"], color="grey", linestyle="--", label=f"mIoU {report['mean_iou']:.3f}")
        ax.legend()
    fig.tight_layout()
    with atomic_path(iou_png, overwrite) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
