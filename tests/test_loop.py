"""The one loop: both stages get its guarantees (stop + exact resume, checkpoints, the
debug keys), and the hooks an objective or a callback plugs in through are called."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from engine_helpers import TINY, metrics, python_cmd, run

pytestmark = pytest.mark.slow

FT = [
    "train.global_batch=32",
    "data.num_workers=0",
    "log.log_every=1",
    "train.steps=6",
    "eval_every_steps=3",
    "data.label_fraction=0.5",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, digits16):
    root = tmp_path_factory.mktemp("pretrained")
    run(python_cmd("pretrain/main.py") + TINY + ["train.steps=2", f"data.shards={digits16}", "run.name=mpp"], cwd=root)
    return root / "runs" / "mpp"


@pytest.mark.parametrize("protocol", ["linear", "finetune"])
def test_finetuning_stops_and_resumes_exactly(tmp_path, pretrained, digits16, protocol):
    """debug.stop_at_step, checkpoints and --resume are the loop's: fine-tuning has them as pretraining does."""
    common = FT + [f"protocol={protocol}", f"encoder={pretrained}", f"data.shards={digits16}"]
    run(python_cmd("finetune/main.py") + common + ["run.name=straight"], cwd=tmp_path)
    first = run(python_cmd("finetune/main.py") + common + ["run.name=resumed", "debug.stop_at_step=4"], cwd=tmp_path)
    assert "stopped by debug.stop_at_step at step 4" in first.stdout
    resumed_dir, straight_dir = tmp_path / "runs" / "resumed", tmp_path / "runs" / "straight"
    assert not (resumed_dir / "results.json").exists()
    second = run(python_cmd("finetune/main.py") + common + ["run.name=resumed", "--resume", "auto"], cwd=tmp_path)
    assert "resumed from" in second.stdout and "step-0000004" in second.stdout
    assert [r["step"] for r in metrics(resumed_dir)] == list(range(1, 7))
    assert [r["loss"] for r in metrics(resumed_dir)] == pytest.approx(
        [r["loss"] for r in metrics(straight_dir)], abs=1e-6
    )
    a, b = (json.loads((d / "results.json").read_text()) for d in (resumed_dir, straight_dir))
    assert [h["step"] for h in a["history"]] == [3, 6]  # the evaluation before the stop survived it
    assert [h["top1"] for h in a["history"]] == pytest.approx([h["top1"] for h in b["history"]], abs=1e-9)


def test_finetuning_writes_periodic_checkpoints_as_configured(tmp_path, pretrained, digits16):
    common = FT + [
        "protocol=linear",
        f"encoder={pretrained}",
        f"data.shards={digits16}",
        "eval_every_steps=6",
        "log.checkpoint_every=2",
        "log.keep_checkpoints=5",
    ]
    run(python_cmd("finetune/main.py") + common, cwd=tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-0000002",
        "step-0000004",
        "step-0000006",
    ]


SCRIPT = textwrap.dedent('''
    """A third-party objective with an EMA-style hook and its own transform, registered outside vitmpp,
    plus a callback recording what the loop shows it."""
    import json, sys
    from pathlib import Path

    import torch
    from vitmpp.common.config import load_config
    from vitmpp.common.callbacks import Callback
    from vitmpp.models.objective import register_objective
    from vitmpp.models.objectives.supervised import SupervisedConfig, SupervisedObjective
    from vitmpp.pretrain.config import PretrainConfig
    from vitmpp.pretrain.engine import pretrain

    calls = {"after_optimizer_step": [], "transform": 0, "phases": [], "logged": [], "ended": None}


    class CountingTransform:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, image):
            calls["transform"] += 1
            return self.inner(image)


    @register_objective("teacher", SupervisedConfig)
    class TeacherObjective(SupervisedObjective):
        """A supervised objective with an EMA teacher of its head."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("teacher", self.head.weight.detach().clone())

        def after_optimizer_step(self, step):
            calls["after_optimizer_step"].append(step)
            self.teacher.mul_(0.5).add_(self.head.weight.detach(), alpha=0.5)

        @classmethod
        def training_transform(cls, img_size, data):
            from vitmpp.datasets import pretrain_transform

            return CountingTransform(pretrain_transform(img_size, scale=(1.0, 1.0), hflip=0.0))


    class Recorder(Callback):
        def phase(self, name):
            calls["phases"].append(name)
            return super().phase(name)

        def on_log(self, step, scalars):
            calls["logged"].append(step)

        def on_end(self, run, model, step):
            calls["ended"] = step


    cfg = load_config(PretrainConfig, None, sys.argv[2:])
    pretrain(cfg, Path("runs") / "teacher", callbacks=[Recorder()])
    Path(sys.argv[1]).write_text(json.dumps(calls))
''')


def test_an_objective_registered_elsewhere_plugs_in_with_its_hooks(tmp_path, digits16):
    script = tmp_path / "teacher.py"
    script.write_text(SCRIPT)
    out = tmp_path / "calls.json"
    run(
        [
            sys.executable,
            str(script),
            str(out),
            "objective=teacher",
            *TINY,
            "train.steps=3",
            f"data.shards={digits16}",
            "log.log_every=1",
        ],
        cwd=tmp_path,
    )
    calls = json.loads(out.read_text())
    assert calls["after_optimizer_step"] == [1, 2, 3]
    assert calls["transform"] >= 3 * 32  # its own transform made every training sample (no workers: in process)
    assert calls["logged"] == [1, 2, 3] and calls["ended"] == 3
    assert calls["phases"].count("step") == 3 and calls["phases"][-1] == "finish"
    assert json.loads((tmp_path / "runs" / "teacher" / "encoder.json").read_text())["objective"] == "teacher"
