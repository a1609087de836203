"""Exports for Hugging Face transformers: same features as timm, the same pixels as our evaluation
transform, a classifier that trains, one-sentence refusals, and the end of a real pretraining run."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from vitmpp.common.errors import UserError
from vitmpp.models import create_encoder, load_encoder, save_encoder
from vitmpp.models.hub import export_transformers, image_processor_config

from engine_helpers import ROOT, TINY, env, python_cmd, run
from models_helpers import tiny_objective

transformers = pytest.importorskip("transformers")

EXPORT = [sys.executable, "-m", "vitmpp.models.export"]
MEAN, STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # loading must need nothing from a hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def trained_like(encoder: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Move every weight off its initial value (zero biases, unit norms), as training does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return encoder.eval()


def exported(tmp_path, objective: str):
    """A run-like folder (encoder.safetensors + encoder.json) of `objective`'s encoder and its transformers export."""
    encoder = trained_like(tiny_objective(objective).encoder)
    save_encoder(encoder, tmp_path / "run", objective=objective, step=7, extra={"mean": MEAN, "std": STD})
    return encoder, export_transformers(tmp_path / "run", tmp_path / "hf")


@pytest.mark.parametrize("objective", ["mpp", "mae"])
def test_transformers_features_equal_timm_features(tmp_path, objective):
    encoder, out = exported(tmp_path, objective)
    model, loading = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "ViTModel"
    assert not any(loading.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        timm_tokens = encoder.forward_features(images)
        hf = model.eval()(pixel_values=images)
        timm_pooled = encoder.forward_head(timm_tokens)
    diff = (hf.last_hidden_state - timm_tokens).abs().max().item()
    print(f"{objective}: max |transformers - timm| of the final hidden states = {diff:.3g}")
    assert diff <= 1e-4
    assert (hf.pooler_output - timm_pooled).abs().max().item() <= 1e-4  # the identity pooler: timm's class token
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "vit" and config["architectures"] == ["ViTModel"]
    assert config["layer_norm_eps"] == 1e-6 and config["hidden_act"] == "gelu" and config["qkv_bias"] is True
    assert (config["image_size"], config["patch_size"], config["num_channels"]) == (16, 4, 3)
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: transformers\n")
    if objective == "mae":  # the fixed sin-cos table arrives as ViTModel's position embeddings
        torch.testing.assert_close(model.embeddings.position_embeddings.detach(), encoder.pos_embed.detach())


# (width, height) whose resized excess over the crop starts the crop at the same pixel in both libraries:
# torchvision's CenterCrop rounds (excess / 2) half to even, transformers' floors it, so an excess of 3, 7,
# 11, ... pixels starts transformers' crop one pixel earlier (docs/export.md)
@pytest.mark.parametrize("img_size,size", [(16, (16, 16)), (16, (42, 27)), (64, (77, 75))])
def test_image_processor_gives_the_eval_transform_pixels(tmp_path, img_size, size):
    from vitmpp.datasets import eval_transform, normalize_batch

    info = {"name": "vit_pico_patch4_16", "img_size": img_size, "extra": {"mean": MEAN, "std": STD}}
    config = image_processor_config(info)
    assert config["resample"] == 3 and config["do_rescale"] and config["rescale_factor"] == 1 / 255
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    # smooth content (as photographs are) plus noise: resampling filters differ most on pure noise
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([128 + 100 * np.sin(x / 5.0 + c) * np.cos(y / 7.0) for c in range(3)], axis=-1)
    image = Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
    ours = normalize_batch(eval_transform(img_size)(image)[None], MEAN, STD)
    theirs = processor(images=image, return_tensors="pt")["pixel_values"]
    assert theirs.shape == ours.shape == (1, 3, img_size, img_size)
    diff = (theirs - ours).abs()
    print(f"{img_size} px from {size}: max {diff.max():.4f}, mean {diff.mean():.5f}")
    if size == (img_size, img_size):
        assert diff.max() <= 1e-5  # nothing to resample: the same numbers
    else:  # PIL's and torchvision's bicubic filters: a rare 8-bit level apart
        assert diff.mean() <= 0.1 / 255 / min(STD) and diff.max() <= 1.01 / 255 / min(STD)


def test_image_classification_model_loads_and_trains(tmp_path):
    _, out = exported(tmp_path, "mpp")
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification.from_pretrained(out, num_labels=3)
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(12) % 3
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(pixel_values=images, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_encoders_that_do_not_map_are_refused_in_one_sentence(tmp_path):
    save_encoder(create_encoder("vit_pico_patch4_16", global_pool="avg"), tmp_path / "avg")
    with pytest.raises(UserError, match="fc_norm layout"):
        export_transformers(tmp_path / "avg", tmp_path / "out")
    save_encoder(create_encoder("vit_pico_patch4_16", class_token=False, global_pool="avg"), tmp_path / "nocls")
    with pytest.raises(UserError, match="no class token"):
        export_transformers(tmp_path / "nocls", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # average pooling with the final norm on the tokens (load_encoder's switch) maps exactly
    torch.manual_seed(0)
    save_encoder(trained_like(create_encoder("vit_pico_patch4_16")), tmp_path / "token")
    switched = load_encoder(tmp_path / "token", global_pool="avg")
    save_encoder(switched, tmp_path / "switched")
    out = export_transformers(tmp_path / "switched", tmp_path / "hf")
    model = transformers.AutoModel.from_pretrained(out).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (
            model(pixel_values=images).last_hidden_state - switched.eval().forward_features(images)
        ).abs().max() <= 1e-4


def test_command_line_errors_are_one_sentence(tmp_path):
    missing = subprocess.run(
        EXPORT + [str(tmp_path / "nowhere"), "--to", "transformers", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env(),
        cwd=tmp_path,
    )
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "No run or encoder export" in missing.stderr
    save_encoder(create_encoder("vit_pico_patch4_16", global_pool="avg"), tmp_path / "avg")
    refused = subprocess.run(
        EXPORT + [str(tmp_path / "avg"), "--to", "transformers", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env(),
        cwd=tmp_path,
    )
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "cannot be exported" in refused.stderr
    assert not (tmp_path / "o").exists()


def test_help_answers_without_importing_torch():
    started = time.perf_counter()
    result = subprocess.run(EXPORT + ["--help"], capture_output=True, text=True, env=env(), cwd=ROOT)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0 and "--to" in result.stdout and "--card" in result.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, vitmpp.models.export; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
    )
    assert probe.stdout.strip() == "False", probe.stderr
    print(f"--help: {elapsed:.2f} s")
    assert elapsed < 2.0


@pytest.mark.slow
def test_end_of_pretraining_writes_a_transformers_folder(tmp_path, digits16):
    """The real end of a (tiny, MAE) pretraining run: transformers/ loads and matches timm; the card is written."""
    run(
        python_cmd("pretrain/main.py")
        + TINY
        + ["objective=mae", "train.steps=2", f"data.shards={digits16}", "run.name=mae"],
        cwd=tmp_path,
    )
    run_dir = tmp_path / "runs" / "mae"
    hf = run_dir / "transformers"
    assert sorted(p.name for p in hf.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    encoder = load_encoder(run_dir).eval()
    model = transformers.AutoModel.from_pretrained(hf).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(hf)
    image = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8))
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        diff = (model(pixel_values=pixels).last_hidden_state - encoder.forward_features(pixels)).abs().max().item()
    assert diff <= 1e-4
    info = json.loads((run_dir / "encoder.json").read_text())
    assert processor.image_mean == pytest.approx(info["extra"]["mean"])
    assert (run_dir / "README.md").is_file() and not [
        p for p in run_dir.iterdir() if p.name.startswith(".") and p.name != ".evaluations.lock"
    ]
