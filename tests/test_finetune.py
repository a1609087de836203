"""Evaluation protocols: linear probe, fine-tuning (layer decay, resolution change),
label fractions, two-process evaluation, and the comparison command."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from engine_helpers import TINY, accelerate_cmd, metrics, python_cmd, run

COMPARE = [sys.executable, "-m", "vitmpp.experiments.compare"]
FT_TINY = ["train.global_batch=32", "data.num_workers=0", "log.log_every=5", "train.epochs=1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, digits16):
    """A tiny MPP encoder pretrained for a few steps on 16 px digits."""
    root = tmp_path_factory.mktemp("pretrained")
    run(python_cmd("pretrain/main.py") + TINY + ["train.steps=3", f"data.shards={digits16}", "run.name=mpp"], cwd=root)
    return root / "runs" / "mpp"


def test_heads_start_at_zero():
    from vitmpp.evaluate.heads import LinearProbe, make_classifier
    from vitmpp.models import create_encoder

    probe = LinearProbe(create_encoder("vit_pico_patch4_16"), 10)
    assert not probe.head.weight.any() and not probe.head.bias.any()
    assert not probe.norm.affine and probe.norm.eps == 1e-6
    classifier = make_classifier(create_encoder("vit_pico_patch4_16"), 7, "avg")
    assert classifier.head.out_features == 7 and not classifier.head.weight.any()


def test_layer_decay_scales():
    from vitmpp.common.optim import build_optimizer
    from vitmpp.common.sections import OptimConfig
    from vitmpp.evaluate.heads import make_classifier
    from vitmpp.models import create_encoder

    model = make_classifier(create_encoder("vit_nano_patch4_32"), 10, "avg")  # depth 4
    optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=1.0, base_lr=None, layer_decay=0.5), 1.0)
    scale_of = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            scale_of[names[id(p)]] = group["lr_scale"]
    depth = len(model.blocks)
    assert scale_of["head.weight"] == 1.0
    assert scale_of[f"blocks.{depth - 1}.attn.qkv.weight"] == 0.5
    assert scale_of["blocks.0.mlp.fc1.weight"] == 0.5**depth
    assert scale_of["patch_embed.proj.weight"] == pytest.approx(0.5 ** (depth + 1))
    assert scale_of["pos_embed"] == pytest.approx(0.5 ** (depth + 1))


def test_balanced_subset_is_balanced_and_deterministic(digits16):
    from vitmpp.datasets import read_manifest
    from vitmpp.finetune.subset import balanced_subset

    labels = read_manifest(digits16).labels("train")
    chosen = balanced_subset(labels, 0.1, seed=3)
    assert chosen == balanced_subset(labels, 0.1, seed=3)
    assert chosen != balanced_subset(labels, 0.1, seed=4)
    counts = torch.bincount(torch.tensor([labels[i] for i in chosen]), minlength=10)
    full = torch.bincount(torch.tensor(labels), minlength=10)
    assert torch.all((counts - (0.1 * full).round()).abs() <= 0)
    assert len(set(chosen)) == len(chosen)


@pytest.mark.slow
def test_linear_probe_trains_only_the_head(tmp_path, pretrained, digits16):
    from safetensors.torch import load_file

    run(
        python_cmd("finetune/main.py")
        + FT_TINY
        + ["protocol=linear", f"encoder={pretrained}", f"data.shards={digits16}", "run.name=linear"],
        cwd=tmp_path,
    )
    out = tmp_path / "runs" / "linear"
    before = load_file(str(pretrained / "encoder.safetensors"))
    after = load_file(str(out / "best.safetensors"))
    for key, value in before.items():
        assert torch.equal(after[f"encoder.{key}"], value), key
    assert after["head.weight"].abs().sum() > 0 and after["norm.running_var"].ne(1).any()
    assert set(after) - {f"encoder.{k}" for k in before} == {
        "head.weight",
        "head.bias",
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
    }
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"] == "linear" and results["val_images"] == results["test_images"] == 359
    assert results["epochs"] == 1 and results["images_seen"] == (1079 // 32) * 32
    for key in ("wall_time_s", "encoder_info", "seed", "label_fraction", "val_last_top5", "test_last_top5"):
        assert key in results
    assert_selected_on_validation_and_reported_on_test(results)


def assert_selected_on_validation_and_reported_on_test(results):
    """The chosen evaluation is the best on validation, and the test numbers are read at it, whatever
    test would have preferred; last is the last."""
    history = results["history"]
    assert len(history) >= 1 and all({"top1", "test_top1"} <= set(row) for row in history)
    chosen = max(history, key=lambda row: row["top1"])
    assert results["selected_step"] == chosen["step"] and results["val_best_top1"] == chosen["top1"]
    assert results["test_selected_top1"] == chosen["test_top1"] and results["test_selected_top5"] == chosen["test_top5"]
    assert results["test_last_top1"] == history[-1]["test_top1"] and results["val_last_top1"] == history[-1]["top1"]


@pytest.mark.slow
def test_finetune_at_higher_resolution_learns(tmp_path, pretrained, digits32):
    """A 16 px encoder fine-tuned at 32 px (position embeddings resampled): the loss falls."""
    run(
        python_cmd("finetune/main.py")
        + [
            "train.global_batch=32",
            "data.num_workers=0",
            "log.log_every=1",
            "protocol=finetune",
            f"encoder={pretrained}",
            f"data.shards={digits32}",
            "model.img_size=32",
            "train.epochs=2",
            "regularization.mixup=0",
            "regularization.cutmix=0",
            "data.auto_augment=null",
            "optim.name=adamw",
            "optim.lr=2e-3",
            "optim.warmup_epochs=0",
            "data.crop_scale=[0.6,1.0]",
            "regularization.reprob=0",
            "regularization.label_smoothing=0",
            "model.drop_path_rate=0",
            "run.name=ft32",
        ],
        cwd=tmp_path,
    )
    losses = [row["loss"] for row in metrics(tmp_path / "runs" / "ft32")]
    assert len(losses) == 2 * (1079 // 32)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.05, losses
    assert json.loads((tmp_path / "runs" / "ft32" / "results.json").read_text())["encoder_info"]["img_size"] == 16


@pytest.mark.slow
def test_two_process_evaluation_counts_each_sample_once(tmp_path, pretrained, digits16):
    run(
        accelerate_cmd("finetune/main.py", processes=2)
        + FT_TINY
        + ["protocol=linear", f"encoder={pretrained}", f"data.shards={digits16}", "run.name=two"],
        cwd=tmp_path,
    )
    results = json.loads((tmp_path / "runs" / "two" / "results.json").read_text())
    # 359 is odd: one rank's share is padded and the padding dropped, on both held-out splits
    assert results["val_images"] == results["test_images"] == 359


def test_compare_grid_runs_scratch_once_and_never_finetunes_random():
    from vitmpp.experiments.grid import CompareConfig, cells, encoder_runs

    cfg = CompareConfig(
        encoders={"mpp": "runs/mpp", "random": "random"},
        protocols=["linear", "knn", "finetune", "scratch"],
        label_fractions=[0.1, 1.0],
        seeds=[0, 1, 2],
    )
    grid = cells(cfg, encoder_runs(cfg, Path("out")))
    by_protocol = {p: {(c.encoder, c.label_fraction, c.seed) for c in grid if c.protocol == p} for p in cfg.protocols}
    assert len(by_protocol["linear"]) == len(by_protocol["knn"]) == 2 * 2 * 3
    assert {e for e, _, _ in by_protocol["finetune"]} == {"mpp"} and len(by_protocol["finetune"]) == 6
    assert {e for e, _, _ in by_protocol["scratch"]} == {"-"} and len(by_protocol["scratch"]) == 6
    assert len(grid) == len(set(grid)) == 12 + 12 + 6 + 6


def test_compare_cell_folders_never_start_with_a_dash_and_the_table_reports_test():
    from vitmpp.experiments.grid import CompareConfig, cells, encoder_runs

    cfg = CompareConfig(encoders={"mpp": "runs/mpp"}, protocols=["linear", "scratch"], label_fractions=[0.1], seeds=[0])
    assert [c.name for c in cells(cfg, encoder_runs(cfg, Path("out")))] == ["mpp-linear-f0.1-s0", "scratch-f0.1-s0"]
    assert cfg.metric == "test_last_top1"


def test_compare_cannot_express_selection_on_the_split_it_reports(tmp_path):
    """Every test metric the table can report is a last or a chosen-on-validation number, never a best over
    test; asking for one is refused before anything runs. The validation metrics (for choosing a recipe)
    title their table as validation, not as results."""
    from vitmpp.common.config import load_config
    from vitmpp.common.errors import ConfigError
    from vitmpp.experiments.grid import METRICS, CompareConfig, metric_split
    from vitmpp.experiments.report import summarize

    assert all("best" not in m for m in METRICS if metric_split(m) == "test")
    assert {m for m in METRICS if metric_split(m) == "validation"} == {"val_last_top1", "val_best_top1"}
    config = tmp_path / "compare.yaml"
    config.write_text("encoders: {mpp: runs/mpp}\nprotocols: [linear]\nrecipes: {linear: x.yaml}\n")
    for metric in ("best_top1", "last_top1", "test_best_top1", "test_best_top5"):
        with pytest.raises(ConfigError, match="metric"):
            load_config(CompareConfig, config, [f"metric={metric}"])
    row = {
        "encoder": "mpp",
        "protocol": "linear",
        "label_fraction": 0.1,
        "pretrain_run": "",
        "pretrain_images": 0,
        "images_seen": 64,
        "test_last_top1": 50.0,
        "val_last_top1": 70.0,
    }
    for metric, title, value in (
        ("test_last_top1", "on the test split", "50.00"),
        ("val_last_top1", "on the validation split", "70.00"),
    ):
        cfg = load_config(CompareConfig, config, [f"metric={metric}", "seeds=[0]"])
        _, table = summarize(cfg, [row], {"mpp": ["runs/mpp"]})
        assert title in table.splitlines()[0] and f"| {value} (n=1) |" in table and "±" not in table.split("\n", 2)[2]
    # and the value a test_selected_* metric reads is chosen on validation (tested on a real run above)


def test_compare_keeps_its_cells_without_overwrite_when_the_grid_only_grows():
    from vitmpp.common.config import diff_keys
    from vitmpp.experiments.grid import only_grown

    before = {
        "seeds": [0],
        "pretraining": {"recipes": {"mpp": "mpp.yaml"}, "seeds": [0]},
        "output_dir": "o",
        "overrides": ["data.shards=a"],
    }
    for after, grown in (
        ({**before, "seeds": [0, 1, 2]}, True),
        ({**before, "pretraining": {"recipes": {"mpp": "mpp.yaml", "mae": "mae.yaml"}, "seeds": [0, 1]}}, True),
        ({**before, "seeds": [1]}, False),  # a seed dropped: not growth (--overwrite says it is meant)
        ({**before, "pretraining": {"recipes": {"mpp": "mpp.yaml lr=1"}, "seeds": [0]}}, False),  # a changed recipe
        ({**before, "overrides": ["data.shards=b"]}, False),
        ({**before, "compute_matched_scratch": True}, True),  # a row added (issue 27, item 15)
        ({**before, "compute_matched_scratch": True, "overrides": ["data.shards=b"]}, False),
    ):
        assert only_grown(before, after, diff_keys(before, after)) is grown, after


def test_compare_pretraining_recipe_entries_carry_their_own_overrides(tmp_path):
    from vitmpp.common.config import load_config
    from vitmpp.common.errors import ConfigError
    from vitmpp.experiments.grid import CompareConfig

    config = tmp_path / "compare.yaml"
    config.write_text(
        "pretraining: {recipes: {mpp: mpp.yaml, mpp_mean: 'mpp.yaml mpp.target=mean_color'}}\n"
        "protocols: [linear]\nrecipes: {linear: x.yaml}\n"
    )
    assert load_config(CompareConfig, config, []).pretraining.recipes["mpp_mean"] == "mpp.yaml mpp.target=mean_color"
    config.write_text(
        "pretraining: {recipes: {mpp_mean: 'mpp.yaml mean_color'}}\nprotocols: [linear]\nrecipes: {linear: x.yaml}\n"
    )
    with pytest.raises(
        ConfigError, match="pretraining.recipes.mpp_mean' must be a recipe file optionally followed by key=value"
    ):
        load_config(CompareConfig, config, [])


def test_compare_grid_over_pretraining_runs_and_compute_matched_scratch():
    from vitmpp.experiments.grid import CompareConfig, PretrainingPlan, cells, encoder_runs
    from vitmpp.experiments.report import label

    cfg = CompareConfig(
        encoders={"sup": "runs/sup"},
        pretraining=PretrainingPlan(recipes={"mpp": "mpp.yaml"}, seeds=[0, 1, 2]),
        protocols=["linear", "scratch"],
        label_fractions=[0.1],
        seeds=[0, 1],
        compute_matched_scratch=True,
    )
    runs = encoder_runs(cfg, Path("out"))
    assert runs["mpp"] == [str(Path("out") / "pretrain" / f"mpp-s{s}") for s in (0, 1, 2)]
    names = [c.name for c in cells(cfg, runs)]
    assert "mpp-p2-linear-f0.1-s1" in names and "sup-linear-f0.1-s0" in names
    # one pretraining seed is named by its seed, so cells done before more seeds were added are reused
    one = CompareConfig(
        pretraining=PretrainingPlan(recipes={"mpp": "mpp.yaml"}, seeds=[1]),
        protocols=["linear"],
        label_fractions=[0.1],
        seeds=[0],
    )
    assert [c.name for c in cells(one, encoder_runs(one, Path("out")))] == ["mpp-p1-linear-f0.1-s0"]
    assert "scratch-f0.1-s0" in names and "scratch-matched-f0.1-s1" in names
    assert len(names) == len(set(names)) == (3 + 1) * 2 + 2 * 2
    assert label("matched") == "(random init, compute-matched)"


def test_compare_recipes_are_found_next_to_the_config_from_any_working_directory(tmp_path, monkeypatch):
    from vitmpp.common.config import load_config
    from vitmpp.common.errors import UserError
    from vitmpp.experiments.grid import CompareConfig, resolve_recipes

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)  # not the repository root
    config = root / "configs" / "compare" / "digits.yaml"
    recipes = resolve_recipes(load_config(CompareConfig, config, []), config)
    assert recipes["linear"] == str(root / "configs" / "compare" / ".." / "finetune" / "linear_digits.yaml")
    assert all(Path(path).is_file() for path in recipes.values())
    (tmp_path / "mine.yaml").write_text(
        "encoders: {mpp: runs/mpp}\nprotocols: [linear]\nrecipes: {linear: nowhere/linear.yaml}\n"
    )
    with pytest.raises(UserError, match="Recipe 'nowhere/linear.yaml' \\(key recipes.linear of"):
        resolve_recipes(load_config(CompareConfig, tmp_path / "mine.yaml", []), tmp_path / "mine.yaml")


@pytest.mark.slow
def test_compare_pretrains_seeds_reports_test_and_resumes(tmp_path, digits16):
    """The comparison makes its own pretraining runs (two seeds), runs its cells two at a time, reports test
    numbers with the images every row trained on, adds a compute-matched scratch row, and continues."""
    pretrain_recipe = tmp_path / "pretrain.yaml"
    pretrain_recipe.write_text("train:\n  steps: 2\n")  # the entry's own override makes it 3
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "train:\n  global_batch: 32\n  steps: 4\ndata:\n  num_workers: 0\n  auto_augment: null\n"
        "regularization:\n  mixup: 0.0\n  cutmix: 0.0\neval_every_steps: 2\n"
    )
    config = tmp_path / "compare.yaml"
    config.write_text(
        "encoders:\n  random: random\n"
        f"pretraining:\n  recipes: {{mpp: '{pretrain_recipe} train.steps=3'}}\n  seeds: [0, 1]\n"
        f"  overrides: {[*TINY, f'data.shards={digits16}']}\n"
        "protocols: [linear, knn, scratch]\nlabel_fractions: [0.2]\nseeds: [0]\ncompute_matched_scratch: true\n"
        f"recipes:\n  linear: {recipe}\n  knn: {recipe}\n  scratch: {recipe}\n"
        f"overrides: ['data.shards={digits16}']\noutput_dir: {tmp_path / 'out'}\n"
    )
    first = run(COMPARE + ["--config", str(config), "--jobs", "2"], cwd=tmp_path, timeout=900)
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "pretrain").iterdir()) == ["mpp-s0", "mpp-s1"]
    assert "compute-matched scratch: 7 steps (its recipe's own plus 96 pretraining images)" in first.stdout  # 4 + 96/32
    assert "[compare] 2 at a time, " in first.stdout and " CPU thread(s) each (OMP_NUM_THREADS; " in first.stdout
    started = [
        line.split()[1:3]
        for line in first.stdout.splitlines()
        if line.startswith("[compare] ") and " done: " not in line and "(log:" in line
    ]
    assert len(started) == 2 + 8 and first.stdout.count(" done: test last top1 ") == 8  # two at a time, logs in files
    assert sorted(p.name for p in (out / "logs").iterdir()) == sorted(
        f"pretrain-{name}.log" if what == "pretraining" else f"{name}.log" for what, name in started
    )
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 8 and {(r["encoder"], r["pretrain_run"]) for r in rows if r["protocol"] == "linear"} == {
        ("mpp", "p0"),
        ("mpp", "p1"),
        ("random", ""),
    }
    for r in rows:
        assert float(r["test_last_top1"]) >= 0 and int(r["total_images"]) == int(r["pretrain_images"]) + int(
            r["images_seen"]
        )
    by_cell = {(r["encoder"], r["protocol"]): r for r in rows}
    assert by_cell[("matched", "scratch")]["images_seen"] == str(7 * 32) and by_cell[("-", "scratch")][
        "images_seen"
    ] == str(4 * 32)
    assert (
        by_cell[("random", "linear")]["pretrain_images"] == "0" and by_cell[("mpp", "knn")]["pretrain_images"] == "96"
    )
    # every evaluation of every cell, on validation, against images seen, and its figure
    history = list(csv.DictReader(open(out / "history.csv")))
    linear = [r for r in history if r["protocol"] == "linear"]
    assert linear and all(int(r["images_seen"]) > 0 for r in linear) and "test_top1" not in history[0]
    assert (out / "curves.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert "test last top1 on the test split" in table and "2 pretraining runs" in table
    assert "| mpp | linear |" in table and "| (random init, compute-matched) | scratch |" in table
    assert "| 96 + 128 |" in table  # pretraining + linear-probe images
    assert (out / "results.png").stat().st_size > 1000
    second = run(COMPARE + ["--config", str(config)], cwd=tmp_path)
    assert "[compare] " not in second.stdout.replace("[compare] compute-matched", "")  # every run was already done
    changed = run(COMPARE + ["--config", str(config), "seeds=[5]"], cwd=tmp_path, check=False)
    assert changed.returncode == 2 and "different config (keys seeds)" in changed.stderr


def test_no_argument_default_says_what_to_run_first(tmp_path):
    result = run(python_cmd("finetune/main.py"), cwd=tmp_path, check=False, cache=tmp_path / "cache")
    assert result.returncode == 2
    assert "run `accelerate launch pretrain/main.py` first" in result.stderr


@pytest.mark.parametrize(
    "config", sorted((Path(__file__).resolve().parents[1] / "configs" / "compare").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_compare_config_loads_and_finds_its_recipes(config):
    from vitmpp.common.config import load_config
    from vitmpp.experiments.grid import CompareConfig, metric_split, resolve_pretraining, resolve_recipes

    cfg = load_config(CompareConfig, config, [])
    # a results table reports test; only a recipe-choosing config (*_tune.yaml) shows validation
    assert metric_split(cfg.metric) == ("validation" if config.stem.endswith("_tune") else "test")
    assert set(resolve_recipes(cfg, config)) == set(cfg.protocols)
    for _name, (recipe, overrides) in resolve_pretraining(cfg, config).items():
        assert Path(recipe).is_file() and all("=" in o for o in overrides)


def test_compare_refuses_repeated_or_empty_lists_and_a_cell_of_another_encoder(tmp_path):
    """A repeated seed would name two cells alike (one result counted twice); a finished cell found by its
    folder name but run with another encoder (the list reordered) is not reported as this one."""
    from vitmpp.common.config import load_config
    from vitmpp.common.errors import ConfigError, UserError
    from vitmpp.experiments.grid import Cell, CompareConfig
    from vitmpp.experiments.runner import run_cell

    config = tmp_path / "compare.yaml"
    config.write_text("encoders: {mpp: [runs/a, runs/b]}\nprotocols: [linear]\nrecipes: {linear: x.yaml}\n")
    for override, message in (
        ("seeds=[0,1,1]", "Key 'seeds' repeats 1"),
        ("label_fractions=[]", "'label_fractions' is empty"),
        ("encoders={mpp: [runs/a, runs/a]}", "Key 'encoders.mpp' repeats runs/a"),
        ("pretraining={recipes: {mae: m.yaml}, seeds: [2, 2]}", "'pretraining.seeds' repeats 2"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(CompareConfig, config, [override])
    cfg = load_config(CompareConfig, config, [])

    for name in ("a", "b"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "encoder.safetensors").write_bytes(b"")
    cell = Cell("mpp", "linear", 0.1, 0, run=0, tag="p0")
    folder = tmp_path / "cells" / cell.name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(
        json.dumps({"encoder": str(tmp_path / "runs" / "a" / "encoder.safetensors"), "test_last_top1": 50.0})
    )
    paths = {"mpp": [str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b")]}
    assert run_cell(cfg, cell, paths, tmp_path / "cells")["test_last_top1"] == 50.0  # its own encoder: reused
    paths["mpp"].reverse()  # the list reordered: run 0 is now b
    with pytest.raises(UserError, match=f"Cell {cell.name} in .* was run with encoder .*runs/a/encoder.safetensors"):
        run_cell(cfg, cell, paths, tmp_path / "cells")


def test_fewshot_protocol_scores_test_at_the_regulariser_validation_chose(tmp_path, pretrained, digits16):
    """protocol=fewshot through the command, checked against the same solve on features computed here."""
    from vitmpp.datasets import LoaderSpec, eval_transform, open_loader, read_manifest
    from vitmpp.evaluate.fewshot import fewshot_evaluate
    from vitmpp.evaluate.heads import pooled_features
    from vitmpp.evaluate.knn import extract
    from vitmpp.models import load_encoder

    out = run(
        python_cmd("finetune/main.py")
        + [
            "data.num_workers=0",
            "protocol=fewshot",
            f"encoder={pretrained}",
            f"data.shards={digits16}",
            "fewshot.shots=[2,5]",
            "fewshot.seeds=[0,1]",
            "run.name=fewshot",
        ],
        cwd=tmp_path,
    )
    results = json.loads((tmp_path / "runs" / "fewshot" / "results.json").read_text())
    assert results["protocol"] == "fewshot" and results["shots"] == [2, 5]
    assert [(r["shots"], r["seed"]) for r in results["per_seed"]] == [(2, 0), (5, 0), (2, 1), (5, 1)]
    assert results["test_last_top1"] == results["by_shots"][0]["test_top1"]  # the headline: the first shot count
    assert "2-shot" in out.stdout and "5-shot" in out.stdout and "ms" in out.stdout

    # the same numbers from features extracted here (one process, the encoder's normalisation)
    class Single:  # what extract() needs of an Accelerator, for one process in fp32
        device = torch.device("cpu")
        autocast = staticmethod(torch.no_grad)
        gather = staticmethod(lambda t: t)

    encoder = load_encoder(pretrained).eval()
    info = json.loads((pretrained / "encoder.json").read_text())["extra"]
    mean, std = (torch.tensor(info[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    manifest = read_manifest(digits16)
    splits = {}
    for split in ("train", "validation", "test"):
        spec = LoaderSpec(
            shards=digits16,
            manifest=manifest,
            split=split,
            batch_size=256,
            transform=eval_transform(16, crop_pct=0.875, interpolation="bicubic"),
            training=False,
            rank=0,
            world_size=1,
            num_workers=0,
        )
        splits[split] = extract(
            Single, lambda x: pooled_features(encoder, x, "token"), open_loader(spec), mean, std, l2_normalise=False
        )
    mine = fewshot_evaluate(splits["train"], splits["validation"], splits["test"], manifest.num_classes, [2, 5], [0, 1])
    for theirs, ours in zip(results["per_seed"], mine):
        assert theirs["l2"] == ours.l2 and abs(theirs["test_top1"] - ours.test_top1) < 1e-9


def test_a_public_checkpoint_is_evaluated_like_our_own_encoder(tmp_path, digits16):
    """encoder= takes a checkpoint of another library (here timm's state dict and torchvision's): the run
    names its format and digest and says which normalisation it assumed."""
    from safetensors.torch import save_file
    from timm.models import VisionTransformer
    from torchvision.models import VisionTransformer as TorchvisionViT

    torch.manual_seed(0)
    timm_file = tmp_path / "vit_pico.safetensors"
    save_file(
        VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=0).state_dict(),
        timm_file,
    )
    torchvision_file = tmp_path / "vit_pico_tv.pth"
    torch.save(
        TorchvisionViT(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=256).state_dict(),
        torchvision_file,
    )
    for file, fmt, normalisation in (
        (timm_file, "timm", "states no normalisation"),
        (torchvision_file, "torchvision", None),
    ):
        out = run(
            python_cmd("finetune/main.py")
            + [
                "data.num_workers=0",
                "protocol=knn",
                f"encoder={file}",
                f"data.shards={digits16}",
                f"run.name=knn-{fmt}",
            ],
            cwd=tmp_path,
        )
        assert f"encoder: {file} ({fmt}, sha256 " in out.stdout
        assert (normalisation in out.stdout) if normalisation else "states no normalisation" not in out.stdout
        results = json.loads((tmp_path / "runs" / f"knn-{fmt}" / "results.json").read_text())
        assert results["protocol"] == "knn" and results["encoder_info"]["source"]["format"] == fmt
        assert results["test_last_top1"] is not None
