"""The ViT encoder and the pretraining objectives (`vitmpp.models`).

* `create_encoder`, `EncoderConfig`, `encoder_from_config`, `ENCODER_VARIANTS`:
  timm `VisionTransformer` encoders by name (encoder.py);
* `create_objective` and the registry (objective.py); the objectives, one file each in
  objectives/: `mpp` (ViT paper, appendix B.1.2), `mae` (He et al.), `simmim` (Xie et al.),
  `supervised`;
* `save_encoder` / `load_encoder` / `read_encoder_info`: safetensors exports (weights.py; the
  command line `python -m vitmpp.models.export` is export.py);
* `export_transformers`, `write_card`, `record_evaluation`: the transformers folder and the
  model card (hub.py, card.py);
* `flops_per_image`: training FLOPs for MFU (flops.py).
"""

from vitmpp.common.lazy import lazy_exports

# Imported on first use (common/lazy.py): `python -m vitmpp.models.export --help` must not wait for torch.
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(
            [
                "ENCODER_VARIANTS",
                "EncoderConfig",
                "create_encoder",
                "encoder_from_config",
                "encoder_spec",
                "mae_sincos_pos_embed",
                "set_sincos_pos_embed",
            ],
            ".encoder",
        ),
        **dict.fromkeys(["describe_encoder", "load_encoder", "read_encoder_info", "save_encoder"], ".weights"),
        **dict.fromkeys(["export_transformers", "record_evaluation", "write_card"], ".hub"),
        "render_card": ".card",
        "flops_per_image": ".flops",
        **dict.fromkeys(["MAEConfig", "MAEObjective", "random_masking"], ".objectives.mae"),
        **dict.fromkeys(["MPPConfig", "MPPObjective", "mean_color_target"], ".objectives.mpp"),
        **dict.fromkeys(
            [
                "IMAGENET_MEAN",
                "IMAGENET_STD",
                "Objective",
                "ObjectiveOutput",
                "Visualization",
                "create_objective",
                "objective_config_class",
                "objective_facts",
                "objective_names",
                "register_objective",
            ],
            ".objective",
        ),
        **dict.fromkeys(["patchify", "unpatchify"], ".patches"),
        **dict.fromkeys(["SupervisedConfig", "SupervisedObjective"], ".objectives.supervised"),
    },
)
