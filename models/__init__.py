"""The ViT encoder and the pretraining objectives (`vitmpp.models`).

* `create_encoder`, `EncoderConfig`, `encoder_from_config`, `ENCODER_VARIANTS`:
  timm `VisionTransformer` encoders by name (encoder.py);
* `create_objective` and the registry: `mpp` (ViT paper, appendix B.1.2),
  `mae` (He et al.), `supervised` (objective.py, mpp.py, mae.py, supervised.py);
* `save_encoder` / `load_encoder` / `read_encoder_info`: safetensors exports (export.py);
* `flops_per_image`: training FLOPs for MFU (flops.py).
"""
from .encoder import (
    ENCODER_VARIANTS,
    EncoderConfig,
    create_encoder,
    encoder_from_config,
    encoder_spec,
    mae_sincos_pos_embed,
    set_sincos_pos_embed,
)
from .export import describe_encoder, load_encoder, read_encoder_info, save_encoder
from .flops import flops_per_image
from .mae import MAEConfig, MAEObjective, random_masking
from .mpp import MPPConfig, MPPObjective, mean_color_target
from .objective import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Objective,
    ObjectiveOutput,
    Visualization,
    create_objective,
    objective_config_class,
    objective_names,
    register_objective,
)
from .patches import patchify, unpatchify
from .supervised import SupervisedConfig, SupervisedObjective

__all__ = [
    "ENCODER_VARIANTS", "EncoderConfig", "create_encoder", "encoder_from_config", "encoder_spec",
    "mae_sincos_pos_embed", "set_sincos_pos_embed",
    "describe_encoder", "load_encoder", "read_encoder_info", "save_encoder",
    "flops_per_image",
    "MAEConfig", "MAEObjective", "random_masking",
    "MPPConfig", "MPPObjective", "mean_color_target",
    "IMAGENET_MEAN", "IMAGENET_STD", "Objective", "ObjectiveOutput", "Visualization",
    "create_objective", "objective_config_class", "objective_names", "register_objective",
    "patchify", "unpatchify",
    "SupervisedConfig", "SupervisedObjective",
]
