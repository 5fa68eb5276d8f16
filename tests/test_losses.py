"""Training losses: ignored pixels never count, class weights are applied, values match their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geoseg.losses import LOSSES, class_weights_from_counts, create_loss

IGNORE = 255


def _batch(seed: int = 0, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, 8, 8, generator=g)
    target = torch.randint(0, classes, (2, 8, 8), generator=g)
    target[0, :3] = IGNORE
    return logits, target


@pytest.mark.parametrize("name", LOSSES)
def test_ignored_pixels_do_not_change_the_loss_or_get_gradients(name: str):
    logits, target = _batch()
    loss = create_loss(name, IGNORE)
    other = logits.clone()
    other[0, :, :3] = torch.randn(4, 3, 8) * 10  # only ignored pixels differ
    assert torch.allclose(loss(logits, target), loss(other, target), atol=1e-6)
    x = logits.clone().requires_grad_(True)
    loss(x, target).backward()
    assert torch.isfinite(x.grad).all() and x.grad[0, :, :3].abs().max() == 0
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES)
def test_a_confident_right_answer_costs_less_than_a_wrong_one(name: str):
    _, target = _batch()
    # +20 for the right class, -20 for the others: confident for softmax and for the one-vs-rest focal loss
    right = (torch.nn.functional.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2).float() * 2 - 1) * 20
    wrong = torch.roll(right, 1, dims=1)
    loss = create_loss(name, IGNORE)
    assert loss(right, target) < 0.05 < loss(wrong, target)


def test_weighted_cross_entropy_matches_its_definition():
    logits, target = _batch(1)
    w = [0.5, 2.0, 1.0, 3.0]
    got = create_loss("ce", IGNORE, w)(logits, target)
    logp = torch.log_softmax(logits, 1).permute(0, 2, 3, 1).reshape(-1, 4).numpy()
    t = target.reshape(-1).numpy()
    keep = t != IGNORE
    nll = -logp[keep, t[keep]]
    weights = np.array(w)[t[keep]]
    assert float(got) == pytest.approx(float((weights * nll).sum() / weights.sum()), rel=1e-5)


def test_dice_matches_its_definition():
    logits, target = _batch(2)
    got = create_loss("dice", IGNORE)(logits, target)
    p = torch.softmax(logits, 1).numpy()
    t = target.numpy()
    keep = t != IGNORE
    losses = []
    for k in range(4):
        truth = (t == k) & keep
        if truth.any():  # smp leaves classes absent from the batch out of the mean (zero loss)
            inter = (p[:, k] * truth).sum()
            losses.append(1 - 2 * inter / ((p[:, k] * keep).sum() + truth.sum()))
        else:
            losses.append(0.0)
    assert float(got) == pytest.approx(np.mean(losses), rel=1e-5)


def test_combined_loss_is_the_weighted_sum():
    logits, target = _batch(3)
    ce, dice = create_loss("ce", IGNORE)(logits, target), create_loss("dice", IGNORE)(logits, target)
    both = create_loss("ce+dice", IGNORE, second_weight=0.5)(logits, target)
    assert float(both) == pytest.approx(float(ce + 0.5 * dice), rel=1e-6)


def test_balanced_class_weights_follow_inverse_frequency():
    counts = np.array([900, 90, 10, 0])
    w = np.array(class_weights_from_counts(counts, "balanced"))
    assert w[3] == 0 and w[0] < w[1] < w[2]
    assert w[2] / w[0] == pytest.approx(90.0) and (w * counts).sum() / counts.sum() == pytest.approx(1.0)
    assert class_weights_from_counts(counts, "none") is None
    assert class_weights_from_counts(counts, [1, 2, 3, 4]) == [1.0, 2.0, 3.0, 4.0]
