"""The online evaluation while pretraining (docs/training.md, `eval.*`): every `eval.every` steps
the pretraining stage scores the encoder as it is, with the protocols the evaluation stage uses.

    eval_specs(...)        -> EvalSpecs: the loaders, over the same seeded samples at every evaluation
    evaluate_online(...)   -> kNN top-1/top-5 on validation against a training-split memory bank
                              (vitmpp.evaluate.knn, as protocol=knn), few-shot linear accuracy from the same
                              features (vitmpp.evaluate.fewshot), and the objective's validation loss
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from vitmpp.common.errors import UserError
from vitmpp.common.seeding import restored_generators, seed_generators
from vitmpp.datasets import LoaderSpec, eval_transform, open_loader, unit_pixels

from .fewshot import fewshot_evaluate
from .heads import pooled_features
from .knn import extract, knn_scores

EVAL_SPLIT = "validation"  # the online evaluation's queries: the split the evaluation stages choose on
# The evaluation reads the same samples through a deterministic transform every time: when all of them fit in
# this many bytes (uint8, counted whole although each rank keeps only its share), the first evaluation keeps
# the decoded batches and the later ones reuse them (docs/benchmarks.md has the saving on the digits);
# ImageNet-sized samples are decoded every time.
EVAL_CACHE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class EvalSpecs:
    """What one online evaluation reads: the kNN memory bank (training split), the kNN queries and the
    loss images (validation split), how many real samples each holds, and whether their decoded
    batches are kept for the next evaluation (`batches`)."""

    bank: LoaderSpec
    queries: LoaderSpec
    loss: LoaderSpec
    bank_count: int
    queries_count: int
    loss_count: int
    keep_batches: bool = False
    kept: dict = field(default_factory=dict, compare=False, repr=False)

    def batches(self, name: str):
        """The batches of loader `name` ('bank', 'queries', 'loss'): a fresh loader, or the batches the
        first evaluation read (the same ones: the samples and the transform are fixed)."""
        spec = getattr(self, name)
        if not self.keep_batches:
            return open_loader(spec)
        if name not in self.kept:
            self.kept[name] = list(open_loader(spec))
        return self.kept[name]


def eval_specs(
    shards,
    manifest,
    train_split: str,
    img_size: int,
    *,
    knn_images: int,
    loss_images: int,
    loss_batch: int = 256,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    num_workers: int = 0,
    interpolation: str = "bicubic",
    max_skip_fraction: float = 0.1,
    batch_size: int = 256,
) -> EvalSpecs:
    """Eval loaders (every sample once over the ranks, padding marked -1) over a seeded random sample of
    `knn_images` training images (the bank) and as many validation images (the queries), and of
    `loss_images` validation images (0: all) for the loss; the same samples at every evaluation.
    `loss_batch`: images per rank per forward of the objective (the training per-device batch fits)."""

    def sample(split: str, images: int) -> tuple[int, ...] | None:
        total = manifest.split(split).num_samples
        if not images or total <= images:
            return None
        return tuple(np.sort(np.random.default_rng(seed).choice(total, size=images, replace=False)).tolist())

    def count(split: str, keep) -> int:
        return len(keep) if keep is not None else manifest.split(split).num_samples

    bank_keep, query_keep = sample(train_split, knn_images), sample(EVAL_SPLIT, knn_images)
    loss_keep = sample(EVAL_SPLIT, loss_images)
    common = dict(
        shards=shards,
        manifest=manifest,
        training=False,
        rank=rank,
        world_size=world,
        num_workers=num_workers,
        max_skip_fraction=max_skip_fraction,
        transform=eval_transform(img_size, interpolation=interpolation),
    )
    counts = dict(
        bank_count=count(train_split, bank_keep),
        queries_count=count(EVAL_SPLIT, query_keep),
        loss_count=count(EVAL_SPLIT, loss_keep),
    )
    keep = sum(counts.values()) * 3 * img_size**2 <= EVAL_CACHE_BYTES
    if keep:  # decoded once: in this process (starting loader workers took longer than decoding the digits)
        common["num_workers"] = 0
    return EvalSpecs(
        bank=LoaderSpec(split=train_split, keep_indices=bank_keep, batch_size=batch_size, **common),
        queries=LoaderSpec(split=EVAL_SPLIT, keep_indices=query_keep, batch_size=batch_size, **common),
        loss=LoaderSpec(split=EVAL_SPLIT, keep_indices=loss_keep, batch_size=loss_batch, **common),
        keep_batches=keep,
        **counts,
    )


def evaluate_online(
    accelerator,
    objective: torch.nn.Module,
    specs: EvalSpecs,
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    pool: str = "token",
    seed: int = 0,
    fewshot_shots: tuple[int, ...] = (),
) -> dict[str, float]:
    """The online evaluation of `objective` (unwrapped, whole on every rank; eval mode and no gradients
    inside, its train/eval mode restored):

    - kNN (vitmpp.evaluate.knn, as protocol=knn): the encoder's class-token features of the bank and of
      the queries are extracted by every rank for its share and gathered to every rank (`accelerator.gather`),
      so every rank holds all of them and computes the same votes; `knn_top1`, `knn_top5` in %.
    - the objective's own loss on `specs.loss` (supervised: its cross-entropy), sharded: each rank
      forwards its share (padding, index -1, dropped) with masks drawn from (`seed`, rank, batch number),
      and the sums are reduced; `loss` is the mean over images (each batch's loss weighted by its images).
      The masks are the same at every evaluation of a run on the same number of processes.

    - few-shot linear accuracy (evaluate/fewshot.py) for each of `fewshot_shots`, from the same features:
      the shots drawn from the bank (seed `seed`), the regulariser chosen on the even-numbered queries and
      the accuracy (`fewshot_<k>shot`, %) measured on the odd-numbered ones, so nothing is scored on the
      images that chose it; NaN when a class has fewer than k bank images.

    Every rank must call it (gathers). Returns also `knn_count` and `loss_count` (validation images
    scored, each once over the ranks: checked) and `bank` (memory-bank images)."""
    encoder, device = objective.feature_encoder(), accelerator.device
    was_training = objective.training
    objective.eval()
    try:
        with torch.no_grad(), restored_generators(device):

            def features(images):
                return pooled_features(encoder, images, pool)

            bank_x, bank_y = extract(accelerator, features, specs.batches("bank"), mean, std, l2_normalise=False)
            query_x, query_y = extract(accelerator, features, specs.batches("queries"), mean, std, l2_normalise=False)
            if query_x.shape[0] != specs.queries_count:
                raise RuntimeError(
                    f"kNN evaluation saw {query_x.shape[0]} validation samples, expected {specs.queries_count}"
                )
            classes = specs.bank.manifest.num_classes
            knn = knn_scores(
                F.normalize(bank_x, dim=1), bank_y, F.normalize(query_x, dim=1), query_y, classes, k, temperature
            )
            fewshot = online_fewshot((bank_x, bank_y), (query_x, query_y), classes, fewshot_shots, seed)
            loss, loss_count = _validation_loss(accelerator, objective, specs.batches("loss"), specs.loss_count, seed)
    finally:
        objective.train(was_training)
    return {
        "knn_top1": knn["top1"],
        "knn_top5": knn["top5"],
        "knn_count": knn["count"],
        "loss": loss,
        "loss_count": loss_count,
        "bank": specs.bank_count,
        **fewshot,
    }


def online_fewshot(bank: tuple, queries: tuple, num_classes: int, shots: tuple[int, ...], seed: int) -> dict:
    """{"fewshot_<k>shot": %} for each k: shots from the bank, λ chosen on the even queries, scored on the odd."""
    out = {}
    choose = (queries[0][0::2].cpu(), queries[1][0::2].cpu())
    score = (queries[0][1::2].cpu(), queries[1][1::2].cpu())
    for k in shots:
        try:
            (result,) = fewshot_evaluate((bank[0].cpu(), bank[1].cpu()), choose, score, num_classes, [k], [seed])
        except UserError:  # a class with fewer than k bank images: no score rather than a stopped run
            out[f"fewshot_{k}shot"] = float("nan")
        else:
            out[f"fewshot_{k}shot"] = result.test_top1
    return out


def _validation_loss(accelerator, objective, loader, expected: int, seed: int) -> tuple[float, int]:
    """The objective's loss over `loader`'s real samples, each counted once over the ranks: (mean, count).
    Each batch's masks are drawn from (seed, rank, batch), whatever the loader did with the global generators."""
    device, rank = accelerator.device, accelerator.process_index
    total = torch.zeros((), dtype=torch.float64, device=device)
    indices = []
    for number, batch in enumerate(loader):
        keep = batch.indices >= 0
        indices.append(batch.indices.to(device))  # padding too: every rank gathers tensors of one shape
        if not keep.any():
            continue
        pixels = unit_pixels(batch.images[keep].to(device, non_blocking=True))  # the objective normalises
        seed_generators(int(np.random.SeedSequence([seed, rank, number]).generate_state(1)[0]), device)
        with accelerator.autocast():
            output = objective(pixels, batch.labels[keep].to(device))
        total += output.loss.double() * int(keep.sum())
    seen = accelerator.gather(torch.cat(indices)) if indices else torch.zeros(0, dtype=torch.long, device=device)
    seen = seen[seen >= 0]
    count = int(torch.unique(seen).numel())
    if count != expected or seen.numel() != expected:
        raise RuntimeError(f"validation loss saw {seen.numel()} samples for {count} distinct ones, expected {expected}")
    total = accelerator.reduce(total, "sum") if accelerator.num_processes > 1 else total
    return float(total) / count, count
