"""Pretrain a ViT encoder with a registered objective (listed by --help-config) on webdataset shards.

    accelerate launch pretrain/main.py [--config FILE] [key=value ...] [--resume auto|PATH]

With no arguments: the embedded default (the ViT paper's masked patch prediction
on scikit-learn's digits, tiny ViT, a few minutes on a CPU). `objective=NAME` switches
the objective (any registered one). `--help-config` lists every key with the value
this command line would use.
"""

import sys

from vitmpp.common.cli import stage_main

main = stage_main(
    "pretrain/main.py",
    __doc__,
    schema="vitmpp.pretrain.config:PretrainConfig",
    command="vitmpp.pretrain.engine:command",
    epilog="Overrides are dotted keys, e.g. objective=mae train.steps=1000 optim.base_lr=1.5e-4.",
)

if __name__ == "__main__":
    main(sys.argv[1:])
