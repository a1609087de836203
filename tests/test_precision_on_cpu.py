"""An fp16 request on a machine without CUDA is said, not dropped in silence (issue 26, "unclear")."""

from __future__ import annotations

from engine_helpers import TINY, python_cmd, run


def test_fp16_on_the_cpu_says_it_trains_in_full_precision(tmp_path, digits16):
    result = run(
        python_cmd("pretrain/main.py")
        + TINY
        + ["train.steps=1", f"data.shards={digits16}", "train.mixed_precision=fp16"],
        cwd=tmp_path,
    )
    warned = [line for line in result.stderr.splitlines() if "mixed_precision=fp16" in line]
    assert len(warned) == 1 and "full precision (fp32)" in warned[0], result.stderr[-2000:]
    plain = run(
        python_cmd("pretrain/main.py") + TINY + ["train.steps=1", f"data.shards={digits16}", "run.name=b"], cwd=tmp_path
    )
    assert "mixed_precision" not in plain.stderr
