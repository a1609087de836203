"""The loader under a real process group: two processes (gloo) with two workers each."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.data.transforms import MaybePILToTensor

from datasets_helpers import write_tiny_shards
from vitmpp.datasets import LoaderSpec, open_loader, read_manifest


def _rank_main(rank: int, world: int, root: str, store: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        mine = {}
        manifest = read_manifest(root)
        for training in (False, True):
            spec = LoaderSpec(
                shards=root,
                manifest=manifest,
                split="train",
                batch_size=4,
                transform=MaybePILToTensor(),
                training=training,
                rank=dist.get_rank(),
                world_size=dist.get_world_size(),
                num_workers=2,
                seed=3,
            )
            loader = open_loader(spec)
            steps = 0
            indices = []
            for batch in loader:
                # what an engine does every step: a collective, which hangs if one rank has run dry
                dist.all_reduce(torch.ones(1))
                steps += 1
                indices += batch.indices.tolist()
            mine[training] = (steps, indices)
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            torch.save(gathered, results)
    finally:
        dist.destroy_process_group()


def test_two_processes_see_every_sample_once_with_equal_steps(tmp_path):
    write_tiny_shards(tmp_path / "data", [10, 10, 50])  # uneven, and fewer shards than 2 ranks x 2 workers
    results = tmp_path / "results.pt"
    ctx = mp.start_processes(
        _rank_main,
        args=(2, str(tmp_path / "data"), str(tmp_path / "store"), str(results)),
        nprocs=2,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail("the two ranks did not finish within 120 s (a hang)")
    gathered = torch.load(results, weights_only=True)
    eval_steps = {g[False][0] for g in gathered}
    train_steps = {g[True][0] for g in gathered}
    assert len(eval_steps) == 1 and len(train_steps) == 1 and train_steps == {70 // 8}
    seen = sorted(i for g in gathered for i in g[False][1] if i >= 0)
    assert seen == list(range(70))
