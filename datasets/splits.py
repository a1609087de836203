"""How a source's images become the `train`, `validation` and `test` splits (writer.py).

Each split is class-stratified and seeded: `test` first (a source may fix its seed, so that every
run reports on the same images), then `validation` from the rest, and `train`. A source's own
splits are kept, a missing validation or test split carved from its train split.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from .sources import Item, Source, SourceData


def stratified_split(labels: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a seeded, per-class train/validation split (validation gets round(n_c * f) per class).

    Written by hand rather than with sklearn's `train_test_split(stratify=...)`, which
    refuses classes with a single member and validation sets smaller than the number
    of classes; here such classes simply contribute nothing to validation.
    """
    rng = np.random.default_rng([seed, 0x5B117])
    labels_arr = np.asarray(labels)
    train, val = [], []
    for c in np.unique(labels_arr):
        members = np.flatnonzero(labels_arr == c)
        members = members[rng.permutation(len(members))]
        n_val = int(round(len(members) * val_fraction))
        if n_val >= len(members):  # keep at least one training example per class
            n_val = len(members) - 1
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    # write order is shuffled too: shards then mix classes, which a shuffle buffer alone does poorly
    train = [train[i] for i in rng.permutation(len(train))]
    val = [val[i] for i in rng.permutation(len(val))]
    return train, val


def split_three_ways(
    labels: list[int], val_fraction: float, test_fraction: float, seed: int, test_seed: int | None = None
) -> dict[str, list[int]]:
    """Indices of the `train`, `validation` and `test` splits, each class-stratified.

    The test split is carved first (seeded by `test_seed`, default `seed`: a source whose test split
    must not move with `--seed` passes a constant), then validation from the rest; both fractions are
    of the whole class, so --val-fraction 0.2 --test-fraction 0.2 keeps about 60% for training. A
    fraction of 0 gives no such split (and leaves the other split exactly as without it).
    """
    indices = list(range(len(labels)))
    test: list[int] = []
    if test_fraction > 0:
        indices, test = stratified_split(labels, test_fraction, seed if test_seed is None else test_seed)
    rest_labels = [labels[i] for i in indices]
    train_pos, val_pos = stratified_split(rest_labels, val_fraction / (1.0 - test_fraction), seed)
    return {"train": [indices[i] for i in train_pos], "validation": [indices[i] for i in val_pos], "test": test}


class SplitWarning(UserWarning):
    """A split that was asked for came out empty and was not written."""


class SmallSplitWarning(UserWarning):
    """A validation or test split too small for its numbers to mean much (MIN_EVAL_IMAGES)."""


# Below this many images an accuracy measured on a split moves by more than +-10 points (95%, at 50%
# accuracy: 1.96 x sqrt(0.25 / n)) by chance alone, more than most differences between recipes.
MIN_EVAL_IMAGES = 100


def small_split(count: int, total: int, split: str) -> str:
    """Why a validation or test split of `count` images (of the `total` its fraction is taken of) gives
    numbers that are noise, and the fraction that would give MIN_EVAL_IMAGES."""
    flag = "--val-fraction" if split == "validation" else "--test-fraction"
    spread = 100 * 1.96 * math.sqrt(0.25 / count)
    use = "every choice made on it (recipe, checkpoint) is" if split == "validation" else "a result on it is"
    needed = math.ceil(100 * (MIN_EVAL_IMAGES + 2) / total) / 100  # (+2: each class rounds its share)
    fix = (
        f"pass {flag} {needed:.2f} for about {MIN_EVAL_IMAGES}"
        if needed < 0.5
        else f"the {total} images are too few for a {split} split of {MIN_EVAL_IMAGES}: read differences "
        f"smaller than that as noise"
    )
    return (
        f"The {split} split has {count} images: an accuracy measured on it moves by up to ±{spread:.0f} points "
        f"by chance (95%), so {use} mostly noise; {fix}."
    )


def empty_split(items: list[Item], fraction: float, split: str = "validation") -> str:
    """Why --val-fraction (or --test-fraction) gave `split` no image, and the fraction (or class size) that
    would give one.

    A class of n images gives round(n x f) images to the split and always keeps one for training."""
    flag = "--val-fraction" if split == "validation" else "--test-fraction"
    largest = int(np.bincount([it.label for it in items]).max())
    needs = "fine-tuning needs" if split == "validation" else "reported results need"
    written = f"so the shards have no {split} split, which {needs}"
    if largest < 2:
        return (
            f"{flag} {fraction:g} puts no image in the {split} split (every class has a single "
            f"image, which stays in training), {written}; add images, or pass {flag} 0 to say you "
            "want none."
        )
    needed = max(2, math.floor(0.5 / fraction) + 1)
    while round(needed * fraction) < 1:
        needed += 1
    smallest = math.ceil(50 / largest) / 100
    while round(largest * smallest) < 1:
        smallest += 0.01
    return (
        f"{flag} {fraction:g} puts no image in the {split} split (the largest class has "
        f"{largest} images, and a class needs {needed} for one {split} image at that fraction), {written}; "
        f"pass {flag} {smallest:.2f} or more, or 0 to say you want none."
    )


def make_splits(
    data: SourceData, source: Source, val_fraction: float, test_fraction: float, seed: int
) -> tuple[dict[str, list[Item]], dict[str, str], float | None, float | None]:
    """The splits of `data` in write order (train, validation, test), how each was made (the manifest's
    `splits_made_by`), and the fractions that made one (None: the source's own split). Warns
    (SplitWarning, SmallSplitWarning) for a split asked for that came out empty or too small."""
    rng = np.random.default_rng([seed, 0x0D3])
    stratified = f"a class-stratified --val-fraction {val_fraction:g} (seed {seed})"
    test_seed = seed if source.test_seed is None else source.test_seed
    by_test = f"a class-stratified --test-fraction {test_fraction:g} (seed {test_seed}" + (
        ", fixed for every --seed)" if source.test_seed is not None else ")"
    )
    used_val, used_test = val_fraction, test_fraction  # what the manifest records: the fractions that made a split
    if data.fixed_splits is not None:
        own = data.own_splits or f"the data set's own {source.name} split"
        made = {split: own for split in data.fixed_splits}
        fixed = dict(data.fixed_splits)
        # a missing validation or test split is carved from train, so that choices are made on
        # validation and test stays for the report
        carve_val = "validation" not in fixed and val_fraction > 0
        carve_test = "test" not in fixed and test_fraction > 0
        used_val, used_test = (val_fraction if carve_val else None), (test_fraction if carve_test else None)
        if carve_val or carve_test:
            parts = split_three_ways(
                [it.label for it in fixed["train"]],
                val_fraction if carve_val else 0.0,
                test_fraction if carve_test else 0.0,
                seed,
            )
            carved = {k: [fixed["train"][i] for i in idx] for k, idx in parts.items() if idx or k == "train"}
            fixed = {**{k: v for k, v in fixed.items() if k != "train"}, **carved}
            for split in carved:
                if split != "train":
                    made[split] = (
                        f"carved from {data.train_origin} by {stratified if split == 'validation' else by_test}"
                    )
            made["train"] = f"{own}, less what was carved from it"
        fixed = {k: fixed[k] for k in ("train", "validation", "test") if k in fixed}
        splits = {s: [items[i] for i in rng.permutation(len(items))] for s, items in fixed.items()}
        return splits, made, used_val, used_test
    parts = split_three_ways([it.label for it in data.items], val_fraction, test_fraction, seed, test_seed)
    splits = {s: [data.items[i] for i in idx] for s, idx in parts.items() if s != "test" or test_fraction > 0}
    made = {
        "train": f"the rest after {by_test} and {stratified}" if test_fraction > 0 else f"the rest after {stratified}",
        "validation": f"{stratified} of what the test split left",
        "test": by_test,
    }
    for split, fraction in (("test", test_fraction), ("validation", val_fraction)):
        # (stacklevel 3: the warning names write_shards' caller)
        if fraction > 0 and not splits[split]:
            warnings.warn(empty_split(data.items, fraction, split), SplitWarning, stacklevel=3)
        elif fraction > 0 and len(splits[split]) < MIN_EVAL_IMAGES:
            warnings.warn(small_split(len(splits[split]), len(data.items), split), SmallSplitWarning, stacklevel=3)
    return splits, made, used_val, used_test
