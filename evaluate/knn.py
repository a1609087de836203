"""k-nearest-neighbour classification on frozen features (Wu et al. 2018; DINO's protocol):
cosine similarity, the k most similar training images vote for their class with weight
exp(similarity / temperature)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vitmpp.datasets import normalize_batch


@torch.no_grad()
def extract(
    accelerator, features: Callable, loader, mean, std, *, l2_normalise: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (L2-normalised unless `l2_normalise` is False) and labels of a split, gathered from
    every rank in sample order, padding dropped."""
    device = accelerator.device
    feats, labels, indices = [], [], []
    for batch in loader:
        images = normalize_batch(batch.images.to(device, non_blocking=True), mean, std)
        with accelerator.autocast():
            out = features(images)
        feats.append(F.normalize(out.float(), dim=1) if l2_normalise else out.float())
        labels.append(batch.labels.to(device))
        indices.append(batch.indices.to(device))
    feats, labels, indices = (accelerator.gather(torch.cat(t)) for t in (feats, labels, indices))
    keep = indices >= 0
    order = torch.argsort(indices[keep])  # a fixed order, whatever the number of ranks
    return feats[keep][order], labels[keep][order]


def knn_predict(
    train_feats, train_labels, query_feats, num_classes: int, k: int, temperature: float, chunk: int = 1024
) -> torch.Tensor:
    """Class scores [Q, C] for L2-normalised queries against L2-normalised training features."""
    k = min(k, train_feats.shape[0])
    scores = []
    for start in range(0, query_feats.shape[0], chunk):
        similarity = query_feats[start : start + chunk] @ train_feats.T  # [q, N] cosine
        top_sim, top_idx = similarity.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(similarity.shape[0], num_classes, device=similarity.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_classify_splits(
    accelerator, features, train_loader, queries: dict, mean, std, num_classes: int, k: int, temperature: float
) -> dict[str, dict[str, float]]:
    """kNN top-1/top-5 (%) of every query split ({name: (loader, expected count)}) against one memory bank,
    whose features are extracted once."""
    train_feats, train_labels = extract(accelerator, features, train_loader, mean, std)
    results = {}
    for name, (loader, expected) in queries.items():
        query_feats, query_labels = extract(accelerator, features, loader, mean, std)
        if query_feats.shape[0] != expected:
            raise RuntimeError(f"kNN evaluation saw {query_feats.shape[0]} {name} samples, expected {expected}")
        results[name] = knn_scores(train_feats, train_labels, query_feats, query_labels, num_classes, k, temperature)
    return results


def knn_scores(
    train_feats, train_labels, query_feats, query_labels, num_classes: int, k: int, temperature: float
) -> dict[str, float]:
    """kNN top-1/top-5 (%) and the query count, for L2-normalised features."""
    scores = knn_predict(train_feats, train_labels, query_feats, num_classes, k, temperature)
    top5 = scores.topk(min(5, num_classes), dim=1).indices
    correct = top5 == query_labels[:, None]
    return {
        "top1": 100.0 * correct[:, 0].float().mean().item(),
        "top5": 100.0 * correct.any(1).float().mean().item(),
        "count": int(query_feats.shape[0]),
    }
