"""Evaluate a pretrained encoder with a protocol: linear probe, full fine-tuning, scratch, or kNN.

    accelerate launch finetune/main.py [--config FILE] [encoder=PATH] [key=value ...] [--resume auto]

With no arguments: a linear probe of the default pretraining run's encoder
(runs/default-mpp) on the embedded digits data.
"""

import sys

from vitmpp.common.cli import stage_main

main = stage_main(
    "finetune/main.py",
    __doc__,
    schema="vitmpp.finetune.config:FinetuneConfig",
    command="vitmpp.finetune.engine:command",
    epilog="Overrides are dotted keys, e.g. protocol=finetune encoder=runs/mae_digits data.label_fraction=0.1.",
)

if __name__ == "__main__":
    main(sys.argv[1:])
