"""Non-finite losses on one rank (a real full disk during a save: test_disk_and_checkpoints.py)."""

from __future__ import annotations

import json
import time

import pytest

from engine_helpers import TINY, accelerate_cmd, metrics, run

pytestmark = pytest.mark.slow


@pytest.mark.fault("non-finite loss on one rank for 1 step", expect="survived")
def test_one_nonfinite_step_on_one_rank_is_skipped_everywhere(tmp_path, digits16):
    run(
        accelerate_cmd("pretrain/main.py", processes=2)
        + TINY
        + [
            "train.steps=5",
            f"data.shards={digits16}",
            "debug.inject_nonfinite_steps=[3]",
            "debug.inject_nonfinite_rank=1",
            "debug.record_samples=true",
        ],
        cwd=tmp_path,
    )
    run_dir = tmp_path / "runs" / "default-mpp"
    rows = metrics(run_dir)
    assert rows[2]["loss"] is None and all(r["loss"] is not None for r in rows[:2] + rows[3:])
    ranks = [json.loads((run_dir / f"debug-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]
    state = json.loads((run_dir / "checkpoints" / "step-0000005" / "trainer_state.json").read_text())
    assert state["nonfinite_steps"] == 1


@pytest.mark.fault("non-finite loss on one rank for K steps in a row", expect="clear error")
def test_nonfinite_streak_on_one_rank_stops_both(tmp_path, digits16):
    started = time.monotonic()
    result = run(
        accelerate_cmd("pretrain/main.py", processes=2)
        + TINY
        + [
            "train.steps=12",
            f"data.shards={digits16}",
            "debug.inject_nonfinite_steps=[3,4,5,6,7,8,9,10]",
            "debug.inject_nonfinite_rank=1",
            "train.max_nonfinite_steps=3",
            "log.checkpoint_every=2",
        ],
        cwd=tmp_path,
        check=False,
        timeout=120,
    )
    assert time.monotonic() - started < 30 + 30  # under 30 s after a ~20 s start-up
    assert result.returncode != 0
    assert "not finite for 3 consecutive steps" in result.stderr
    checkpoints = tmp_path / "runs" / "default-mpp" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000002"]  # the last good one, intact
    assert (checkpoints / "step-0000002" / "trainer_state.json").is_file()
