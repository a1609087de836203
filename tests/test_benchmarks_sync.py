"""No host-device synchronisation inside optimizer steps (issue 7), checked on the CPU.

`torch.cuda.set_sync_debug_mode` needs CUDA; `vitmpp.benchmarks.syncs` watches the
doors a sync goes through on any device (see its docstring). The first test shows
the counter sees each kind of sync, so the zero counts after it mean something.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vitmpp.benchmarks.syncs import count_host_syncs
from vitmpp.common.distributed import make_accelerator
from vitmpp.common.loop import StepRunner
from vitmpp.common.optim import NonFiniteGuard, build_optimizer, build_scheduler
from vitmpp.common.sections import OptimConfig
from vitmpp.datasets import normalize_batch
from vitmpp.models import create_encoder, create_objective

from engine_helpers import env


def test_counter_sees_every_kind_of_sync():
    x = torch.arange(6.0)
    cases = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.sum() > 0),
        "float": lambda: float(x.max()),
        "if": lambda: 1 if x.any() else 0,
        "tolist": lambda: x.tolist(),
        "numpy": lambda: x.numpy(),
        "cpu": lambda: x.cpu(),
        "mask": lambda: x[x > 2],
        "nonzero": lambda: torch.nonzero(x),
    }
    for name, fn in cases.items():
        with count_host_syncs() as counter:
            fn()
        assert counter.events, f"{name} was not seen"
    with count_host_syncs() as counter:  # work that stays on the device
        y = torch.argsort(torch.rand(4, 8), dim=1)
        torch.gather(torch.rand(4, 8), 1, y).mul_(2).add_(1).sum()
        torch.where(x > 2, x, -x)
    assert counter.events == []


def _runner(objective_name: str):
    torch.manual_seed(0)
    accelerator = make_accelerator(mixed_precision="no", log_with=None)
    options = {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2} if objective_name == "mae" else {}
    objective = create_objective(objective_name, create_encoder("vit_pico_patch4_16"), num_classes=10, **options)
    optim = OptimConfig(name="adamw", lr=1e-3, base_lr=None, clip_grad=1.0)
    optimizer = build_optimizer(objective, optim, 1e-3)
    scheduler = build_scheduler(optimizer, optim, total_steps=10, warmup=2)
    model, optimizer = accelerator.prepare(objective, optimizer)
    guard = NonFiniteGuard(accelerator, optimizer, max_consecutive=5)
    runner = StepRunner(accelerator, model, optimizer, scheduler, guard, accumulation=2, clip_grad=optim.clip_grad)
    mean, std = torch.tensor([0.5] * 3).view(1, 3, 1, 1), torch.tensor([0.25] * 3).view(1, 3, 1, 1)

    def forward(batch):  # as the engine's: uint8 -> device -> normalise -> objective
        images = normalize_batch(batch[0].to(accelerator.device, non_blocking=True), mean, std)
        output = model(images, batch[1].to(accelerator.device, non_blocking=True))
        return output.loss, output

    generator = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=generator),
            torch.randint(0, 10, (4,), generator=generator),
        )
        for _ in range(2)
    ]
    return runner, forward, batches, guard


@pytest.mark.parametrize("objective_name", ["mae", "mpp", "supervised"])
def test_step_runner_steps_make_no_host_sync(objective_name):
    runner, forward, batches, guard = _runner(objective_name)
    runner.run(0, forward, iter(batches))  # first step outside: lazy state (optimizer moments) is made here
    with count_host_syncs() as counter:
        for step in range(1, 4):  # accumulation 2, gradient clipping, finiteness agreement, fused AdamW
            loss, grad_norm, _ = runner.run(step, forward, iter(batches))
    assert counter.events == [], f"host syncs inside optimizer steps: {counter.events}"
    with count_host_syncs() as counter:  # the log interval reads the device values: that is where syncs belong
        guard.read()
        loss.tolist()
    assert len(counter.events) >= 2
    assert torch.isfinite(loss) and torch.isfinite(grad_norm)


@pytest.mark.slow
def test_training_loop_syncs_only_at_log_intervals(digits16, tmp_path):
    """The real pretrain/main.py: zero syncs from one optimizer step to the next; some at log intervals."""
    report_file = tmp_path / "syncs.json"
    overrides = [
        f"data.shards={digits16}",
        "objective=mae",
        "model.name=vit_pico_patch4_16",
        "model.img_size=16",
        "mae.decoder_embed_dim=32",
        "mae.decoder_depth=1",
        "mae.decoder_num_heads=2",
        "train.global_batch=16",
        "train.steps=8",
        "data.num_workers=0",
        "optim.warmup_steps=2",
        "log.log_every=4",
        "log.image_every=4",
        "log.checkpoint_every=6",
        f"run.output_dir={tmp_path / 'runs'}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "vitmpp.benchmarks.syncs", "--out", str(report_file), "--", *overrides],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report_file.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert report["steps"] == 8
    assert report["syncs_in_steps"] == 0, report["in_steps"]
    assert report["syncs_at_log_intervals"] > 0  # the loss read-back at each interval was seen
    assert result.returncode == 0, result.stderr[-3000:]
