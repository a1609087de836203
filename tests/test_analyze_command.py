"""`python -m vitmpp.analyze` on a tiny exported encoder and the digits shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from vitmpp.analyze.__main__ import main
from vitmpp.models import create_encoder, save_encoder

FIGURES = [
    "attention_rollout.png",
    "mean_attention_distance.png",
    "position_embedding_similarity.png",
    "embedding_filters.png",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    encoder = create_encoder("vit_pico_patch4_32")
    out = tmp_path_factory.mktemp("encoder")
    # a non-default normalisation, as pretraining records it in encoder.json
    save_encoder(encoder, out, objective="mpp", step=7, extra={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    return out


def test_command_writes_the_four_figures_summary_and_tensorboard(exported, digits32, tmp_path, capsys):
    out, logdir = tmp_path / "analysis", tmp_path / "tb"
    code = main(
        [
            "--encoder",
            str(exported),
            "--shards",
            str(digits32),
            "--out",
            str(out),
            "--num-images",
            "20",
            "--batch-size",
            "8",
            "--num-rollout-images",
            "6",
            "--num-workers",
            "0",
            "--logdir",
            str(logdir),
        ]
    )
    assert code == 0
    assert "analysed 20 images of split 'validation'" in capsys.readouterr().out
    for name in FIGURES:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 100
    summary = json.loads((out / "summary.json").read_text())
    assert summary["figures"] == {n[:-4]: n for n in FIGURES}
    assert summary["num_images"] == 20 and summary["grid_size"] == [8, 8] and summary["patch_size"] == [4, 4]
    assert summary["encoder"]["name"] == "vit_pico_patch4_32" and summary["encoder"]["step"] == 7
    assert summary["data"]["split"] == "validation" and summary["data"]["mean"] == [0.5, 0.5, 0.5]
    distance = summary["mean_attention_distance"]
    assert len(distance["per_layer"]) == 2 and len(distance["per_head"]) == 2 and len(distance["per_head"][0]) == 2
    # pixels on a 32 px image: between 0 and the diagonal
    assert all(0 < d < 32 * 2**0.5 for d in distance["per_layer"])
    assert summary["attention_rollout"]["num_images_shown"] == 6
    assert sum(map(sum, summary["attention_rollout"]["mean_map"])) == pytest.approx(1.0, abs=1e-3)
    assert len(summary["embedding_filters"]["explained_variance_ratio"]) == 28
    assert set(summary["position_embedding_similarity"]["mean_cosine"]) == {
        "neighbours",
        "same_row_or_column",
        "other_rows_and_columns",
        "farthest",
    }

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == sorted(f"analysis/{n[:-4]}" for n in FIGURES)
    assert events.Images("analysis/mean_attention_distance")[0].step == 7
    assert "analysis/mean_attention_distance/layer_01" in events.Tags()["scalars"]


def test_command_refuses_to_overwrite_and_then_overwrites(exported, digits32, tmp_path, capsys):
    out = tmp_path / "analysis"
    out.mkdir()
    (out / "summary.json").write_text("an earlier analysis\n")
    args = [
        "--encoder",
        str(exported / "encoder.safetensors"),
        "--shards",
        str(digits32),
        "--out",
        str(out),
        "--num-images",
        "4",
        "--batch-size",
        "4",
        "--num-rollout-images",
        "2",
        "--num-workers",
        "0",
        "--split",
        "train",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == "an earlier analysis\n"
    assert not (out / "attention_rollout.png").exists()
    assert main(args + ["--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["data"]["split"] == "train"
    assert sorted(p.name for p in out.iterdir()) == sorted(FIGURES + ["summary.json"]), "no temporary files left"


def test_command_takes_a_shard_pattern_and_finds_its_split(exported, digits32, tmp_path):
    pattern = str(digits32 / "digits-validation-{000000..000001}.tar")
    assert (
        main(
            [
                "--encoder",
                str(exported),
                "--shards",
                pattern,
                "--out",
                str(tmp_path / "a"),
                "--num-images",
                "4",
                "--batch-size",
                "4",
                "--num-rollout-images",
                "2",
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["data"]["split"] == "validation"


@pytest.mark.parametrize("problem", ["encoder", "shards", "split", "num_images"])
def test_bad_input_is_one_sentence_and_exit_2(problem, exported, digits32, tmp_path, capsys):
    args = {"--encoder": str(exported), "--shards": str(digits32), "--out": str(tmp_path / "out")}
    extra = []
    if problem == "encoder":
        args["--encoder"] = str(tmp_path / "missing")
    elif problem == "shards":
        args["--shards"] = str(tmp_path / "no-shards")
    elif problem == "split":
        extra = ["--split", "holdout"]
    else:
        extra = ["--num-images", "0"]
    with pytest.raises(SystemExit) as exit_info:
        main([x for kv in args.items() for x in kv] + extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    expected = {
        "encoder": "No encoder at",
        "shards": f"Shards '{tmp_path / 'no-shards'}' do not exist",
        "split": "no split 'holdout'",
        "num_images": "--num-images",
    }[problem]
    assert expected in err
    assert not (tmp_path / "out").exists()


def test_module_entry_point_reports_a_missing_encoder(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitmpp.analyze",
            "--encoder",
            str(tmp_path / "nope"),
            "--shards",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: No encoder at")


def test_analyze_sits_below_the_engines():
    """analyze may use common, datasets and models, never pretrain, finetune or benchmarks."""
    import re
    from pathlib import Path

    import vitmpp.analyze

    for path in Path(vitmpp.analyze.__file__).parent.rglob("*.py"):
        text = path.read_text()
        for higher in ("pretrain", "finetune", "benchmarks"):
            assert not re.search(rf"^\s*(?:from|import)\s+vitmpp\.{higher}\b", text, re.M), f"{path} imports {higher}"
