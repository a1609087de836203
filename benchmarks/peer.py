"""Row: our MAE step against Hugging Face `transformers.ViTMAEForPreTraining`, same configuration.

Same encoder and decoder sizes, mask ratio, norm_pix_loss, batch, precision,
threads and optimizer (timm's fused AdamW); runs alternate A/B and the ratio of
medians is reported with the min-max of the per-round ratios. Goal: >= 1.0 on CPU,
>= 1.3 on GPU. transformers is a benchmark/test-only dependency (the dev extra).
"""

from __future__ import annotations

from .harness import Row, Settings, alternate, fmt_ratio, speed_ratio, verdict
from .steps import autocast, build_objective, fixed_batch, make_step

GOAL = {"cpu": 1.0, "cuda": 1.3}


def peer_model(objective, img_size: int):
    """transformers' ViTMAEForPreTraining with the architecture and options of our MAE `objective`."""
    import transformers

    enc, cfg = objective.encoder, objective.config
    config = transformers.ViTMAEConfig(
        hidden_size=enc.embed_dim,
        num_hidden_layers=len(enc.blocks),
        num_attention_heads=enc.blocks[0].attn.num_heads,
        intermediate_size=enc.blocks[0].mlp.fc1.out_features,
        image_size=img_size,
        patch_size=objective.patch_size,
        decoder_hidden_size=cfg.decoder_embed_dim,
        decoder_num_hidden_layers=cfg.decoder_depth,
        decoder_num_attention_heads=cfg.decoder_num_heads,
        decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.decoder_mlp_ratio),
        layer_norm_eps=1e-6,
        norm_pix_loss=cfg.norm_pix_loss,
        mask_ratio=cfg.mask_ratio,
        qkv_bias=True,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.ViTMAEForPreTraining(config), getattr(config, "_attn_implementation", None)


class _PeerLoss:
    """Adapter: transformers' model behind our `model(images, labels).loss` call."""

    def __init__(self, model):
        self.model = model

    def __call__(self, images, labels=None):
        return self.model(pixel_values=images)

    def parameters(self):
        return self.model.parameters()


def peer_rows(settings: Settings, compiled: bool = False) -> list[Row]:
    import torch

    from .steps import make_optimizer

    encoder, img = settings.encoder, settings.img_size
    ours = build_objective("mae", encoder, img, mae_decoder=settings.mae_decoder, device=settings.device)
    theirs, attn_impl = peer_model(ours, img)
    theirs = theirs.to(settings.device).train()
    images, labels = fixed_batch(settings.batch, img, settings.device)
    our_step = make_step(ours, images, labels, precision=settings.precision, compile_model=compiled)
    peer_forward = _PeerLoss(torch.compile(theirs) if compiled else theirs)
    optimizer = make_optimizer(theirs)

    def their_step() -> None:
        with autocast(settings.device, settings.precision):
            output = peer_forward(images)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = alternate(
        {"vitmpp": our_step, "transformers": their_step},
        rounds=max(settings.rounds, 3),
        calls=settings.steps,
        warmup=settings.warmup,
        device=settings.device,
    )
    ratio = speed_ratio(seconds["vitmpp"], seconds["transformers"])
    ours_ips = settings.batch / sorted(seconds["vitmpp"])[len(seconds["vitmpp"]) // 2]
    theirs_ips = settings.batch / sorted(seconds["transformers"])[len(seconds["transformers"]) // 2]
    params_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    params_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    tag = " +compile" if compiled else ""
    note = (
        f"MAE {encoder} @{img}px, decoder {settings.mae_decoder}, batch {settings.batch}, {settings.precision}, "
        f"{settings.threads if settings.device == 'cpu' else 'GPU'} threads; ours {ours_ips:.3g} img/s, theirs "
        f"{theirs_ips:.3g} img/s ({attn_impl} attention); {fmt_ratio(ratio)}; "
        f"{verdict(ratio[0], GOAL.get(settings.device, 1.0))}; trainable params ours {params_ours:,} / theirs "
        f"{params_theirs:,}"
    )
    return [
        Row(
            "peer",
            f"vitmpp MAE / transformers ViTMAE{tag}",
            ratio[0],
            "x",
            note,
            {"seconds": seconds, "rounds": list(ratio), "attn_implementation": attn_impl},
        )
    ]
