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
    fields = ["id", "name", "iou", "precision", "recall", "f1", "users_accuracy", "producers_accuracy", "support",
              "predicted", "reference_ha", "predicted_ha"]
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
        "User's accuracy is the precision of a map class (how often a pixel mapped as it is it), producer's "
        "accuracy the recall of a reference class (how often it was mapped as such).", "",
        "| id | class | IoU | user's accuracy (precision) | producer's accuracy (recall) | F1 | reference px "
        "| mapped px | reference ha | mapped ha |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["classes"]:
        ref_ha = "n/a" if r["reference_ha"] is None else f"{r['reference_ha']:,.2f}"
        map_ha = "n/a" if r["predicted_ha"] is None else f"{r['predicted_ha']:,.2f}"
        lines.append(f"| {r['id']} | {r['name']} | {_fmt(r['iou'])} | {_fmt(r['precision'])} | "
                     f"{_fmt(r['recall'])} | {_fmt(r['f1'])} | {r['support']:,} | {r['predicted']:,} | {ref_ha} | "
                     f"{map_ha} |")
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

    fig, ax = plt.subplots(figsize=(2.0 + 0.8 * len(names), 3.8))
    ious = [c["iou"] for c in report["classes"]]
    shown = [v if v is not None else 0.0 for v in ious]
    colors = [c.get("color", "#4477aa") for c in report["classes"]]
    bars = ax.bar(range(len(names)), shown, color=colors, edgecolor="black")
    for bar, v in zip(bars, ious):  # the values, so differences between classes near 1 stay readable
        ax.annotate("n/a" if v is None else f"{v:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    present = [v for v in ious if v is not None]
    low = max(0.0, min(present) - 0.1 * (1 - min(present)) - 0.02) if present else 0.0
    ax.set_ylim(low, 1.04)  # fitted: the axis starts below the lowest IoU, not at 0
    ax.set_ylabel("IoU")
    title = "Per-class IoU"
    if report["mean_iou"] is not None:
        ax.axhline(report["mean_iou"], color="grey", linestyle="--")
        title += f" (mIoU {report['mean_iou']:.3f}, dashed)"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(iou_png, overwrite) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
