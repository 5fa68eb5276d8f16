"""Where a CPU training epoch goes, and what bf16 autocast with channels-last changes.

Trains the config for ``--epochs`` epochs in each variant (fp32; fp32 channels-last; bf16 autocast with
channels-last where the CPU computes bf16 natively), interleaved over ``--rounds``, timing the parts of
each epoch by wrapping the training loop's own functions: drawing and augmenting the windows
(``train._batch``), the validation (``train.validate``), and the rest (forward, backward, optimiser step).
Reports epochs per minute and the validation mIoU of the last and best epoch of each variant, so a faster
variant is shown not to learn worse.

    python benchmarks/bench_train_speed.py configs/train-nc-landsat7.yaml --epochs 8

Needs the real data under ../shared/data (see its README); exits with a message where it is absent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, control_malloc, machine, sample_sd  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_config", type=Path)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one interleaved round per seed")
    p.add_argument("--variants", nargs="+", default=None, help="names of the variants to run (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    args = p.parse_args()
    malloc = control_malloc(True)

    import torch

    import geoseg.train as train
    from geoseg.config import TrainConfig, load_config
    from geoseg.device import cpu_has_bf16
    from geoseg.errors import GeosegError

    variants = {"fp32": ["precision=fp32", "channels_last=false"],
                "fp32, channels-last": ["precision=fp32", "channels_last=true"]}
    if cpu_has_bf16():
        variants["bf16 autocast, channels-last"] = ["precision=bf16", "channels_last=true"]
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants}
    tmp = Path(tempfile.mkdtemp(prefix="geoseg-train-speed-"))
    try:
        load_config(args.train_config, [f"output={tmp / 'probe.safetensors'}", *args.overrides], TrainConfig)
    except GeosegError as exc:
        sys.exit(f"cannot run this benchmark: {exc} (the real data lives in ../shared/data; see its README)")
    print(f"machine: {machine()}, bf16 CPU: {cpu_has_bf16()}, torch threads {torch.get_num_threads()}\n"
          f"malloc: {malloc}\nconfig: {args.train_config} {args.overrides}, {args.epochs} epochs, "
          f"seeds {args.seeds}", flush=True)

    spent = {"sampling": 0.0, "validation": 0.0}

    def timed(name, fn):  # noqa: ANN001, ANN202
        def wrapper(*a, **k):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0
        return wrapper

    train._batch = timed("sampling", train._batch)
    train.validate = timed("validation", train.validate)
    runs = []
    for r in args.seeds:
        for name, over in variants.items():
            cfg = load_config(args.train_config, [f"output={tmp / f'{r}-{len(runs)}.safetensors'}", f"seed={r}",
                                                  f"epochs={args.epochs}", *over, *args.overrides], TrainConfig)
            spent.update(sampling=0.0, validation=0.0)
            t0 = time.perf_counter()
            result = train.train_model(cfg)
            total = time.perf_counter() - t0
            fit = total - spent["sampling"] - spent["validation"]
            runs.append({"round": r, "variant": name, "seconds": total, "sampling_s": spent["sampling"],
                         "validation_s": spent["validation"], "step_s": fit,
                         "epochs_per_min": args.epochs / total * 60,
                         "last_miou": result.history[-1]["val_miou"], "best_miou": result.best_miou})
            print(f"  round {r} {name:30s}: {total:.1f} s ({args.epochs / total * 60:.2f} epochs/min): sampling "
                  f"{spent['sampling']:.1f}, forward/backward/step {fit:.1f}, validation {spent['validation']:.1f}"
                  f" s; val mIoU last {runs[-1]['last_miou']:.4f}, best {result.best_miou:.4f}", flush=True)

    print("\n| variant | epochs/min | sampling | forward+backward+step | validation | val mIoU last | best |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    summary = {}
    for name in variants:
        mine = [x for x in runs if x["variant"] == name]
        med = {k: statistics.median(x[k] for x in mine) for k in ("epochs_per_min", "sampling_s", "step_s",
                                                                    "validation_s", "seconds")}
        last, best = (np.array([x[k] for x in mine]) for k in ("last_miou", "best_miou"))
        summary[name] = {**med, "last_miou": last.mean(), "last_sd": sample_sd(last), "best_miou": best.mean(),
                         "best_sd": sample_sd(best)}
        e = args.epochs
        print(f"| {name} | {med['epochs_per_min']:.2f} | {med['sampling_s'] / e:.2f} s/epoch | "
              f"{med['step_s'] / e:.2f} s/epoch | {med['validation_s'] / e:.2f} s/epoch | "
              f"{last.mean():.3f} ± {sample_sd(last):.3f} | {best.mean():.3f} ± {sample_sd(best):.3f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / f"train-speed-{args.train_config.stem}.json"
    dest.write_text(json.dumps({"machine": machine(), "malloc": malloc, "epochs": args.epochs, "runs": runs,
                                "summary": summary}, indent=2, default=float))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
