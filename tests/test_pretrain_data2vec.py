"""data2vec through the real pretraining command on CPU: a stopped and resumed run continues exactly,
EMA teacher included; a run grows from one process to two (elastic resume); FSDP2 trains it as DDP does."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from engine_helpers import ROOT, TINY, accelerate_cmd, encoder_weights, max_weight_difference, metrics, python_cmd, run

pytestmark = pytest.mark.slow

STEPS, STOP = 6, 3
# tau far from 1, so a teacher lost or re-copied on resume changes the next targets visibly
DATA2VEC = [
    "objective=data2vec",
    "data2vec.top_k_blocks=2",
    "data2vec.min_block_patches=2",
    "data2vec.ema_start=0.5",
    "data2vec.ema_end=0.9",
    "eval.every=0",
]
# elastic runs sum two logical ranks' gradients in another order: float32 differs in the last bits
# (tests/distributed/test_elastic_resume.py); one AdamW step at lr 1e-3 moves the loss by ~1e-2
ELASTIC_TOLERANCE = 1e-5


def checkpoint_state(run_dir, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:07d}" / "model.safetensors"))


def teacher_and_student(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    teacher = {k[len("teacher.") :]: v for k, v in state.items() if k.startswith("teacher.")}
    student = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    assert teacher.keys() == student.keys() and teacher
    return teacher, student


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_data2vec_resumes_exactly_teacher_included(tmp_path, digits16):
    common = TINY + DATA2VEC + [f"train.steps={STEPS}", f"data.shards={digits16}", "log.checkpoint_every=3"]
    run(python_cmd("pretrain/main.py") + common + ["run.name=straight"], cwd=tmp_path)
    first = run(
        python_cmd("pretrain/main.py") + common + ["run.name=resumed", f"debug.stop_at_step={STOP}"], cwd=tmp_path
    )
    assert f"stopped by debug.stop_at_step at step {STOP}" in first.stdout
    run(python_cmd("pretrain/main.py") + common + ["run.name=resumed", "--resume", "auto"], cwd=tmp_path)
    straight, resumed = tmp_path / "runs" / "straight", tmp_path / "runs" / "resumed"
    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6), (x, y)
    assert max_weight_difference(straight, resumed) < 1e-6
    teacher, student = teacher_and_student(checkpoint_state(straight, STEPS))
    teacher_resumed, _ = teacher_and_student(checkpoint_state(resumed, STEPS))
    assert max_difference(teacher, teacher_resumed) < 1e-6
    assert max_difference(teacher, student) > 1e-4  # the teacher is its own network, not a copy of the student
    # the export is the student
    exported = encoder_weights(straight)
    assert exported.keys() == student.keys() and max_difference(exported, student) == 0.0


def launch(processes: int, offset: int) -> list[str]:
    cmd = accelerate_cmd("pretrain/main.py", processes=processes)
    if processes > 1:
        cmd[cmd.index("--main_process_port") + 1] = str(29500 + (os.getpid() + 41 * offset) % 1000)
    return cmd


def test_data2vec_grows_from_one_process_to_two_with_the_losses_of_two(tmp_path, digits16):
    """Started on one process hosting two logical ranks, stopped, resumed on two processes: the losses
    and weights (teacher included) of a run on two processes from the start."""
    steps, stop = 4, 2
    common = (
        TINY
        + DATA2VEC
        + [f"train.steps={steps}", f"data.shards={digits16}", "train.logical_ranks=2", "data.num_workers=1"]
    )
    run(launch(2, 0) + common + ["run.name=two"], cwd=tmp_path)
    stopped = run(launch(1, 1) + common + ["run.name=grown", f"debug.stop_at_step={stop}"], cwd=tmp_path)
    assert "1 process(es) x 2 logical ranks" in stopped.stdout
    resumed = run(launch(2, 2) + common + ["run.name=grown", "--resume", "auto"], cwd=tmp_path)
    assert f"step-{stop:07d}" in resumed.stdout
    two, grown = tmp_path / "runs" / "two", tmp_path / "runs" / "grown"
    a, b = metrics(two), metrics(grown)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= ELASTIC_TOLERANCE, (a, b)
    assert max_weight_difference(two, grown) <= ELASTIC_TOLERANCE
    teacher_two, _ = teacher_and_student(checkpoint_state(two, steps))
    teacher_grown, _ = teacher_and_student(checkpoint_state(grown, steps))
    assert max_difference(teacher_two, teacher_grown) <= ELASTIC_TOLERANCE


def fsdp_cmd(offset: int) -> list[str]:
    """FSDP2 on two CPU processes, as tests/distributed/test_fsdp.py launches it."""
    return [
        sys.executable,
        "-m",
        "vitmpp.common.launcher",
        "--use_fsdp",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "fsdp.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(29500 + (os.getpid() + 43 * offset) % 1000),
        str(ROOT / "pretrain" / "main.py"),
    ]


def test_data2vec_under_fsdp_trains_as_ddp_and_resumes_exactly_from_its_sharded_teacher(tmp_path, digits16):
    """The teacher is sharded like the student (its EMA update runs shard by shard), a sharded checkpoint
    holds it, and the losses and export are DDP's; a stopped FSDP run resumes with the same losses."""
    from torch.distributed.checkpoint import FileSystemReader

    steps, stop = 4, 2
    common = TINY + DATA2VEC + [f"train.steps={steps}", f"data.shards={digits16}", "log.checkpoint_every=2"]
    fsdp = run(fsdp_cmd(0) + common + ["run.name=fsdp"], cwd=tmp_path)
    assert "FSDP2: 63 of 63 parameter tensors sharded over 2 processes" in fsdp.stdout  # student, teacher, head, token
    run(launch(2, 3) + common + ["run.name=ddp"], cwd=tmp_path)
    stopped = run(fsdp_cmd(1) + common + ["run.name=resumed", f"debug.stop_at_step={stop}"], cwd=tmp_path)
    assert f"stopped by debug.stop_at_step at step {stop}" in stopped.stdout
    run(fsdp_cmd(2) + common + ["run.name=resumed", "--resume", "auto"], cwd=tmp_path)
    runs = tmp_path / "runs"
    keys = (
        FileSystemReader(str(runs / "fsdp" / "checkpoints" / f"step-{stop:07d}" / "pytorch_model_fsdp_0"))
        .read_metadata()
        .state_dict_metadata
    )
    assert sum(k.startswith("model.teacher.") for k in keys) == sum(k.startswith("model.encoder.") for k in keys) > 0
    reference = metrics(runs / "fsdp")
    for other in ("ddp", "resumed"):
        rows = metrics(runs / other)
        assert [r["step"] for r in rows] == list(range(1, steps + 1))
        assert max(abs(x["loss"] - y["loss"]) for x, y in zip(reference, rows)) <= 1e-6, (other, reference, rows)
        assert max_weight_difference(runs / "fsdp", runs / other) <= 1e-6
