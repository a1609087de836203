"""The pretraining entry point end to end: default run, objectives, two processes,
accumulation, exact resume, non-finite steps, TensorBoard, run-folder safety."""

from __future__ import annotations

import json

import pytest

from engine_helpers import ROOT, TINY, accelerate_cmd, max_weight_difference, metrics, python_cmd, run
from vitmpp.models.objective import objective_names

pytestmark = pytest.mark.slow


def tensorboard_events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = [p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")]
    accumulators = []
    for folder in set(folders):
        acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
        acc.Reload()
        accumulators.append(acc)
    return accumulators


def test_default_command_runs_end_to_end(tmp_path):
    """README's `accelerate launch pretrain/main.py`, with only the step count shortened."""
    result = run(
        accelerate_cmd("pretrain/main.py")
        + ["train.steps=4", "log.log_every=2", "log.image_every=2", "log.analysis_every=4", "log.checkpoint_every=2"],
        cwd=tmp_path,
        cache=tmp_path / "cache",
    )
    run_dir = tmp_path / "runs" / "default-mpp"
    assert f"tensorboard --logdir {run_dir.relative_to(tmp_path)}" in result.stdout
    assert (tmp_path / "cache" / "digits-32px" / "_info.json").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step-0000002", "step-0000004"]
    info = json.loads((run_dir / "encoder.json").read_text())
    assert info["objective"] == "mpp" and info["step"] == 4
    assert [row["step"] for row in metrics(run_dir)] == [1, 2, 3, 4]

    tags, images, image_tags = set(), 0, set()
    for acc in tensorboard_events(run_dir):
        tags |= set(acc.Tags()["scalars"])
        image_tags |= set(acc.Tags()["images"])
        images += sum(len(acc.Images(t)) for t in acc.Tags()["images"])
    assert {
        "pretrain_encoder/attention_distance",
        "pretrain_encoder/attention_rollout",
        "pretrain_encoder/patch_filters",
        "pretrain_encoder/position_similarity",
        "pretrain_batch/mpp",
    } <= image_tags
    expected = {
        "pretrain/loss",
        "pretrain/lr",
        "system/pretrain/grad_norm",
        "system/pretrain/images_per_sec",
        "system/pretrain/data_wait_fraction",
        "system/pretrain/skipped_samples",
        "system/pretrain/epoch",
        "system/pretrain/nonfinite_steps",
    }
    assert expected <= tags
    assert images >= 1

    # the last lines say what to run next, and the commands they print are valid as printed
    last = result.stdout.strip().splitlines()[-2:]
    assert last[0] == "next, a linear probe:  ./launch.sh finetune encoder=runs/default-mpp"
    assert last[1].startswith(
        "or the comparison:     python -m vitmpp.experiments.compare --config configs/compare/digits.yaml"
    )
    import shlex

    from vitmpp.common.config import load_config
    from vitmpp.experiments.grid import CompareConfig
    from vitmpp.finetune.main import main as finetune_main

    finetune_main(shlex.split(last[0].split("./launch.sh finetune", 1)[1]) + ["--print-config"])
    words = shlex.split(last[1].split("python -m vitmpp.experiments.compare", 1)[1])
    compare = load_config(CompareConfig, ROOT / words[1], words[2:])
    assert compare.encoders == {"mpp": "runs/default-mpp", "random": "random"} and compare.pretraining.recipes == {}


@pytest.mark.parametrize("objective", [name for name in objective_names() if name != "mpp"])
def test_other_objectives(tmp_path, digits16, objective):
    run(
        python_cmd("pretrain/main.py") + TINY + [f"objective={objective}", "train.steps=2", f"data.shards={digits16}"],
        cwd=tmp_path,
    )
    info = json.loads((tmp_path / "runs" / f"default-{objective}" / "encoder.json").read_text())
    assert info["objective"] == objective


def test_two_processes_read_disjoint_samples_and_agree(tmp_path, digits16):
    overrides = TINY + ["train.steps=4", f"data.shards={digits16}", "debug.record_samples=true", "data.num_workers=2"]
    result = run(accelerate_cmd("pretrain/main.py", processes=2) + overrides, cwd=tmp_path)
    assert "2 process(es)" in result.stdout
    run_dir = tmp_path / "runs" / "default-mpp"
    ranks = [json.loads((run_dir / f"debug-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    seen = [set(r["samples"]) - {-1} for r in ranks]
    assert len(ranks[0]["samples"]) == len(ranks[1]["samples"]) == 4 * 16
    assert seen[0] and seen[1] and not (seen[0] & seen[1]), "the two ranks read the same samples"
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]


def test_accumulation_matches_the_large_batch(tmp_path, digits16):
    """1 process x 2 micro-batches of 16 == one batch of 32 (deterministic: no crops, no flips)."""
    common = TINY + [
        "objective=supervised",
        "train.steps=3",
        f"data.shards={digits16}",
        "data.crop_scale=[1.0,1.0]",
        "data.hflip=0.0",
        "train.global_batch=32",
    ]
    accumulated = run(
        python_cmd("pretrain/main.py") + common + ["train.per_device_batch=16", "run.name=accumulated"], cwd=tmp_path
    )
    large = run(python_cmd("pretrain/main.py") + common + ["run.name=large"], cwd=tmp_path)
    a, b = tmp_path / "runs" / "accumulated", tmp_path / "runs" / "large"
    # per_device_batch is honoured: 16 images x 2 micro-batches, not one batch of 32
    assert "1 process(es) x 16 images x 2 accumulation = global batch 32" in accumulated.stdout
    assert "1 process(es) x 32 images x 1 accumulation = global batch 32" in large.stdout
    state = json.loads((a / "checkpoints" / "step-0000003" / "trainer_state.json").read_text())
    assert (state["per_device_batch"], state["accumulation"], state["global_batch"]) == (16, 2, 32)
    losses_a, losses_b = [r["loss"] for r in metrics(a)], [r["loss"] for r in metrics(b)]
    assert losses_a == pytest.approx(losses_b, abs=1e-5)
    assert max_weight_difference(a, b) < 1e-5


def test_exact_resume_after_stop(tmp_path, digits16):
    """Run 6 steps; separately stop at 3 and --resume auto: steps 4..6 and the weights match."""
    common = TINY + ["train.steps=6", f"data.shards={digits16}", "data.num_workers=2", "log.checkpoint_every=2"]
    run(python_cmd("pretrain/main.py") + common + ["run.name=straight"], cwd=tmp_path)
    first = run(python_cmd("pretrain/main.py") + common + ["run.name=resumed", "debug.stop_at_step=3"], cwd=tmp_path)
    assert "stopped by debug.stop_at_step at step 3" in first.stdout
    resumed = tmp_path / "runs" / "resumed"
    assert not (resumed / "encoder.safetensors").exists()
    # leftovers of crashed saves must be ignored by --resume auto
    (resumed / "checkpoints" / "step-0000005").mkdir()
    (resumed / "checkpoints" / ".step-0000004.partial").mkdir()
    second = run(python_cmd("pretrain/main.py") + common + ["run.name=resumed", "--resume", "auto"], cwd=tmp_path)
    assert "resumed from" in second.stdout and "step-0000003" in second.stdout
    straight = metrics(tmp_path / "runs" / "straight")
    again = metrics(resumed)
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, again):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)
    assert max_weight_difference(tmp_path / "runs" / "straight", resumed) < 1e-6
    # TensorBoard shows every step once: the first attempt logged steps 1..3, the resumed one 4..6
    steps = [
        e.step
        for acc in tensorboard_events(resumed)
        if "pretrain/loss" in acc.Tags()["scalars"]
        for e in acc.Scalars("pretrain/loss")
    ]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]


def test_nonfinite_step_is_skipped_and_a_streak_stops(tmp_path, digits16):
    common = TINY + ["train.steps=5", f"data.shards={digits16}", "train.max_nonfinite_steps=3"]
    run(python_cmd("pretrain/main.py") + common + ["run.name=once", "debug.inject_nonfinite_steps=[2]"], cwd=tmp_path)
    rows = metrics(tmp_path / "runs" / "once")
    assert rows[1]["loss"] is None and all(r["loss"] is not None for i, r in enumerate(rows) if i != 1)
    assert (tmp_path / "runs" / "once" / "encoder.safetensors").is_file()

    result = run(
        python_cmd("pretrain/main.py")
        + common
        + ["run.name=streak", "debug.inject_nonfinite_steps=[2,3,4]", "log.checkpoint_every=1"],
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert "not finite for 3 consecutive steps" in result.stderr
    assert "step-0000001" in result.stderr  # the last good checkpoint is named
    assert (tmp_path / "runs" / "streak" / "checkpoints" / "step-0000001").is_dir()


def test_config_errors_exit_2_with_one_line(tmp_path):
    result = run(python_cmd("pretrain/main.py") + ["optim.lrr=1"], cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "error: Unknown key 'optim.lrr' in the override 'optim.lrr=1'; did you mean 'optim.lr'?"
    )


def test_launch_sh_dry_run_for_two_slurm_nodes(tmp_path):
    import subprocess

    env = {
        "PATH": "/usr/bin:/bin",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "VITMPP_GPUS_PER_NODE": "8",
        "MASTER_PORT": "29600",
    }
    out = subprocess.run(
        [
            str(ROOT / "launch.sh"),
            "--dry-run",
            "pretrain",
            "configs/pretrain/mae_vit_b16.yaml",
            "data.shards=/data/in1k",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("python -m vitmpp.common.launcher ")
    for flag in (
        "--num_processes 16",
        "--multi_gpu",
        "--num_machines 2",
        "--machine_rank 1",
        "--main_process_ip gpu07",
        "--main_process_port 29600",
        "--mixed_precision bf16",
        "pretrain/main.py --config configs/pretrain/mae_vit_b16.yaml data.shards=/data/in1k",
    ):
        assert flag in out, (flag, out)
