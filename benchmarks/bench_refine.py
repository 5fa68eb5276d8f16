"""What boundary refinement (and TTA beside it) buys and costs: `geoseg run` with and without them.

For each checkpoint given (e.g. one per seed), segments the training config's first scene with the real
pipeline for each variant, and scores each output on the validation rows only (the other rows of the
reference become nodata, so the context is the scene's own): mIoU from the evaluation stage, and the
boundary F-score (:func:`geoseg.evaluate.boundary_fscore`, tolerance ``--tolerance`` px) of the class
edges against the reference's, with the stage time of tile+infer+stitch.

    python benchmarks/bench_refine.py configs/train-nc-landsat7.yaml --models a.safetensors b.safetensors

Needs the real data under ../shared/data (see its README); exits with a message where it is absent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, control_malloc, machine, sample_sd  # noqa: E402
from bench_tta import validation_reference  # noqa: E402

VARIANTS: dict[str, tuple[str, dict]] = {
    "none": ("none", {}),
    "guided r2": ("none", {"method": "guided", "radius": 2, "eps": 0.01}),
    "guided r4": ("none", {"method": "guided", "radius": 4, "eps": 0.01}),
    "guided r2, eps 0.1": ("none", {"method": "guided", "radius": 2, "eps": 0.1}),
    "d4": ("d4", {}),
    "d4 + guided r2": ("d4", {"method": "guided", "radius": 2, "eps": 0.01}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_config", type=Path)
    p.add_argument("--models", type=Path, nargs="+", required=True)
    p.add_argument("--tolerance", type=float, default=1.0, help="boundary F-score tolerance in pixels")
    p.add_argument("--precision", default="fp32", choices=["fp32", "auto"])
    args = p.parse_args()
    malloc = control_malloc(True)

    import rasterio

    from geoseg.config import TrainConfig, load_config
    from geoseg.config.loader import validate
    from geoseg.config.pipeline import PipelineConfig
    from geoseg.device import cpu_has_bf16
    from geoseg.errors import GeosegError
    from geoseg.evaluate import boundary_fscore
    from geoseg.pipeline import run_pipeline

    tmp = Path(tempfile.mkdtemp(prefix="geoseg-refine-"))
    try:
        cfg = load_config(args.train_config, [f"output={tmp / 'unused.safetensors'}"], TrainConfig)
    except GeosegError as exc:
        sys.exit(f"cannot run this benchmark: {exc} (the real data lives in ../shared/data; see its README)")
    scene, win = cfg.train[0], cfg.validation.window
    if win is None:
        sys.exit("cannot run this benchmark: the config's validation is not a window of its training scene")
    print(f"machine: {machine()}, bf16 CPU: {cpu_has_bf16()}\nmalloc: {malloc}\nconfig: {args.train_config}, "
          f"precision {args.precision}, boundary tolerance {args.tolerance} px, {len(args.models)} models",
          flush=True)
    reference = validation_reference(scene.labels, win.row_off, win.height, 0, tmp / "reference.tif")
    with rasterio.open(reference) as src:
        ref = src.read(1).astype(np.int64)
        ref_valid = src.read_masks(1) > 0
    rows = slice(win.row_off, None if win.height is None else win.row_off + win.height)
    ref_valid &= ~np.isin(ref, cfg.ignore_codes)
    tile = {"size": cfg.validation.tile.size, "overlap": cfg.validation.tile.overlap}

    runs: list[dict] = []
    for k, model in enumerate(args.models):
        for name, (tta, refine) in VARIANTS.items():
            out = tmp / f"{k}-{name.replace(' ', '_').replace(',', '')}"
            pcfg = validate(PipelineConfig, {
                "input": str(scene.image), "model": str(model), "output_dir": str(out), "tile": tile,
                "infer": {"tta": tta, "precision": args.precision, "device": "cpu"},
                "stitch": {"blend": cfg.validation.stitch.blend, "refine": refine or {"method": "none"}},
                "vectorize": {"enabled": False}, "write": {"stac_item": False, "overviews": False},
                "evaluate": {"reference": str(reference), "ignore": list(cfg.ignore_codes)},
            }, "bench_refine", None)
            result = run_pipeline(pcfg)
            metrics = json.loads((out / "metrics.json").read_text())
            with rasterio.open(result.landcover) as src:
                pred = src.read(1).astype(np.int64)
                valid = (src.read_masks(1) > 0) & ref_valid
            bf = boundary_fscore(ref[rows], pred[rows], valid[rows], args.tolerance)
            runs.append({"model": str(model), "variant": name, "miou": metrics["mean_iou"],
                         "boundary_f": bf["f_score"], "seconds": result.timings["tile_infer_stitch"]})
            print(f"  {model.name} {name:20s}: mIoU {metrics['mean_iou']:.4f}, boundary F {bf['f_score']:.4f}, "
                  f"{runs[-1]['seconds']:.2f} s", flush=True)

    print("\n| variant | mIoU (mean ± sd) | boundary F (mean ± sd) | tile+infer+stitch, median |")
    print("| --- | --- | --- | --- |")
    summary = {}
    for name in VARIANTS:
        mine = [r for r in runs if r["variant"] == name]
        m, b = np.array([r["miou"] for r in mine]), np.array([r["boundary_f"] for r in mine])
        sec = statistics.median(r["seconds"] for r in mine)
        summary[name] = {"miou": m.mean(), "miou_sd": sample_sd(m), "boundary_f": b.mean(),
                         "boundary_f_sd": sample_sd(b), "seconds": sec}
        print(f"| {name} | {m.mean():.3f} ± {sample_sd(m):.3f} | {b.mean():.3f} ± {sample_sd(b):.3f} | {sec:.2f} s |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / f"refine-{args.train_config.stem}.json"
    dest.write_text(json.dumps({"machine": machine(), "malloc": malloc, "precision": args.precision,
                                "tolerance": args.tolerance, "runs": runs, "summary": summary}, indent=2,
                               default=float))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
