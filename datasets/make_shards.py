"""`python -m vitmpp.datasets.make_shards`: the command line of the shard writer (datasets/writer.py,
whose docstring says what is written and how).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from vitmpp.common.errors import cli_entry

from .manifest import MANIFEST_NAME
from .sources import SOURCES
from .splits import SmallSplitWarning, SplitWarning
from .writer import DEFAULT_MAXCOUNT, DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION, FORMATS, write_shards


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vitmpp.datasets.make_shards",
        description="Write images as webdataset shards with an _info.json manifest (train, validation, test splits).",
    )
    p.add_argument("--source", required=True, choices=list(SOURCES), help="where the images come from")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--root", help="input folder: the class-per-folder tree (imagefolder) or the torchvision data root")
    p.add_argument("--dataset", help="torchvision data set class (source torchvision), e.g. CIFAR10")
    p.add_argument("--format", default="png", choices=FORMATS, help="image encoding in the shards (default png)")
    p.add_argument("--max-size", type=int, help="downscale images whose shorter side exceeds this many pixels")
    p.add_argument("--maxcount", type=int, default=DEFAULT_MAXCOUNT, help="samples per shard (default 1000)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help="fraction of every class put in the validation split (default 0.1)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help=f"fraction of every class put in the test split (default {DEFAULT_TEST_FRACTION}; digits: a fixed "
        f"{SOURCES['digits'].test_fraction}, the same for every --seed)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the splits, the write order and synthetic images")
    p.add_argument("--overwrite", action="store_true", help="replace the shards in an existing --out folder")
    p.add_argument("--image-size", type=int, help="side of digits/mnist5k/synthetic images in pixels (default 32)")
    p.add_argument("--count", type=int, help="number of synthetic images (default 1000)")
    p.add_argument("--num-classes", type=int, help="number of synthetic classes (default 10)")
    p.add_argument("--name", help="data set name, the prefix of every shard (default: from the source)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SplitWarning)
        warnings.simplefilter("always", SmallSplitWarning)
        manifest = write_shards(
            args.out,
            args.source,
            fmt=args.format,
            max_size=args.max_size,
            maxcount=args.maxcount,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
            overwrite=args.overwrite,
            name=args.name,
            progress=not args.quiet,
            # the source's own options (None: not given, its default)
            root=args.root,
            dataset=args.dataset,
            image_size=args.image_size,
            count=args.count,
            num_classes=args.num_classes,
        )
    for w in caught:  # ours as one line, like an error; anything else as Python shows it
        if issubclass(w.category, (SplitWarning, SmallSplitWarning)):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    counts = ", ".join(
        f"{info.num_samples} {split} ({len(info.filenames)} shards)" for split, info in manifest.splits.items()
    )
    skipped = manifest.extra["vitmpp"]["skipped_inputs"]
    first = f"e.g. {skipped[0]['path']}: {skipped[0]['reason']}; " if skipped else ""
    note = f"; {len(skipped)} inputs skipped ({first}all listed in {MANIFEST_NAME})" if skipped else ""
    print(f"wrote {manifest.name}: {counts}, {manifest.num_classes} classes to {manifest.base}{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
