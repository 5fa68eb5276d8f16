"""Training losses: cross-entropy, Dice, focal and their sums, with class weights and an ignore index.

Cross-entropy is torch's; Dice and focal are segmentation-models-pytorch's (``smp.losses``), so their
definitions are the ones smp documents: soft Dice averaged over the classes present in the batch, and the
focal loss of Lin et al. (one-vs-rest, sigmoid) summed over classes. Pixels labelled ``ignore_index``
contribute to none of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import numpy as np
import segmentation_models_pytorch as smp
import torch

from geoseg.config.training import LossName
from geoseg.errors import ConfigError

#: Loss names accepted by ``loss.name``; a ``+`` sums two terms, the second scaled by ``loss.second_weight``.
LOSSES: tuple[str, ...] = get_args(LossName)


def class_weights_from_counts(counts: np.ndarray, mode: str | Sequence[float]) -> list[float] | None:
    """Per-class loss weights: ``none``, ``balanced`` (inverse frequency) or an explicit list.

    ``balanced`` follows scikit-learn (``n / (k * count_c)``), rescaled so that the weighted mean over the
    training pixels is 1; a class with no training pixel gets weight 0.
    """
    if isinstance(mode, str):
        if mode == "none":
            return None
        counts = np.asarray(counts, dtype=np.float64)
        present = counts > 0
        w = np.zeros_like(counts)
        w[present] = counts.sum() / (present.sum() * counts[present])
        w *= counts.sum() / float((w * counts).sum())
        return w.tolist()
    weights = [float(v) for v in mode]
    if len(weights) != len(counts):
        raise ConfigError(f"loss.class_weights: {len(weights)} weights for {len(counts)} classes")
    return weights


class WeightedSum(torch.nn.Module):
    """``first + weight * second``: a combined loss such as ``ce+dice``."""

    def __init__(self, first: torch.nn.Module, second: torch.nn.Module, weight: float) -> None:
        super().__init__()
        self.first, self.second, self.weight = first, second, weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The weighted sum of both losses."""
        return self.first(logits, target) + self.weight * self.second(logits, target)


def create_loss(name: str, ignore_index: int, class_weights: Sequence[float] | None = None, *,
                focal_gamma: float = 2.0, second_weight: float = 1.0) -> torch.nn.Module:
    """The loss ``name`` (one of :data:`LOSSES`) for logits ``(N, C, H, W)`` and targets ``(N, H, W)``."""
    if name not in LOSSES:
        raise ConfigError(f"loss.name: unknown loss {name!r}; available: {', '.join(LOSSES)}")
    weights = None if class_weights is None else [float(w) for w in class_weights]

    def term(part: str) -> torch.nn.Module:
        if part == "ce":
            tensor = None if weights is None else torch.tensor(weights, dtype=torch.float32)
            return torch.nn.CrossEntropyLoss(weight=tensor, ignore_index=ignore_index)
        if part == "dice":
            return smp.losses.DiceLoss("multiclass", ignore_index=ignore_index, class_weights=weights)
        return smp.losses.FocalLoss("multiclass", gamma=focal_gamma, ignore_index=ignore_index,
                                    class_weights=weights)

    first, *second = name.split("+")
    return WeightedSum(term(first), term(second[0]), second_weight) if second else term(first)
