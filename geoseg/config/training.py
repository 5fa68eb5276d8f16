"""The `geoseg train` configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from geoseg.classes import parse_color
from geoseg.config._base import _Config, existing_file
from geoseg.config.pipeline import StitchConfig, TileConfig
from geoseg.registry import ARCHITECTURES, check_architecture


class SceneConfig(_Config):
    """An image with its label raster on the same grid."""

    image: Path
    labels: Path


    @field_validator("image", "labels")
    @classmethod
    def _must_exist(cls, v: Path) -> Path:
        return existing_file(v)


class BandConfig(_Config):
    """One input band of the model."""

    index: int = Field(ge=1, description="1-based band index in the training rasters.")
    name: str = Field(description="Band name stored in the checkpoint (e.g. red, nir).")


class ClassConfig(_Config):
    """One output class and the label codes that map to it."""

    id: int = Field(ge=0, le=254, description="Class id written to the output raster.")
    name: str
    color: str | list[int] = Field(description="#rrggbb or [r, g, b].")
    codes: list[int] = Field(default_factory=list, description="Label codes mapped to this class; default [id].")

    @field_validator("color")
    @classmethod
    def _valid_color(cls, v: str | list[int]) -> str | list[int]:
        parse_color(v)
        return v

    @property
    def label_codes(self) -> list[int]:
        """Label codes mapped to this class."""
        return self.codes or [self.id]


class WindowConfig(_Config):
    """A pixel window: rows ``row_off``.. and columns ``col_off``.. (rasterio vocabulary)."""

    row_off: int = Field(0, ge=0)
    col_off: int = Field(0, ge=0)
    height: int | None = Field(None, gt=0, description="Rows; default: to the bottom edge of the scene.")
    width: int | None = Field(None, gt=0, description="Columns; default: to the right edge of the scene.")


class ValidationConfig(_Config):
    """Held-out data: separate scenes and/or a window of the training scenes excluded from training."""

    scenes: list[SceneConfig] = Field(default_factory=list)
    window: WindowConfig | None = Field(None, description="Area of each training scene used only for validation.")
    tile: TileConfig = Field(default_factory=TileConfig, description="Tiling of the validation predictions: the "
                             "pipeline's (geoseg run) by default, so checkpoints are chosen on what users run.")
    stitch: StitchConfig = Field(default_factory=StitchConfig)


class ModelConfig(_Config):
    """Network to train: an smp architecture and encoder."""

    architecture: str = Field("unet", description="Architecture: " + ", ".join(ARCHITECTURES) + ".")
    encoder: str = Field("resnet18", description="smp encoder name (no pretrained weights are downloaded).")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict,
                                        description="Extra smp keyword arguments, e.g. encoder_depth.")
    encoder_weights: Path | None = Field(
        None, description="Start the encoder from this local file (safetensors or torch weights): an smp encoder, "
        "a torchvision/timm classifier or a geoseg checkpoint; the first convolution is adapted to the band count "
        "(docs/training.md).",
    )

    @field_validator("encoder_weights")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        return None if v is None else existing_file(v)

    @field_validator("architecture")
    @classmethod
    def _registered(cls, v: str) -> str:
        return check_architecture(v)


LossName = Literal["ce", "dice", "focal", "ce+dice", "focal+dice"]


class LossConfig(_Config):
    """Training loss; label codes in ``ignore_codes`` (and nodata) never contribute."""

    name: LossName = Field("ce", description="ce (cross-entropy), dice, focal, or a sum: ce+dice, focal+dice.")
    class_weights: Literal["none", "balanced"] | list[float] = Field(
        "none", description="'balanced': inverse class frequency of the training pixels (scikit-learn's rule), or "
        "one weight per class in class order.",
    )
    focal_gamma: float = Field(2.0, ge=0, description="Focusing parameter of the focal loss.")
    second_weight: float = Field(1.0, ge=0, description="Weight of the second term of a sum (the dice in ce+dice).")

    @field_validator("class_weights")
    @classmethod
    def _non_negative(cls, v: str | list[float]) -> str | list[float]:
        if isinstance(v, list) and (not v or min(v) < 0):
            raise ValueError("weights must be a non-empty list of numbers >= 0")
        return v


class SamplingConfig(_Config):
    """How training windows are drawn from the training area."""

    class_balanced: bool = Field(
        False, description="Centre each window near a pixel of a class drawn uniformly from the classes present, "
        "so rare classes are seen as often as common ones.",
    )
    min_labelled: float = Field(0.5, gt=0, le=1, description="Least fraction of labelled, valid pixels in a window.")


class AugmentConfig(_Config):
    """Augmentations for overhead imagery (applied to training windows only)."""

    flips: bool = Field(True, description="Random horizontal and vertical flips.")
    rotate90: bool = Field(True, description="Random rotations by multiples of 90 degrees.")
    brightness: float = Field(0.0, ge=0, description="Per-band additive jitter in band standard deviations (e.g. 0.1).")
    contrast: float = Field(0.0, ge=0, lt=1, description="Per-band multiplicative jitter: x (1 +- contrast).")
    scale: float = Field(0.0, ge=0, lt=1, description="Scale jitter: windows resampled by a factor in "
                         "[1 - scale, 1 + scale] (bilinear image, nearest labels); 0: off.")


class TrainConfig(_Config):
    """A `geoseg train` run."""

    output: Path = Field(description="Checkpoint to write (.safetensors).")
    overwrite: bool = False
    model: ModelConfig = Field(default_factory=ModelConfig)
    bands: list[BandConfig] = Field(min_length=1)
    classes: list[ClassConfig] = Field(min_length=2)
    ignore_codes: list[int] = Field(default_factory=list, description="Label codes excluded from the loss and metrics.")
    train: list[SceneConfig] = Field(min_length=1)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    tile_size: int = Field(128, gt=0, description="Training window side in pixels.")
    batch_size: int = Field(8, ge=1)
    epochs: int = Field(10, ge=1)
    steps_per_epoch: int = Field(50, ge=1)
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["onecycle", "cosine"] = Field(
        "onecycle",
        description="Learning-rate schedule over all steps: one-cycle (warm-up then anneal) or cosine decay.",
    )
    grad_clip: float = Field(5.0, ge=0, description="Clip the gradient norm to this value (0: no clipping).")
    patience: int | None = Field(
        None, ge=1, description="Early stopping: stop after this many epochs without a better validation mIoU."
    )
    selection: Literal["best", "last", "swa", "ema"] = Field(
        "best", description="The weights kept: 'best' the epoch with the best validation mIoU (chosen on the "
        "validation area, so its score there is optimistic); 'last' the last epoch's; 'swa' the average of the "
        "last swa_epochs epochs' weights, batch-norm statistics recomputed on training windows; 'ema' an "
        "exponential moving average of the weights over every step (docs/training.md).",
    )
    swa_epochs: int = Field(5, ge=2, description="selection swa: epochs whose end-of-epoch weights are averaged.")
    ema_decay: float = Field(0.99, gt=0, lt=1, description="selection ema: weight of the average at each step "
                             "(0.99: about the last 100 steps count).")
    refit: bool = Field(
        False, description="After the run, train again from the start on all labelled pixels, the validation area "
        "(and validation scenes) included, for the epochs the first run chose (its best epoch under selection best, "
        "else all it trained), and keep those weights; the first run's checkpoint stays beside it as "
        "NAME.holdout.safetensors with its validation score.",
    )
    loss: LossConfig = Field(default_factory=LossConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' trains on CUDA when present.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 autocast on CUDA (fp16 with loss scaling where bf16 is missing); on the CPU "
        "bf16 autocast with channels-last where it computes bf16 natively (AMX, AVX-512 BF16: 1.8x faster at the "
        "same validation mIoU, docs/training.md), else fp32. Validation is fp32 on the CPU either way.",
    )
    channels_last: bool | None = Field(
        None, description="Channels-last memory format for the training forward and backward (unset: on where bf16 "
        "runs on the CPU, off otherwise).",
    )
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: all cores.")
    init: Path | None = Field(
        None, description="Fine-tune this geoseg checkpoint (geoseg train --init): same architecture and encoder; "
        "a new head row for each new class, first-layer filters matched to the bands by name (docs/training.md).",
    )
    freeze_encoder_epochs: int = Field(0, ge=0, description="Train only the decoder and head for this many first "
                                       "epochs (encoder weights and batch-norm statistics frozen).")
    encoder_lr_factor: float = Field(1.0, gt=0, le=1, description="The encoder's learning rate as a fraction of lr "
                                     "(e.g. 0.1 when it starts from weights you brought).")

    @field_validator("init")
    @classmethod
    def _init_exists(cls, v: Path | None) -> Path | None:
        return None if v is None else existing_file(v)


    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        ids = [c.id for c in self.classes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"classes: class ids must be unique (got {ids})")
        codes = [code for c in self.classes for code in c.label_codes]
        if len(set(codes)) != len(codes):
            raise ValueError("classes: a label code is mapped to two classes")
        if set(codes) & set(self.ignore_codes):
            raise ValueError("a label code is both mapped to a class and ignored")
        if not self.validation.scenes and self.validation.window is None:
            raise ValueError("validation: needs scenes or a window (a held-out area, never random pixels)")
        if self.model.architecture == "fcn" and (self.freeze_encoder_epochs or self.encoder_lr_factor != 1):
            raise ValueError("freeze_encoder_epochs / encoder_lr_factor: the fcn has no encoder")
        if self.model.architecture == "fcn" and self.model.encoder_weights is not None:
            raise ValueError("model.encoder_weights: the fcn has no encoder")
        if self.selection == "swa" and self.swa_epochs > self.epochs:
            raise ValueError(f"swa_epochs: {self.swa_epochs} is more than the {self.epochs} epochs trained")
        if self.selection == "swa" and self.patience is not None:
            raise ValueError("patience: early stopping would end the run before the epochs swa averages; use it "
                             "with selection best, last or ema")
        weights = self.loss.class_weights
        if isinstance(weights, list) and len(weights) != len(self.classes):
            raise ValueError(f"loss.class_weights: {len(weights)} weights for {len(self.classes)} classes")
        return self


class UnlabelledSceneConfig(_Config):
    """An image to pretrain on: no labels needed."""

    image: Path
    window: WindowConfig | None = Field(None, description="Only this area of the image (e.g. the training rows, "
                                        "to keep a validation area unseen); default: the whole image.")

    @field_validator("image")
    @classmethod
    def _must_exist(cls, v: Path) -> Path:
        return existing_file(v)


class MaskConfig(_Config):
    """Masked-image modelling: which part of each window the encoder must reconstruct."""

    patch: int = Field(8, gt=0, description="Side of the square patches that are masked, in pixels.")
    ratio: float = Field(0.5, gt=0, lt=1, description="Fraction of the patches masked in each window.")


class PretrainConfig(_Config):
    """A `geoseg pretrain` run: self-supervised pretraining of an encoder on unlabelled scenes."""

    output: Path = Field(description="Encoder file to write (.safetensors), for model.encoder_weights.")
    overwrite: bool = False
    model: ModelConfig = Field(default_factory=ModelConfig, description="The network pretrained: its encoder is "
                               "what is written, so use the architecture, encoder and arch_kwargs you fine-tune.")
    bands: list[BandConfig] = Field(min_length=1)
    scenes: list[UnlabelledSceneConfig] = Field(min_length=1)
    mask: MaskConfig = Field(default_factory=MaskConfig)
    tile_size: int = Field(64, gt=0, description="Window side in pixels.")
    batch_size: int = Field(16, ge=1)
    epochs: int = Field(10, ge=1)
    steps_per_epoch: int = Field(50, ge=1)
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of AdamW (one-cycle schedule).")
    weight_decay: float = Field(0.05, ge=0)
    min_valid: float = Field(0.5, gt=0, le=1, description="Least fraction of valid (not nodata) pixels in a window.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: all cores.")

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.model.architecture == "fcn":
            raise ValueError("model.architecture: the fcn has no encoder to pretrain")
        if self.mask.patch > self.tile_size:
            raise ValueError(f"mask.patch: {self.mask.patch} px patches do not fit {self.tile_size} px windows")
        return self
