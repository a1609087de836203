"""The two documented ways to run the default linear probe are one run (issue 27, item 2): the
`./launch.sh finetune encoder=runs/default-mpp` that pretraining prints, then README's plain
`./launch.sh finetune` (encoder null), then the `--resume auto` the message suggests."""

from __future__ import annotations

import json

from engine_helpers import TINY, python_cmd, run

FT = ["train.global_batch=32", "train.epochs=1", "data.num_workers=0", "log.log_every=1"]


def test_the_printed_probe_and_readmes_probe_are_the_same_run(tmp_path, digits16):
    run(python_cmd("pretrain/main.py") + TINY + ["train.steps=2", f"data.shards={digits16}"], cwd=tmp_path)
    finetune = python_cmd("finetune/main.py") + FT + [f"data.shards={digits16}"]
    first = run(finetune + ["encoder=runs/default-mpp"], cwd=tmp_path)
    folders = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("linear-")]
    assert len(folders) == 1 and (folders[0] / "results.json").is_file(), first.stdout[-2000:]
    results = json.loads((folders[0] / "results.json").read_text())
    for spelling in ([], ["encoder=./runs/default-mpp/"], ["encoder=runs/default-mpp/encoder.safetensors"]):
        again = run(finetune + spelling, cwd=tmp_path)  # refused before: "holds a run with a different config"
        assert f"{folders[0].relative_to(tmp_path)} is already finished" in again.stdout, again.stdout[-2000:]
    resumed = run(finetune + ["--resume", "auto"], cwd=tmp_path)
    assert "is already finished" in resumed.stdout, resumed.stdout[-2000:]
    assert json.loads((folders[0] / "results.json").read_text()) == results
    assert [p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith("linear-")] == [folders[0].name]
