"""``geoseg pretrain CONFIG.yaml``: make an encoder file from unlabelled scenes."""

from __future__ import annotations

import sys

import click

from geoseg.cli.options import config_argument, overwrite_option, set_option, verbosity


@click.command("pretrain")
@config_argument
@set_option
@overwrite_option
@click.option("--epochs", type=click.IntRange(1), default=None, help="Override the number of epochs.")
@verbosity
def command(config: str, overrides: tuple[str, ...], overwrite: bool, epochs: int | None) -> None:
    """Pretrain an encoder on unlabelled scenes (masked-image modelling); write it for model.encoder_weights."""
    from geoseg.config import PretrainConfig, load_config
    from geoseg.pretrain import pretrain_encoder

    if overwrite:
        overrides = (*overrides, "overwrite=true")
    if epochs:
        overrides = (*overrides, f"epochs={epochs}")
    cfg = load_config(config, overrides, PretrainConfig)
    result = pretrain_encoder(cfg, progress=sys.stderr.isatty())
    first, last = result.history[0]["probe_l1"], result.history[-1]["probe_l1"]
    click.echo(f"wrote {result.encoder} (masked-pixel L1 on the probe windows {first:.4f} -> {last:.4f}; "
               f"band means give {result.baseline_error:.4f}); train with model.encoder_weights: {result.encoder}",
               err=True)
