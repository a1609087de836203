"""Few-shot linear evaluation of frozen features, as the ViT paper scores representations.

ViT paper §4.1: "few-shot accuracies are obtained by solving a regularized least-squares
regression problem that maps the (frozen) representation of a subset of training images to
{−1, 1}^K target vectors"; appendix B.1.2 chose MPP's target by this score. The anchor is
big_vision's few-shot evaluator (evaluators/fewshot_lsr.py), whose choices we follow:

* `shots` training images per class, drawn per class from a seeded permutation (the first
  `shots` of each class's permutation, so 5 shots are a subset of 10 for one seed);
* features whitened with the shots' own mean and standard deviation (+1e-5), plus one constant
  feature of 100 as the bias, large enough that the regulariser barely touches it;
* targets 2·one_hot − 1; weights (XᵀX + λI)⁻¹XᵀY, or Xᵀ(XXᵀ + λI)⁻¹Y when there are fewer
  shots than feature dimensions (the same solution), through one eigendecomposition so that
  every λ of a grid costs one matrix product;
* the prediction is the arg max over classes.

big_vision fixes λ (its configs use 2¹⁰); here λ is chosen from `L2_GRID` on the validation
split and the accuracy reported on test at that λ, as every choice in vitmpp is made.
Written here rather than taken from a library: scikit-learn's Ridge solves one λ at a time
and has no shot sampling; the whole evaluation is ~40 lines of linear algebra.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from vitmpp.common.errors import UserError

BIAS_FEATURE = 100.0
L2_GRID = tuple(2.0**e for e in range(-6, 21, 2))  # 2^-6 .. 2^20, a factor of 4 apart


def sample_shots(labels: Tensor, shots: int, seed: int, num_classes: int, *, split: str = "train") -> Tensor:
    """Indices of `shots` images of each class: the first `shots` of a per-class permutation drawn
    with `seed` (a class's order does not depend on `shots`). UserError when a class has fewer."""
    generator = torch.Generator().manual_seed(int(seed))
    chosen = []
    for cls in range(num_classes):
        members = torch.nonzero(labels == cls).flatten()
        order = members[torch.randperm(len(members), generator=generator)]
        if len(order) < shots:
            raise UserError(
                f"Class {cls} has {len(order)} {split} images, fewer than the {shots} shots asked for; "
                f"ask for at most {len(order)} shots or use a larger {split} split."
            )
        chosen.append(order[:shots])
    return torch.cat(chosen)


class RidgeToSigns:
    """Least squares from features [N, D] to ±1 targets of `num_classes`, for any L2 strength.

    Precomputes the whitening and one eigendecomposition (float64); `weights(l2)` is then
    [D + 1, K] (the last row: the bias feature's), and `predict(features, l2)` class indices."""

    def __init__(self, features: Tensor, labels: Tensor, num_classes: int):
        x = features.detach().double().cpu()
        self.mean = x.mean(dim=0, keepdim=True)
        self.std = x.std(dim=0, unbiased=False, keepdim=True) + 1e-5
        x = self.augment(x)
        y = 2.0 * torch.nn.functional.one_hot(labels.long().cpu(), num_classes).double() - 1.0
        if x.shape[0] >= x.shape[1]:  # (XᵀX + λI)⁻¹ XᵀY with XᵀX = Q diag(e) Qᵀ
            self.eigenvalues, q = torch.linalg.eigh(x.T @ x)
            self.left, self.right = q, q.T @ (x.T @ y)
        else:  # Xᵀ (XXᵀ + λI)⁻¹ Y with XXᵀ = Q diag(e) Qᵀ
            self.eigenvalues, q = torch.linalg.eigh(x @ x.T)
            self.left, self.right = x.T @ q, q.T @ y

    def augment(self, features: Tensor) -> Tensor:
        """Whitened features with the constant bias feature appended: [N, D + 1]."""
        x = (features.detach().double().cpu() - self.mean) / self.std
        return torch.cat([x, torch.full((len(x), 1), BIAS_FEATURE, dtype=x.dtype)], dim=1)

    def weights(self, l2: float | Tensor) -> Tensor:
        """[D + 1, K] for one strength, or [L, D + 1, K] for a tensor of L strengths."""
        scale = 1.0 / (self.eigenvalues + torch.as_tensor(l2, dtype=self.eigenvalues.dtype)[..., None])  # [E] | [L, E]
        return (self.left * scale[..., None, :]) @ self.right

    def predict(self, features: Tensor, l2: float | Tensor) -> Tensor:
        """Class indices [N] for one strength, [L, N] for a tensor of L strengths."""
        return (self.augment(features) @ self.weights(l2)).argmax(dim=-1)


@contextmanager
def one_thread():
    """Run the solves on one thread: the matrices are ~100 x 100, and a second thread only waits for the
    first (on a busy 2-core machine an eigendecomposition took over 100x longer with two; docs/benchmarks.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class FewShotResult:
    """One (shots, seed): the λ validation chose, and the accuracies (%) at it."""

    shots: int
    seed: int
    l2: float
    val_top1: float
    test_top1: float


def accuracy(predicted: Tensor, labels: Tensor) -> Tensor:
    """% of `predicted` [..., N] equal to `labels` [N], over the last axis."""
    return 100.0 * (predicted == labels.cpu()).double().mean(dim=-1)


def fewshot_evaluate(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    num_classes: int,
    shots: list[int],
    seeds: list[int],
    l2_grid: tuple[float, ...] = L2_GRID,
) -> list[FewShotResult]:
    """Few-shot accuracy for every seed and shot count (in that order). Each split is (features [N, D],
    labels [N]); the shots come from `train`, λ is chosen on `val` (the highest accuracy; the larger λ
    on a tie, the simpler solution), and `test` is scored at that λ."""
    grid = torch.tensor(l2_grid, dtype=torch.float64)
    results = []
    with one_thread():
        for seed in seeds:
            for k in shots:
                picked = sample_shots(train[1], k, seed, num_classes)
                solver = RidgeToSigns(train[0][picked], train[1][picked], num_classes)
                # every strength at once (one batched product per split): the solve costs milliseconds
                val_top1 = accuracy(solver.predict(val[0], grid), val[1])
                best = max(range(len(l2_grid)), key=lambda i: (float(val_top1[i]), l2_grid[i]))
                test_top1 = accuracy(solver.predict(test[0], l2_grid[best]), test[1])
                results.append(FewShotResult(k, seed, l2_grid[best], float(val_top1[best]), float(test_top1)))
    return results
