"""Top-1/top-5 accuracy of a classifier over one split, each sample counted once across ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vitmpp.datasets import normalize_batch


@torch.no_grad()
def accuracy(accelerator, predict: Callable, loader, mean, std, expected: int) -> dict[str, float]:
    """Top-1/top-5 (%) of `predict` (normalised [B, 3, H, W] -> logits [B, C]) over the split, and its count.

    The loader pads the last rank with repeats marked index -1; those are dropped
    after the gather, and the count is checked against the manifest (`expected`).
    """
    device = accelerator.device
    rows = []
    for batch in loader:
        images = normalize_batch(batch.images.to(device, non_blocking=True), mean, std)
        labels = batch.labels.to(device)
        with accelerator.autocast():
            logits = predict(images)
        top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        correct = top5 == labels[:, None]
        rows.append(torch.stack([batch.indices.to(device), correct[:, 0].long(), correct.any(dim=1).long()], dim=1))
    table = torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.long, device=device)
    table = accelerator.gather(table)
    table = table[table[:, 0] >= 0]
    count = int(torch.unique(table[:, 0]).numel())
    if count != expected or table.shape[0] != expected:
        raise RuntimeError(
            f"evaluation saw {table.shape[0]} predictions for {count} distinct samples, expected {expected}"
        )
    return {
        "top1": 100.0 * table[:, 1].float().mean().item(),
        "top5": 100.0 * table[:, 2].float().mean().item(),
        "count": count,
    }
