"""FSDP2 (configs/accelerate/fsdp.yaml) on two CPU processes over gloo: the run really shards, a
SIGKILL mid-run resumes exactly from the sharded checkpoint, the export is one full file equal to
DDP's, and a launch that asks for FSDP never trains with DDP instead (docs/distributed.md, "FSDP")."""

from __future__ import annotations

import hashlib
import os
import signal
import sys

import pytest

from engine_helpers import (
    ROOT,
    TINY,
    accelerate_cmd,
    encoder_weights,
    kill_tree,
    last_logged_step,
    metrics,
    run,
    start,
    wait_for,
)

pytestmark = pytest.mark.slow

FSDP_CONFIG = str(ROOT / "configs" / "accelerate" / "fsdp.yaml")
STEPS = 6
COMMON = TINY + [f"train.steps={STEPS}", "log.checkpoint_every=2", "log.keep_checkpoints=5"]
# A resumed FSDP run restores every shard bit for bit (torch.distributed.checkpoint) and the RNGs, so
# its losses are those of the uninterrupted run; the bound only absorbs JSON's float round trip.
RESUME_LOSS_TOLERANCE = 1e-6
# FSDP and DDP compute the same gradients but reduce them differently (FSDP2: a reduce-scatter of
# each parameter's dim-0 shards, then AdamW on the shards; DDP: an all-reduce of gradient buckets, then
# AdamW on whole tensors). Measured on these 6 steps: max |FSDP - DDP| = 0.0 for every encoder weight
# and every loss, as expected with two ranks (each gradient element is the sum of two terms, and a + b
# == b + a in IEEE arithmetic). The bound leaves room for reductions over more terms (more ranks, other
# kernels), which reorder float32 sums and differ in the last bits (~1e-7 relative), yet stays 1000x
# below one step's update at lr 1e-3, which a shard left unreduced or a stale parameter would show.
FSDP_VS_DDP_TOLERANCE = 1e-6


def port(offset: int) -> str:
    return str(29500 + os.getpid() % 1000 + offset)


def fsdp_cmd(offset: int, *, use_fsdp: bool = True) -> list[str]:
    """What a user types: the project's launcher, fsdp.yaml, overridden for two CPU processes."""
    cmd = [sys.executable, "-m", "vitmpp.common.launcher"] + (["--use_fsdp"] if use_fsdp else [])
    return cmd + [
        "--config_file",
        FSDP_CONFIG,
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        port(offset),
        str(ROOT / "pretrain" / "main.py"),
    ]


def ddp_cmd(offset: int) -> list[str]:
    cmd = accelerate_cmd("pretrain/main.py", processes=2)
    cmd[cmd.index("--main_process_port") + 1] = port(offset)
    return cmd


def assert_sharded(checkpoint):
    """Accelerate's sharded FSDP layout: one torch.distributed.checkpoint folder for the model and one
    for the optimizer, a `.distcp` file per rank in each; no full-model file."""
    assert not (checkpoint / "model.safetensors").exists() and not (checkpoint / "optimizer.bin").exists()
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        names = sorted(p.name for p in (checkpoint / folder).iterdir())
        assert names == [".metadata", "__0_0.distcp", "__1_0.distcp"], (folder, names)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits16):
    """An uninterrupted FSDP run and the same run with DDP (6 steps each, two processes)."""
    root = tmp_path_factory.mktemp("fsdp")
    data = [f"data.shards={digits16}"]
    fsdp = run(fsdp_cmd(101) + COMMON + data + ["run.name=fsdp"], cwd=root)
    run(ddp_cmd(102) + COMMON + data + ["run.name=ddp"], cwd=root)
    return root, fsdp.stdout


def test_fsdp_shards_on_cpu(runs):
    root, stdout = runs
    run_dir = root / "runs" / "fsdp"
    # every parameter of the prepared model is a DTensor holding about half its elements on rank 0
    line = next(line for line in stdout.splitlines() if line.startswith("FSDP2: "))
    held, total = (int(n.replace(",", "")) for n in line.split(" holds ")[1].split(" elements")[0].split(" of their "))
    assert "sharded over 2 processes" in line and 0.45 * total < held < 0.55 * total, line  # dim-0 shards: ~half
    for step in (2, 4, 6):
        assert_sharded(run_dir / "checkpoints" / f"step-{step:07d}")
    # the export is one full file on the main process, with the full shapes
    assert sorted(p.name for p in run_dir.glob("encoder*")) == ["encoder.json", "encoder.safetensors"]
    assert (run_dir / "transformers" / "model.safetensors").is_file() and (run_dir / "README.md").is_file()


def test_fsdp_export_equals_ddp(runs):
    root, _ = runs
    fsdp, ddp = encoder_weights(root / "runs" / "fsdp"), encoder_weights(root / "runs" / "ddp")
    assert fsdp.keys() == ddp.keys()
    assert all(fsdp[k].shape == ddp[k].shape for k in fsdp)
    diff = max(float((fsdp[k].double() - ddp[k].double()).abs().max()) for k in fsdp)
    assert diff < FSDP_VS_DDP_TOLERANCE, diff
    losses = [(a["loss"], b["loss"]) for a, b in zip(metrics(root / "runs" / "fsdp"), metrics(root / "runs" / "ddp"))]
    assert all(a == pytest.approx(b, abs=FSDP_VS_DDP_TOLERANCE) for a, b in losses), losses


@pytest.mark.fault("SIGKILL to every process of a 2-process FSDP run, then --resume auto", expect="survived")
def test_fsdp_kill_9_then_resume_is_exact(tmp_path, runs, digits16):
    root, _ = runs
    run_dir = tmp_path / "runs" / "killed"
    args = COMMON + [f"data.shards={digits16}", "run.name=killed"]
    proc = start(fsdp_cmd(103) + args + ["debug.step_delay_s=0.3"], cwd=tmp_path)
    try:  # after the checkpoint of step 2 is complete and step 3 was logged: mid-run, between checkpoints
        wait_for(
            lambda: (
                (run_dir / "checkpoints" / "step-0000002" / "trainer_state.json").is_file()
                and last_logged_step(run_dir) >= 3
            ),
            240,
            proc,
        )
    finally:
        kill_tree(proc, signal.SIGKILL)
        proc.communicate()
    assert not (run_dir / "encoder.safetensors").exists()
    resumed = run(fsdp_cmd(104) + args + ["--resume", "auto"], cwd=tmp_path)
    assert "resumed from" in resumed.stdout and "FSDP2: " in resumed.stdout
    straight, again = metrics(root / "runs" / "fsdp"), metrics(run_dir)
    assert [r["step"] for r in again] == list(range(1, STEPS + 1))
    for a, b in zip(straight, again):
        assert a["loss"] == pytest.approx(b["loss"], abs=RESUME_LOSS_TOLERANCE), (a, b)
    ours, theirs = encoder_weights(run_dir), encoder_weights(root / "runs" / "fsdp")
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) == 0.0


def test_sharded_checkpoint_is_verified_file_by_file(runs, tmp_path):
    """Every rank's shard and the `.metadata` of each folder are in the checksums; a flipped byte
    or a lost shard is found, and the damaged checkpoint can be set aside."""
    import shutil

    from vitmpp.common.checkpoint import FILES_KEY, damage, read_state, set_aside

    root, _ = runs
    checkpoint = tmp_path / "step-0000006"
    shutil.copytree(root / "runs" / "fsdp" / "checkpoints" / "step-0000006", checkpoint)
    recorded = read_state(checkpoint)[FILES_KEY]
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
            entry = recorded[f"{folder}/{name}"]
            data = (checkpoint / folder / name).read_bytes()
            assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert damage(checkpoint) is None
    shard = checkpoint / "pytorch_model_fsdp_0" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "pytorch_model_fsdp_0/__1_0.distcp does not match" in damage(checkpoint)
    shard.unlink()
    assert damage(checkpoint) == "pytorch_model_fsdp_0/__1_0.distcp is missing"
    assert set_aside(checkpoint).name == "step-0000006.damaged"


def test_fsdp_config_alone_shards_on_cpu_and_draws_the_pictures_it_can(tmp_path, digits16):
    """`--config_file fsdp.yaml` without --use_fsdp, as a user types it: the launcher leaves the choice
    to the config (it adds --multi_gpu only for configs that choose no launcher), so the run shards;
    the objective's pictures are drawn, the analysis figures (which need the whole encoder) are not."""
    result = run(
        fsdp_cmd(105, use_fsdp=False)
        + TINY
        + ["train.steps=2", f"data.shards={digits16}", "run.name=asked", "log.image_every=1", "log.analysis_every=1"],
        cwd=tmp_path,
    )
    assert "FSDP2: " in result.stdout and "no analysis figures in TensorBoard under FSDP" in result.stdout
    assert "no online evaluation under FSDP" in result.stdout  # the embedded default's eval.every is skipped too
    assert_sharded(tmp_path / "runs" / "asked" / "checkpoints" / "step-0000002")


@pytest.mark.parametrize(
    "env, why",
    [
        ({"FSDP_VERSION": "1", "WORLD_SIZE": "2"}, "only FSDP2 (fully_shard) is supported on CPU processes"),
        ({"FSDP_VERSION": "2", "WORLD_SIZE": "1"}, "one process: there is nothing to shard across"),
    ],
)
def test_cpu_fsdp_that_cannot_shard_is_refused(monkeypatch, env, why):
    from vitmpp.common.distributed import fsdp_request, refuse_cpu_fsdp_unless_possible
    from vitmpp.common.errors import UserError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    asked = fsdp_request()
    assert asked == f"fsdp_version {env['FSDP_VERSION']}"
    with pytest.raises(UserError, match="FSDP cannot run in this launch") as refused:
        refuse_cpu_fsdp_unless_possible(asked)
    assert why in str(refused.value) and "use DDP on CPU" in str(refused.value)
