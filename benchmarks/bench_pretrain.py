"""Does `geoseg pretrain` help? Fine-tuning from its encoder against training from scratch, same labels.

Pretrains the encoder of a training config on unlabelled imagery (a pretraining config), then for each
seed trains the training config twice, interleaved: from scratch, and with ``model.encoder_weights`` set
to the pretrained file: same labels, windows, epochs and seed. Both are scored on the config's validation
area with the evaluation stage's metrics, at the last epoch (no model selection) and at the best
validation epoch (the checkpoint `geoseg train` keeps; optimistic, that choice saw the validation area).

    python benchmarks/bench_pretrain.py configs/pretrain-nc-landsat7.yaml configs/train-nc-landsat7.yaml
    python benchmarks/bench_pretrain.py configs/pretrain-nc-landsat7.yaml configs/train-nc-landsat7.yaml \
        --set model.architecture=pspnet --set "model.arch_kwargs={}" --seeds 0 1    # another network

``--set`` overrides apply to both configs (the network pretrained is the network fine-tuned).

Needs the real data under ../shared/data (see its README); exits with a message where it is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, control_malloc, machine  # noqa: E402
from bench_train_baselines import model_metrics  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pretrain_config", type=Path)
    p.add_argument("train_config", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain-epochs", type=int, default=None, help="override the pretraining epochs")
    p.add_argument("--epochs", type=int, default=None, help="override the training epochs")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override KEY=VALUE for both configs, e.g. model.architecture=pspnet")
    args = p.parse_args()
    malloc = control_malloc(True)

    from geoseg.config import PretrainConfig, SegmentConfig, TrainConfig, load_config
    from geoseg.device import cpu_has_bf16
    from geoseg.errors import GeosegError
    from geoseg.models import read_model_spec
    from geoseg.pretrain import pretrain_encoder
    from geoseg.train import TrainPaths, train_model
    from geoseg.training_data import load_regions

    tmp = Path(tempfile.mkdtemp(prefix="geoseg-pretrain-"))
    encoder = tmp / "encoder.safetensors"
    extra = [*args.overrides, *([f"epochs={args.epochs}"] if args.epochs else [])]
    try:
        pcfg = load_config(args.pretrain_config, [f"output={encoder}", *args.overrides, *(
            [f"epochs={args.pretrain_epochs}"] if args.pretrain_epochs else [])], PretrainConfig)
        base = load_config(args.train_config, [f"output={tmp / 'probe.safetensors'}", *extra], TrainConfig)
    except GeosegError as exc:
        sys.exit(f"cannot run this benchmark: {exc} (the real data lives in ../shared/data; see its README)")
    print(f"machine: {machine()}, bf16 CPU: {cpu_has_bf16()}\nmalloc: {malloc}\nnetwork: {pcfg.model.architecture}-"
          f"{pcfg.model.encoder} {pcfg.model.arch_kwargs}\npretraining: {args.pretrain_config} "
          f"({pcfg.epochs} epochs x {pcfg.steps_per_epoch} steps x {pcfg.batch_size} windows of {pcfg.tile_size} px,"
          f" {pcfg.mask.ratio:.0%} of {pcfg.mask.patch} px patches masked)\ntraining: {args.train_config} "
          f"({base.epochs} epochs x {base.steps_per_epoch} steps x {base.batch_size}), seeds {args.seeds}",
          flush=True)
    t0 = time.perf_counter()
    pre = pretrain_encoder(pcfg)
    pretrain_s = time.perf_counter() - t0
    print(f"pretrained in {pretrain_s:.0f}s: probe L1 {pre.history[0]['probe_l1']:.4f} -> "
          f"{pre.history[-1]['probe_l1']:.4f} (band means {pre.baseline_error:.4f})", flush=True)

    _, val = load_regions(base)
    runs: list[dict] = []
    for seed in args.seeds:
        for start in ("scratch", "pretrained"):
            over = [f"output={tmp / f'{start}-{seed}.safetensors'}", f"seed={seed}", *extra]
            if start == "pretrained":
                over.append(f"model.encoder_weights={encoder}")
            cfg = load_config(args.train_config, over, TrainConfig)
            t0 = time.perf_counter()
            result = train_model(cfg)
            seconds = time.perf_counter() - t0
            spec = read_model_spec(result.checkpoint)
            tiling = SegmentConfig(model=result.checkpoint, tile=cfg.validation.tile, stitch=cfg.validation.stitch)
            last = model_metrics(TrainPaths.for_output(result.checkpoint).state, spec, val, tiling)
            run = {"seed": seed, "start": start, "seconds": round(seconds, 1), "last_miou": last["mean_iou"],
                   "best_miou": result.best_miou, "best_epoch": result.best_epoch,
                   "curve": [h["val_miou"] for h in result.history]}
            runs.append(run)
            print(f"  seed {seed} {start:10s}: last epoch mIoU {run['last_miou']:.4f}, best epoch "
                  f"{run['best_epoch']} {run['best_miou']:.4f} ({seconds:.0f}s)", flush=True)

    print("\n| start | last-epoch mIoU (mean ± sd) | best-epoch mIoU (mean ± sd) | per seed (last) |")
    print("| --- | --- | --- | --- |")
    summary = {}
    for start in ("scratch", "pretrained"):
        last = np.array([r["last_miou"] for r in runs if r["start"] == start])
        best = np.array([r["best_miou"] for r in runs if r["start"] == start])
        summary[start] = {"last_mean": last.mean(), "last_sd": last.std(ddof=1) if len(last) > 1 else 0.0,
                          "best_mean": best.mean(), "best_sd": best.std(ddof=1) if len(best) > 1 else 0.0}
        s = summary[start]
        print(f"| {start} | {s['last_mean']:.3f} ± {s['last_sd']:.3f} | {s['best_mean']:.3f} ± {s['best_sd']:.3f} | "
              + ", ".join(f"{v:.3f}" for v in last) + " |")
    gains = [b["last_miou"] - a["last_miou"] for a, b in zip(runs[::2], runs[1::2], strict=True)]
    print(f"\npretrained minus scratch, last epoch, per seed: {', '.join(f'{g:+.3f}' for g in gains)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"pretrain-{args.train_config.stem}-{base.model.architecture}.json"
    out.write_text(json.dumps({"machine": machine(), "malloc": malloc, "pretrain_seconds": pretrain_s,
                               "pretrain_history": pre.history, "runs": runs, "summary": summary}, indent=2,
                              default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
