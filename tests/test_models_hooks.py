"""The pretraining stage reads an objective through its class attributes and hooks only: what it
exports and evaluates, what it is told about the run's length, what the model card says."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from engine_helpers import TINY, run

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent('''
    """MPP whose exported and evaluated network is a moving average of its encoder (a teacher)."""
    import copy, json, sys
    from pathlib import Path

    import torch
    from vitmpp.common.config import load_config
    from vitmpp.common.loop import Callback
    from vitmpp.models.objective import register_objective
    from vitmpp.models.objectives.mpp import MPPConfig, MPPObjective
    from vitmpp.pretrain.config import PretrainConfig
    from vitmpp.pretrain.engine import pretrain

    calls = {"run_length": [], "features": 0, "steps": []}


    @register_objective("averaged", MPPConfig)
    class AveragedTeacher(MPPObjective):
        """MPP with an averaged copy of the encoder, which is what the run exports."""

        title = "averaged-teacher MPP"
        paper = "Nobody et al. 2099, \\"A test objective\\""
        arxiv = ""
        description = "MPP, exporting the average of the encoder's weights over the steps."

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = copy.deepcopy(self.encoder).requires_grad_(False)

        def set_run_length(self, total_steps):
            calls["run_length"].append(total_steps)

        @torch.no_grad()
        def after_optimizer_step(self, step):
            calls["steps"].append(step)
            for mine, student in zip(self.teacher.parameters(), self.encoder.parameters()):
                mine.lerp_(student, 0.5)

        def exported_module(self):
            return self.teacher

        def feature_encoder(self):
            calls["features"] += 1
            return self.teacher


    class Keep(Callback):
        def on_end(self, run, model, step):
            teacher = {k: v.tolist() for k, v in model.teacher.state_dict().items() if k == "patch_embed.proj.bias"}
            student = {k: v.tolist() for k, v in model.encoder.state_dict().items() if k == "patch_embed.proj.bias"}
            calls["end"] = {"teacher": teacher, "student": student}


    cfg = load_config(PretrainConfig, None, sys.argv[2:])
    resume = "auto" if "--resume" in sys.argv[1] else None
    pretrain(cfg, Path("runs") / "averaged", resume=resume, callbacks=[Keep()])
    Path(sys.argv[1].replace("--resume", "")).write_text(json.dumps(calls))
''')


def test_the_stage_exports_and_evaluates_the_objectives_networks_and_tells_it_the_run_length(tmp_path, digits16):
    script = tmp_path / "averaged.py"
    script.write_text(SCRIPT)
    common = [
        "objective=averaged",
        *TINY,
        "train.steps=4",
        f"data.shards={digits16}",
        "eval.every=2",
        "eval.knn_images=64",
        "eval.loss_images=32",
        "log.checkpoint_every=2",
    ]
    first = tmp_path / "first.json"
    run([sys.executable, str(script), str(first), *common, "debug.stop_at_step=2"], cwd=tmp_path)
    second = tmp_path / "second.json"
    run([sys.executable, str(script), f"{second}--resume", *common], cwd=tmp_path)
    before, after = json.loads(first.read_text()), json.loads(second.read_text())
    assert before["run_length"] == [4] and after["run_length"] == [4]  # told on a fresh and on a resumed run
    assert before["steps"] == [1, 2] and after["steps"] == [3, 4]
    assert before["features"] >= 1 and after["features"] >= 1  # the online kNN read the teacher

    from safetensors.torch import load_file

    folder = tmp_path / "runs" / "averaged"
    exported = load_file(folder / "encoder.safetensors")["patch_embed.proj.bias"].tolist()
    end = after["end"]
    assert exported == pytest.approx(end["teacher"]["patch_embed.proj.bias"], abs=0)  # the teacher, not the student
    assert exported != pytest.approx(end["student"]["patch_embed.proj.bias"], abs=1e-6)
    card = (folder / "README.md").read_text()
    assert "averaged-teacher MPP" in card and "Nobody et al. 2099" in card and "arXiv" not in card
    assert "(labels not used)" in card and "self-supervised" in card


@pytest.mark.parametrize("name", ["mpp", "simmim", "data2vec"])
@pytest.mark.parametrize(
    "option, refusal",
    [({"patch_drop_rate": 0.5}, "must not drop patches"), ({"dynamic_img_size": True}, "fixed image size")],
)
def test_objectives_that_predict_at_patches_refuse_an_encoder_that_moves_them(name, option, refusal):
    from vitmpp.common.errors import UserError
    from vitmpp.models import create_objective
    from vitmpp.models.encoder import create_encoder

    with pytest.raises(UserError, match=refusal):
        create_objective(name, create_encoder("vit_pico_patch4_32", **option))
