"""Checkpoints from elsewhere become our encoder with the source library's features.

Each source model is built and saved here with its own library (timm, transformers,
torchvision; Google's .npz in the layout timm's reader documents; Meta's MAE release as
`{"model": state_dict}` with models_mae.py's key names), imported, and compared with the
source's own forward in fp32."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vitmpp.common.errors import UserError
from vitmpp.models.importer import detect_format, import_weights

# vit_pico_patch4_32's shapes: width 64, 2 blocks, 2 heads, patch 4, 32 px
WIDTH, DEPTH, HEADS, PATCH, SIDE = 64, 2, 2, 4, 32
TOLERANCE = 1e-5


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))


def timm_vit(heads: int = HEADS, **kwargs):
    from timm.models import VisionTransformer

    torch.manual_seed(1)
    model = VisionTransformer(
        img_size=SIDE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=heads, num_classes=0, **kwargs
    ).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a swapped or dropped tensor shows
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def our_features(encoder, x):
    with torch.no_grad():
        return encoder.eval().forward_features(x)


def assert_close(ours, theirs):
    assert ours.shape == theirs.shape
    assert float((ours - theirs).abs().max()) < TOLERANCE


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_a_timm_state_dict_imports_with_timms_features(tmp_path, suffix):
    model = timm_vit()
    file = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), file)
    else:
        torch.save(model.state_dict(), file)
    imported = import_weights(file)
    assert imported.source["format"] == "timm" and len(imported.source["sha256"]) == 64
    assert imported.mean is None and imported.normalisation_from is None  # a bare state dict states none
    assert any("attention heads assumed" in note for note in imported.notes)
    x = images()
    with torch.no_grad():
        assert_close(our_features(imported.encoder, x), model.forward_features(x))


def test_a_timm_hub_folder_gives_its_architecture_and_normalisation(tmp_path):
    model = timm_vit(heads=4)  # not the variant's 2 heads: only the folder's config can say
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architecture": "vit_pico_patch4_32",
                "num_classes": 0,
                "model_args": {"num_heads": 4},
                "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "input_size": [3, SIDE, SIDE]},
            }
        )
    )
    imported = import_weights(tmp_path)
    assert imported.source["format"] == "timm"
    assert (imported.mean, imported.std, imported.normalisation_from) == ((0.5,) * 3, (0.25,) * 3, "checkpoint config")
    x = images()
    with torch.no_grad():
        assert_close(our_features(imported.encoder, x), model.forward_features(x))


def transformers_config(**extra):
    return dict(
        hidden_size=WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=4,
        intermediate_size=4 * WIDTH,
        image_size=SIDE,
        patch_size=PATCH,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        **extra,
    )


def test_a_transformers_vitmodel_folder_imports_with_its_features(tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(2)
    model = ViTModel(ViTConfig(**transformers_config()), add_pooling_layer=False).eval()
    model.save_pretrained(tmp_path)
    imported = import_weights(tmp_path)
    assert imported.source["format"] == "transformers" and imported.encoder.blocks[0].attn.num_heads == 4
    x = images()
    with torch.no_grad():
        assert_close(our_features(imported.encoder, x), model(pixel_values=x).last_hidden_state)


def test_a_transformers_vitmae_pretraining_folder_brings_its_decoder(tmp_path):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(3)
    config = ViTMAEConfig(
        **transformers_config(),
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=128,
        mask_ratio=0.0,
    )
    model = ViTMAEForPreTraining(config).eval()
    model.save_pretrained(tmp_path)
    imported = import_weights(tmp_path)
    assert imported.source["format"] == "transformers"
    assert imported.decoder is not None and {
        "decoder_embed.weight",
        "mask_token",
        "decoder_blocks.0.attn.qkv.weight",
        "decoder_pred.weight",
    } <= set(imported.decoder)
    x = images()
    tokens = (SIDE // PATCH) ** 2
    with torch.no_grad():  # mask ratio 0 and the identity order: the encoder sees every patch in place
        theirs = model.vit(pixel_values=x, noise=torch.arange(tokens).float().expand(len(x), tokens)).last_hidden_state
    assert_close(our_features(imported.encoder, x), theirs)


def test_meta_mae_release_format_imports_encoder_and_decoder(tmp_path):
    model = timm_vit()
    decoder = {
        "decoder_embed.weight": torch.randn(32, WIDTH),
        "decoder_embed.bias": torch.zeros(32),
        "mask_token": torch.zeros(1, 1, 32),
        "decoder_pos_embed": torch.zeros(1, 65, 32),
    }
    torch.save({"model": {**model.state_dict(), **decoder}}, tmp_path / "mae_visualize_vit_pico.pth")
    torch.save({"model": model.state_dict()}, tmp_path / "mae_pretrain_vit_pico.pth")
    with_decoder = import_weights(tmp_path / "mae_visualize_vit_pico.pth")
    encoder_only = import_weights(tmp_path / "mae_pretrain_vit_pico.pth")
    assert with_decoder.source["format"] == encoder_only.source["format"] == "mae"
    assert set(with_decoder.decoder) == set(decoder) and encoder_only.decoder is None
    assert with_decoder.normalisation_from == "release" and with_decoder.mean == (0.485, 0.456, 0.406)
    x = images()
    with torch.no_grad():
        for imported in (with_decoder, encoder_only):
            assert_close(our_features(imported.encoder, x), model.forward_features(x))


def google_npz(model, file):
    """`model`'s weights in the ViT paper's release layout (google-research/vision_transformer),
    the layout timm's `_load_weights` reads: kernels transposed to JAX's order, q/k/v per head."""
    s = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    heads, head_dim = HEADS, WIDTH // HEADS
    out = {
        "embedding/kernel": s["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": s["patch_embed.proj.bias"],
        "cls": s["cls_token"],
        "Transformer/posembed_input/pos_embedding": s["pos_embed"],
        "Transformer/encoder_norm/scale": s["norm.weight"],
        "Transformer/encoder_norm/bias": s["norm.bias"],
    }
    for i in range(DEPTH):
        b, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        out[f"{b}LayerNorm_0/scale"], out[f"{b}LayerNorm_0/bias"] = s[f"{t}norm1.weight"], s[f"{t}norm1.bias"]
        out[f"{b}LayerNorm_2/scale"], out[f"{b}LayerNorm_2/bias"] = s[f"{t}norm2.weight"], s[f"{t}norm2.bias"]
        qkv_w, qkv_b = s[f"{t}attn.qkv.weight"], s[f"{t}attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            w = qkv_w[j * WIDTH : (j + 1) * WIDTH]  # [out, in] -> [in, heads, head_dim]
            out[f"{b}MultiHeadDotProductAttention_1/{name}/kernel"] = w.T.reshape(WIDTH, heads, head_dim)
            out[f"{b}MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j * WIDTH : (j + 1) * WIDTH].reshape(
                heads, head_dim
            )
        out[f"{b}MultiHeadDotProductAttention_1/out/kernel"] = s[f"{t}attn.proj.weight"].T.reshape(
            heads, head_dim, WIDTH
        )
        out[f"{b}MultiHeadDotProductAttention_1/out/bias"] = s[f"{t}attn.proj.bias"]
        out[f"{b}MlpBlock_3/Dense_0/kernel"], out[f"{b}MlpBlock_3/Dense_0/bias"] = (
            s[f"{t}mlp.fc1.weight"].T,
            s[f"{t}mlp.fc1.bias"],
        )
        out[f"{b}MlpBlock_3/Dense_1/kernel"], out[f"{b}MlpBlock_3/Dense_1/bias"] = (
            s[f"{t}mlp.fc2.weight"].T,
            s[f"{t}mlp.fc2.bias"],
        )
    np.savez(file, **out)


def test_google_npz_imports_with_the_heads_its_shapes_give(tmp_path):
    model = timm_vit()
    google_npz(model, tmp_path / "ViT-pico_4.npz")
    imported = import_weights(tmp_path / "ViT-pico_4.npz")
    assert imported.source["format"] == "npz" and imported.encoder.blocks[0].attn.num_heads == HEADS
    assert imported.mean == (0.5, 0.5, 0.5) and imported.normalisation_from == "release"
    x = images()
    with torch.no_grad():
        assert_close(our_features(imported.encoder, x), model.forward_features(x))


def test_a_torchvision_vit_imports_with_its_class_token_feature(tmp_path):
    from torchvision.models import VisionTransformer

    torch.manual_seed(4)
    model = VisionTransformer(
        image_size=SIDE,
        patch_size=PATCH,
        num_layers=DEPTH,
        num_heads=HEADS,
        hidden_dim=WIDTH,
        mlp_dim=4 * WIDTH,
        num_classes=10,
    ).eval()
    torch.save(model.state_dict(), tmp_path / "vit_pico_4.pth")
    imported = import_weights(tmp_path / "vit_pico_4.pth")
    assert imported.source["format"] == "torchvision"
    model.heads = torch.nn.Identity()  # its forward then returns the class token after the final norm
    x = images()
    with torch.no_grad():
        assert_close(our_features(imported.encoder, x)[:, 0], model(x))


def test_our_own_export_still_imports(tmp_path):
    from vitmpp.models.encoder import create_encoder
    from vitmpp.models.weights import save_encoder

    encoder = create_encoder("vit_pico_patch4_16")
    save_encoder(encoder, tmp_path, extra={"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]})
    imported = import_weights(tmp_path)
    assert imported.source["format"] == detect_format(tmp_path) == "vitmpp"
    assert imported.mean == (0.1, 0.2, 0.3)
    x = torch.randn(2, 3, 16, 16)
    assert_close(our_features(imported.encoder, x), our_features(encoder, x))


def test_a_different_resolution_resamples_the_position_embeddings(tmp_path):
    model = timm_vit()
    save_file(model.state_dict(), tmp_path / "vit.safetensors")
    imported = import_weights(tmp_path / "vit.safetensors", img_size=48)
    assert imported.encoder.pos_embed.shape == (1, 1 + (48 // PATCH) ** 2, WIDTH)
    assert imported.encoder(torch.randn(1, 3, 48, 48)).shape == (1, WIDTH)


# ----------------------------------------------------------------------------- refusals


class _Touch:
    """Unpickling this object would create `path` (what a hostile checkpoint does, without a shell)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "evil.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 8)}, "trap": _Touch(str(marker))}, bad)
    # the trap is real: an unrestricted unpickler (torch.load(weights_only=False)) creates the file
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(bad)!r}, weights_only=False)"],
        capture_output=True,
        check=True,
    )
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserError, match=r"evil\.pth hold more than tensors.*weights_only=True"):
        import_weights(bad)
    assert not marker.exists()


def test_a_pickled_trap_object_as_the_whole_file_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "ran"
    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes(pickle.dumps(_Touch(str(marker))))
    with pytest.raises(UserError, match="hold more than tensors"):
        import_weights(bad)
    assert not marker.exists()


@pytest.mark.parametrize(
    "extra, reason",
    [
        ({"reg_reg": None}, "register tokens"),
        ({"class_token": False, "global_pool": "avg"}, "no class token"),
        ({"init_values": 1e-5}, "layer scale"),
        ({"qk_norm": True}, "qk-norm"),
    ],
)
def test_what_our_encoder_cannot_hold_is_refused_by_name(tmp_path, extra, reason):
    kwargs = {"reg_tokens": 2} if "reg_reg" in extra else extra
    model = timm_vit(**kwargs)
    save_file(model.state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(UserError, match=reason):
        import_weights(tmp_path / "vit.safetensors")


def test_a_wrong_architecture_names_the_first_mismatched_key_and_both_shapes(tmp_path):
    model = timm_vit()
    save_file(model.state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(
        UserError,
        match=r"do not fit a patch-16 width-384 depth-12 6-head encoder: 'cls_token' has "
        r"shape \(1, 1, 64\), the encoder's is \(1, 1, 384\)",
    ):
        import_weights(tmp_path / "vit.safetensors", name="vit_small_patch16_224")


def test_an_unknown_checkpoint_says_which_formats_exist(tmp_path):
    save_file({"conv1.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "resnet.safetensors")
    with pytest.raises(UserError, match="not a ViT checkpoint vitmpp knows.*'conv1.weight'.*formats: vitmpp, timm"):
        import_weights(tmp_path / "resnet.safetensors")


def test_a_transformers_vitmae_checkpoint_continues_as_our_mae_with_its_loss(tmp_path):
    """ViTMAEForPreTraining saved by transformers, imported with its decoder into our MAE objective
    (model.init_parts=all): the same masks give transformers' own loss and reconstruction."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from models_helpers import normalise, uint8_images
    from vitmpp.models import create_objective
    from vitmpp.models.encoder import create_encoder
    from vitmpp.models.importer import initialise_from

    torch.manual_seed(5)
    config = ViTMAEConfig(
        **{**transformers_config(), "num_attention_heads": HEADS},
        decoder_hidden_size=32,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=128,
        mask_ratio=0.75,
        norm_pix_loss=True,
        qkv_bias=True,
    )
    peer = ViTMAEForPreTraining(config).eval()
    with torch.no_grad():  # transformers 5 leaves the fixed tables at zero after init: give them values to carry
        peer.vit.embeddings.position_embeddings.normal_(0, 0.1)
        peer.decoder.decoder_pos_embed.normal_(0, 0.1)
        peer.decoder.mask_token.normal_(0, 0.1)
    peer.save_pretrained(tmp_path)

    objective = create_objective(
        "mae",
        create_encoder("vit_pico_patch4_32"),
        decoder_embed_dim=32,
        decoder_depth=2,
        decoder_num_heads=2,
        norm_pix_loss=True,
    ).eval()
    record = initialise_from(objective, tmp_path, parts="all")
    assert record["format"] == "transformers" and record["parts"] == ["encoder", "decoder"]
    pixels = uint8_images(3, size=SIDE, seed=1)
    noise = torch.rand(3, (SIDE // PATCH) ** 2)
    with torch.no_grad():
        ours = objective(pixels, noise=noise)
        theirs = peer(pixel_values=normalise(pixels), noise=noise)
    assert torch.equal(ours.extras["mask"], theirs.mask)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.extras["prediction"], theirs.logits, rtol=0, atol=1e-4)


def test_init_parts_all_without_the_objectives_parts_is_one_sentence(tmp_path):
    from vitmpp.models import create_objective
    from vitmpp.models.encoder import create_encoder
    from vitmpp.models.importer import initialise_from

    save_file(timm_vit().state_dict(), tmp_path / "vit.safetensors")
    objective = create_objective("mpp", create_encoder("vit_pico_patch4_32"))
    with pytest.raises(
        UserError,
        match=r"^model\.init_parts=all: .* holds no weights for the .*'s own parts .*; use "
        r"model\.init_parts=encoder\.$",
    ):
        initialise_from(objective, tmp_path / "vit.safetensors", parts="all")
    record = initialise_from(objective, tmp_path / "vit.safetensors")  # the encoder alone is fine
    assert record["parts"] == ["encoder"]
    assert torch.equal(objective.encoder.blocks[0].attn.qkv.weight, timm_vit().blocks[0].attn.qkv.weight)
