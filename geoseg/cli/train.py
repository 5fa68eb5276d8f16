"""``geoseg train CONFIG.yaml``: train a model and write its checkpoint."""

from __future__ import annotations

import sys

import click

from geoseg.cli.options import config_argument, overwrite_option, set_option, verbosity


def _epilog() -> str:
    from geoseg.registry import ARCHITECTURES

    return ("Architectures (model.architecture): " + ", ".join(ARCHITECTURES) + ".\n\nEncoders (model.encoder): any "
            "of smp's (resnet18/34/50, efficientnet-b0..b7, mobilenet_v2, mit_b0..b5, ...) or a timm model as "
            "tu-NAME; model.encoder_weights: PATH starts it from a file (docs/training.md).")


@click.command("train", epilog=_epilog())
@config_argument
@set_option
@overwrite_option
@click.option("--epochs", type=click.IntRange(1), default=None, help="Override the number of epochs.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its training state (same config).")
@click.option("--init", "init", type=click.Path(dir_okay=False), default=None,
              help="Fine-tune this geoseg checkpoint: new classes get new head rows, new bands new first filters.")
@verbosity
def command(config: str, overrides: tuple[str, ...], overwrite: bool, epochs: int | None, resume: bool,
            init: str | None) -> None:
    """Train an smp model on scenes and label rasters; keep the weights `selection` names (default: best epoch)."""
    from pathlib import Path

    from geoseg.config import TrainConfig, load_config
    from geoseg.train import train_model

    if init:  # a path on the command line is relative to where it is typed, not to the config
        overrides = (*overrides, f"init={Path(init).absolute()}")
    if overwrite:
        overrides = (*overrides, "overwrite=true")
    if epochs:
        overrides = (*overrides, f"epochs={epochs}")
    cfg = load_config(config, overrides, TrainConfig)
    result = train_model(cfg, resume=resume, progress=sys.stderr.isatty())
    early = ", stopped early" if result.stopped_early else ""
    if cfg.refit:
        kept = f"refit on all labelled pixels for {len(result.history)} epochs; held-out run beside it"
    elif result.selection == "best":
        kept = f"best epoch {result.best_epoch}, validation mIoU {result.best_miou:.4f}"
    else:
        kept = (f"{result.selection} weights, validation mIoU {result.selected_miou or float('nan'):.4f}; best epoch "
                f"{result.best_epoch} had {result.best_miou:.4f}")
    click.echo(f"wrote {result.checkpoint} ({kept}{early}; log, curves and training state beside it)", err=True)
