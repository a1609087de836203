"""compare's tables say what they hold (issue 27, items 5 and 15): n beside every mean and no ± for one
cell, 'all labels' for a fraction of 1.0, and no share of a scratch -> supervised gap too small to divide."""

from __future__ import annotations

from vitmpp.common.config import load_config
from vitmpp.experiments.grid import SCRATCH, CompareConfig
from vitmpp.experiments.report import labels_title, summarize


def row(encoder, protocol, fraction, value, seed=0):
    return {
        "encoder": encoder,
        "protocol": protocol,
        "label_fraction": fraction,
        "pretrain_run": "",
        "seed": seed,
        "pretrain_images": 0,
        "images_seen": 64,
        "test_last_top1": value,
    }


def config(tmp_path, seeds):
    path = tmp_path / "compare.yaml"
    path.write_text(
        "encoders: {mpp: runs/mpp, supervised: runs/sup}\nprotocols: [finetune, scratch]\n"
        "recipes: {finetune: x.yaml, scratch: y.yaml}\n"
    )
    return load_config(CompareConfig, path, [f"seeds={seeds}"])


def test_label_fraction_titles():
    assert [labels_title(f) for f in (1.0, 0.1, 0.25, 0.005)] == [
        "all labels",
        "10% labels",
        "25% labels",
        "0.50% labels",
    ]


def test_one_seed_prints_n_and_no_spread(tmp_path):
    cfg = config(tmp_path, "[0]")
    rows = [
        row("mpp", "finetune", 1.0, 75.0),
        row("supervised", "finetune", 1.0, 90.0),
        row(SCRATCH, "scratch", 1.0, 50.0),
    ]
    _, table = summarize(cfg, rows, {"mpp": ["runs/mpp"], "supervised": ["runs/sup"]})
    assert "| all labels |" in table and "1 labels" not in table
    assert "| 75.00 (n=1) |" in table and "75.00 ±" not in table
    assert "| mpp | 62% |" in table  # (75 - 50) / (90 - 50)


def test_two_seeds_print_the_spread_and_n(tmp_path):
    cfg = config(tmp_path, "[0, 1]")
    rows = [row("mpp", "finetune", 0.1, v, seed) for seed, v in enumerate((70.0, 72.0))]
    _, table = summarize(cfg, rows, {"mpp": ["runs/mpp"]})
    assert "| 71.00 ± 1.41 (n=2) |" in table


def test_a_gap_within_noise_is_not_divided(tmp_path):
    cfg = config(tmp_path, "[0]")
    rows = [
        row("mpp", "finetune", 0.1, 60.0),
        row("supervised", "finetune", 0.1, 81.0),
        row(SCRATCH, "scratch", 0.1, 79.5),
    ]
    _, table = summarize(cfg, rows, {"mpp": ["runs/mpp"], "supervised": ["runs/sup"]})
    assert "%" not in table.split("| mpp |")[-1].splitlines()[0] and "gap +1.5" in table, table


def test_threads_are_chosen_for_every_job_count(tmp_path, capsys):
    from vitmpp.experiments.runner import choose_threads, run_parallel

    assert choose_threads(1, 2, 0.0) == 2 and choose_threads(2, 2, 0.0) == 1
    assert choose_threads(1, 2, 2.0) == 1  # two busy processes already: one thread, not torch's two
    assert choose_threads(4, 16, 3.6) == 3 and choose_threads(8, 2, 0.0) == 1
    seen = []
    run_parallel([lambda log, threads: seen.append(threads)] * 2, ["a", "b"], tmp_path, jobs=1)
    assert len(seen) == 2 and all(isinstance(t, int) and t >= 1 for t in seen)  # --jobs 1 sets threads too
