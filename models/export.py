"""The export command line: a pretraining run's encoder for Hugging Face `transformers`, and its
model card, for any run or export folder (a pretraining run writes both at its end)::

    python -m vitmpp.models.export RUN --to transformers OUT   # AutoModel.from_pretrained(OUT) loads it
    python -m vitmpp.models.export RUN --card                  # RUN/README.md again from RUN's records

The weights files are vitmpp.models.weights' (`encoder.safetensors` + `encoder.json`), the
transformers folder and the card vitmpp.models.hub's; this module sits above both.
"""

from __future__ import annotations

from pathlib import Path

from vitmpp.common.errors import UserError, cli_entry
from vitmpp.common.io import reported_writes

from .hub import export_transformers, source_encoder, write_card

# ----------------------------------------------------------------------------- command line


@cli_entry
def main(argv: list[str] | None = None) -> list[Path]:
    """`python -m vitmpp.models.export RUN --to transformers OUT` / `RUN --card`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m vitmpp.models.export",
        description="Export a pretrained encoder (a pretraining run folder or an encoder export) for Hugging Face "
        "transformers, or regenerate its model card (README.md).",
    )
    parser.add_argument(
        "run", metavar="RUN", help="pretraining run folder, encoder export folder or encoder.safetensors"
    )
    parser.add_argument(
        "--to",
        choices=("transformers",),
        help="write a transformers folder (ViTModel + image processor + model card) to OUT",
    )
    parser.add_argument("out", metavar="OUT", nargs="?", help="the folder --to writes (replaced if it is an export)")
    parser.add_argument("--card", action="store_true", help="regenerate RUN's model card README.md from its records")
    args = parser.parse_intermixed_args(argv)
    if not args.to and not args.card:
        parser.error("nothing to do: pass --to transformers OUT, --card, or both")
    if args.to and not args.out:
        parser.error("--to transformers needs the output folder OUT")
    if args.out and not args.to:
        parser.error(f"{args.out!r}: an output folder goes with --to transformers")
    folder, info = source_encoder(args.run)
    written: list[Path] = []
    if args.to:
        written.append(export_transformers(args.run, args.out))
        print(f"wrote {args.out}: AutoModel.from_pretrained({str(args.out)!r}) loads it")
    if args.card:
        advice = "nothing else was changed"
        with reported_writes(f"the model card in {folder}", advice, folder):
            try:
                cards = write_card(folder, info=info)
            except PermissionError as err:
                raise UserError(
                    f"Could not write the model card in {folder} ({err.strerror}); copy the folder somewhere writable."
                ) from None
        written += cards
        print("wrote " + ", ".join(str(p) for p in cards))
    return written


if __name__ == "__main__":
    main()
