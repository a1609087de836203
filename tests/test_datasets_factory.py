"""Data config -> loader (datasets/factory.py): loader kinds are registered, a bad data key fails when the
config is read or the stage sets up, and a kind registered from outside vitmpp trains."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from engine_helpers import TINY, metrics, run
from vitmpp.common.config import load_config
from vitmpp.common.errors import ConfigError
from vitmpp.datasets import LoaderFactory, LoaderSpec, pretrain_transform, read_manifest
from vitmpp.pretrain.config import PretrainConfig

# a module of the test's own: registers the kind `counted` (the shard loader, each epoch it opens noted)
# and runs pretraining, whose config may then name it
COUNTED_KIND = """
import sys
from pathlib import Path

from vitmpp.datasets import open_loader, register_loader_kind

opened = Path(sys.argv[1])


def open_counted(spec, *, epoch, start_batch, **options):
    with opened.open("a") as out:
        out.write(f"{epoch} {start_batch} {spec.batches_per_epoch}\\n")
    return open_loader(spec, epoch=epoch, start_batch=start_batch, **options)


register_loader_kind("counted", open_counted)

from vitmpp.pretrain.main import main  # noqa: E402 - after the kind is registered

main(sys.argv[2:])
"""


def test_a_loader_kind_registered_outside_vitmpp_trains(tmp_path, digits16):
    (tmp_path / "counted_kind.py").write_text(textwrap.dedent(COUNTED_KIND))
    opened = tmp_path / "opened.txt"
    run(
        [sys.executable, str(tmp_path / "counted_kind.py"), str(opened)]
        + TINY
        + ["train.steps=3", f"data.shards={digits16}", "data.loader=counted"],
        cwd=tmp_path,
    )
    epoch, start_batch, batches = (int(v) for v in opened.read_text().split())
    assert (epoch, start_batch) == (0, 0) and batches >= 3
    assert [row["step"] for row in metrics(tmp_path / "runs" / "default-mpp")] == [1, 2, 3]


def test_an_unknown_loader_kind_fails_when_the_config_is_read():
    with pytest.raises(
        ConfigError, match="Key 'data.loader' is 'shard', not a registered loader kind; did you mean 'shards'?"
    ):
        load_config(PretrainConfig, None, ["data.loader=shard"])


def test_data_keys_this_run_cannot_serve_fail_when_the_factory_is_built(digits16):
    spec = LoaderSpec(
        shards=str(digits16),
        manifest=read_manifest(digits16),
        batch_size=6,
        transform=pretrain_transform(16),
        training=True,
    )
    cpu = torch.device("cpu")
    gpu_decode = load_config(PretrainConfig, None, ["data.augment_on=device", "data.decode=gpu"]).data
    with pytest.raises(ConfigError, match="Key 'data.decode' is 'gpu', but this run has no CUDA device"):
        LoaderFactory.for_run(gpu_decode, spec, cpu)
    views = load_config(PretrainConfig, None, ["data.views_per_image=4"]).data
    with pytest.raises(
        ConfigError, match="'data.views_per_image' is 4, which does not divide the per-process batch of 6"
    ):
        LoaderFactory.for_run(views, spec, cpu)
    factory = LoaderFactory.for_run(load_config(PretrainConfig, None, ["data.views_per_image=2"]).data, spec, cpu)
    assert factory.epoch_spec(batches_per_epoch=3).views_per_image == 2 and factory.kind == "shards"
