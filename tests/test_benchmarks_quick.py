"""The benchmark command and its parts: the --quick smoke run of every row, and the pieces
whose correctness the numbers rest on (ratios, attention switch, activation bytes, the
in-memory loader, the reducing-gap crop). No timing is asserted anywhere."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vitmpp.benchmarks.harness import Row, Settings, speed_ratio, verdict
from vitmpp.benchmarks.data import photo_like
from vitmpp.benchmarks.loader import (
    DEVICE_DECODE,
    HEADER_ONLY,
    ReducingGapRandomResizedCrop,
    device_decode_seconds,
    header_only_seconds,
)
from vitmpp.benchmarks.memory import saved_activation_bytes
from vitmpp.benchmarks.objectives import attention_kernels
from vitmpp.benchmarks.run_pretrain import InMemoryLoader
from vitmpp.benchmarks.steps import attention_modules, build_objective, fixed_batch, set_fused_attention
from vitmpp.datasets import pretrain_transform
from vitmpp.datasets.device_augment import CropFlip
from vitmpp.datasets.samples import RawSample
from vitmpp.models import objective_names

from engine_helpers import env

SECTIONS = {
    "objective step",
    "peer",
    "attention",
    "memory",
    "data loader",
    "decode+RRC+flip per core",
    "end to end",
    "scaling",
}


@pytest.mark.slow
def test_quick_run_prints_every_row(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, "-m", "vitmpp.benchmarks", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    record = json.loads(out.read_text())
    assert record["failed_rows"] == []
    assert {row["section"] for row in record["rows"]} == SECTIONS
    table = result.stdout.split("== results")[1]
    for row in record["rows"]:
        assert f"{row['section']}: {row['name']}" in table
    # MFU is a GPU number; on the CPU the objective rows give achieved FLOP/s instead
    steps = [
        r for r in record["rows"] if r["section"] == "objective step" and r["name"] in ("mae", "mpp", "supervised")
    ]
    assert len(steps) == 3 and all(r["extra"]["mfu"] is None and r["extra"]["flops_per_image"] > 0 for r in steps)
    # the scaling row really ran two processes
    assert next(r for r in record["rows"] if r["section"] == "scaling")["value"] > 0
    # decode_on="device": the header-only worker and the main process's side on this CPU, for both kinds of shards
    for name in (HEADER_ONLY, DEVICE_DECODE):
        rows = [
            r for r in record["rows"] if r["section"] == "decode+RRC+flip per core" and r["name"].endswith(f": {name}")
        ]
        assert len(rows) == 2, name
        for row in rows:
            assert math.isfinite(row["value"]) and row["value"] > 0, row
            assert all(math.isfinite(rate) and rate > 0 for rate in row["extra"]["rates"]), row
    assert (
        sum(
            r["name"].endswith(f"{HEADER_ONLY} / decode-only (simplejpeg)")
            or r["name"].endswith(f"{HEADER_ONLY} / decode-only (PIL decode)")
            for r in record["rows"]
        )
        == 2
    )


def test_unknown_row_is_a_one_sentence_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vitmpp.benchmarks", "--rows", "objectives,nope", "--out", str(tmp_path / "r.json")],
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --rows names unknown row 'nope'")
    assert "Traceback" not in result.stderr


def test_speed_ratio_is_median_ratio_with_per_round_spread():
    fast = [1.0, 2.0, 1.0]  # seconds per call of A, in three rounds
    slow = [2.0, 3.0, 4.0]  # B in the same rounds
    ratio, low, high = speed_ratio(fast, slow)
    assert ratio == pytest.approx(3.0 / 1.0)
    assert (low, high) == (pytest.approx(1.5), pytest.approx(4.0))
    assert verdict(0.95, 0.9).endswith("met")
    assert verdict(0.45, 0.9) == "goal >= 0.9: missed by 50%"


def test_settings_quick_cpu_are_tiny_and_full_cpu_is_vit_b():
    quick = Settings.for_run("cpu", True, "/tmp/x")
    full = Settings.for_run("cpu", False, "/tmp/x")
    gpu = Settings.for_run("cuda", False, "/tmp/x")
    assert quick.img_size <= 32 and quick.batch <= 8
    assert full.encoder == gpu.encoder == "vit_base_patch16_224" and full.img_size == 224
    assert gpu.precision == "bf16" and gpu.compile_modes == (False, True)


@pytest.mark.parametrize("name", objective_names())  # every registered objective builds and has its switch
def test_attention_switch_reaches_every_layer(name):
    model = build_objective(
        name, "vit_pico_patch4_16", 16, mae_decoder=dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    ).eval()
    layers = len(attention_modules(model))
    assert layers >= len(model.encoder.blocks)  # the encoder's, and those of a decoder (MAE) or a teacher (data2vec)
    images, labels = fixed_batch(2, 16, "cpu")
    fused = attention_kernels(model, images, labels, "fp32")
    assert sum(v for k, v in fused.items() if "scaled_dot_product" in k) == layers
    assert set_fused_attention(model, False) == layers
    unfused = attention_kernels(model, images, labels, "fp32")
    assert not any("scaled_dot_product" in k for k in unfused)
    assert sum(unfused.values()) == layers  # one softmax per layer instead


def test_saved_activations_grow_with_the_batch_and_shrink_with_checkpointing():
    decoder = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    plain = build_objective("mae", "vit_pico_patch4_32", 32, mae_decoder=decoder)
    ckpt = build_objective("mae", "vit_pico_patch4_32", 32, mae_decoder=decoder, grad_checkpointing=True)
    sizes = {}
    for batch in (2, 4):
        images, labels = fixed_batch(batch, 32, "cpu")
        torch.manual_seed(0)
        sizes[batch] = saved_activation_bytes(plain, images, labels, "fp32")
    assert sizes[4] == pytest.approx(2 * sizes[2], rel=0.1)
    images, labels = fixed_batch(4, 32, "cpu")
    assert saved_activation_bytes(ckpt, images, labels, "fp32") < 0.6 * sizes[4]


def test_in_memory_loader_has_the_loader_contract():
    loader = InMemoryLoader(batch_size=3, img_size=16, batches=5, seed=0)
    batches = list(loader)
    assert len(loader) == 5 == len(batches) and loader.skipped_samples == 0
    assert batches[0].images.dtype == torch.uint8 and tuple(batches[0].images.shape) == (3, 3, 16, 16)


def test_reducing_gap_crop_is_identity_on_a_full_image_crop():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    crop = ReducingGapRandomResizedCrop(24, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    out = crop(Image.fromarray(pixels, "RGB"))
    assert out.dtype == np.uint8 and out.shape == (3, 24, 24)
    np.testing.assert_array_equal(out, pixels.transpose(2, 0, 1))
    flipped = ReducingGapRandomResizedCrop(24, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)(
        Image.fromarray(pixels, "RGB")
    )
    np.testing.assert_array_equal(flipped, pixels[:, ::-1].transpose(2, 0, 1))


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")  # decode_jpeg (0.29)
def test_decode_on_device_rows_measure_positive_finite_seconds():
    """The two rows of decode_on="device": the header-only worker and the main process's batched decode +
    region cut + crop on this CPU, on a few photo-like JPEGs in memory (no timing asserted)."""
    raws = []
    for k in range(6):
        out = io.BytesIO()
        photo_like(k, (100, 75)).save(out, format="JPEG", quality=90)
        raws.append(RawSample(k, "mem", {"__key__": f"{k:04d}", "jpg": out.getvalue(), "cls": b"0"}))
    transform = pretrain_transform(32)
    crop_flip = CropFlip.of(transform)
    header = header_only_seconds(raws, crop_flip, transform.decode_min_side, batch=4, passes=2)
    crop_share: list = []
    device = device_decode_seconds(raws, crop_flip, transform.decode_min_side, batch=4, crop_share=crop_share)
    assert math.isfinite(header) and header > 0
    assert math.isfinite(device) and device > 0
    assert len(crop_share) == 1 and 0 <= crop_share[0] <= device


def test_row_records_are_plain_json():
    row = Row("memory", "mae: MiB per image", 1.5, "MiB", "note", {"x": [1, 2]})
    assert json.loads(json.dumps(row.as_dict()))["extra"] == {"x": [1, 2]}


@pytest.mark.slow
def test_gpu_check_script_cpu_smoke(tmp_path):
    """benchmarks/gpu_check.sh --cpu-smoke: the GPU check's code paths at tiny sizes, so the script never rots."""
    from engine_helpers import ROOT

    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"],
        cwd=ROOT,
        env=env(OUT=str(out), PYTHON=sys.executable, TMPDIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = (out / "summary.txt").read_text()
    assert "host syncs inside 12 optimizer steps: 0" in summary
    assert "falls" in summary and "DOES NOT FALL" not in summary
    record = json.loads((out / "results-cpu-smoke.json").read_text())
    assert record["failed_rows"] == [] and {r["section"] for r in record["rows"]} >= {"objective step", "end to end"}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "env.txt",
            "gpu_check.log",
            "pretrain_metrics.jsonl",
            "pretrain_perf.jsonl",
            "results-cpu-smoke.json",
            "summary.txt",
            "syncs.json",
        ]
    )
