"""Few-shot linear evaluation (ViT paper §4.1, big_vision's evaluator): the closed-form solve, the
shots, and the choice of the regulariser on validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from vitmpp.common.errors import UserError
from vitmpp.evaluate.fewshot import L2_GRID, RidgeToSigns, fewshot_evaluate, sample_shots


def blobs(n_per_class: int, classes: int, dim: int, seed: int, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


@pytest.mark.parametrize("n_per_class, dim", [(20, 8), (2, 30)])  # more shots than dimensions, and fewer
def test_the_solve_equals_scikit_learns_ridge_on_the_same_features(n_per_class, dim):
    x, y = blobs(n_per_class, 4, dim, seed=0)
    solver = RidgeToSigns(x, y, 4)
    targets = 2 * torch.nn.functional.one_hot(y, 4).double() - 1
    for l2 in (2.0**-4, 1.0, 2.0**10):
        ridge = Ridge(alpha=l2, fit_intercept=False, solver="cholesky").fit(solver.augment(x).numpy(), targets.numpy())
        np.testing.assert_allclose(solver.weights(l2).numpy(), ridge.coef_.T, rtol=1e-6, atol=1e-8)


def test_with_a_vanishing_regulariser_it_is_the_least_squares_solution():
    x, y = blobs(30, 3, 5, seed=1)
    solver = RidgeToSigns(x, y, 3)
    targets = 2 * torch.nn.functional.one_hot(y, 3).double() - 1
    exact, *_ = np.linalg.lstsq(solver.augment(x).numpy(), targets.numpy(), rcond=None)
    np.testing.assert_allclose(solver.weights(1e-9).numpy(), exact, rtol=1e-5, atol=1e-7)


def test_shots_are_exactly_k_per_class_and_reproducible():
    labels = torch.arange(5).repeat_interleave(12)[torch.randperm(60, generator=torch.Generator().manual_seed(3))]
    five, ten = sample_shots(labels, 5, seed=0, num_classes=5), sample_shots(labels, 10, seed=0, num_classes=5)
    assert torch.bincount(labels[five], minlength=5).tolist() == [5] * 5
    assert torch.bincount(labels[ten], minlength=5).tolist() == [10] * 5
    assert torch.equal(five, sample_shots(labels, 5, seed=0, num_classes=5))  # the same seed, the same shots
    assert not torch.equal(five, sample_shots(labels, 5, seed=1, num_classes=5))
    for cls in range(5):  # one seed's 5 shots of a class are the first 5 of its 10
        assert five[labels[five] == cls].tolist() == ten[labels[ten] == cls][:5].tolist()


def test_a_class_with_fewer_images_than_shots_is_one_sentence():
    labels = torch.tensor([0] * 10 + [1] * 3)
    with pytest.raises(
        UserError,
        match=r"^Class 1 has 3 train images, fewer than the 5 shots asked for; ask for at "
        r"most 3 shots or use a larger train split\.$",
    ):
        sample_shots(labels, 5, seed=0, num_classes=2)


def test_the_regulariser_is_chosen_on_validation_and_test_is_scored_at_it():
    train, val, test = blobs(30, 4, 16, seed=4), blobs(30, 4, 16, seed=5), blobs(30, 4, 16, seed=6)
    results = fewshot_evaluate(train, val, test, 4, shots=[1, 5], seeds=[0, 1])
    assert [(r.shots, r.seed) for r in results] == [(1, 0), (5, 0), (1, 1), (5, 1)]
    for r in results:
        solver = RidgeToSigns(
            train[0][sample_shots(train[1], r.shots, r.seed, 4)],
            train[1][sample_shots(train[1], r.shots, r.seed, 4)],
            4,
        )
        val_scores = {l2: 100 * float((solver.predict(val[0], l2) == val[1]).double().mean()) for l2 in L2_GRID}
        assert r.l2 in L2_GRID and r.val_top1 == max(val_scores.values()) == val_scores[r.l2]
        assert r.test_top1 == 100 * float((solver.predict(test[0], r.l2) == test[1]).double().mean())
    assert min(r.test_top1 for r in results if r.shots == 5) > 90  # well-separated blobs
