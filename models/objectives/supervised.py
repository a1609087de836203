"""Supervised pretraining: the same encoder, a classification head, cross-entropy on labels.

This is the baseline the self-supervised objectives are compared with
(supervised pretraining on the same shards, by the same engine). The head is a
linear layer on the encoder's pooled feature (class token or average pool, as
the encoder's `global_pool` says, through timm's `forward_head`), initialised
to zero as the ViT paper does for new heads; it is not part of the exported
encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models import VisionTransformer
from torch import Tensor, nn
from torchvision.utils import make_grid

from vitmpp.common.config import param
from vitmpp.common.errors import UserError

from ..objective import IMAGENET_MEAN, IMAGENET_STD, Objective, ObjectiveOutput, Visualization, pick, register_objective


@dataclass
class SupervisedConfig:
    label_smoothing: float = param(0.0, ge=0, lt=1, help="label smoothing of the cross-entropy")


@register_objective("supervised", SupervisedConfig)
class SupervisedObjective(Objective):
    """Encoder -> pooled feature -> zero-initialised linear head -> cross-entropy."""

    title = "supervised classification"
    paper = 'Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale"'
    arxiv = "2010.11929"
    description = (
        "the encoder and a linear head are trained with cross-entropy on the shards' labels "
        "(the supervised-pretraining baseline)."
    )
    self_supervised = False
    uses_labels = True

    def __init__(
        self,
        encoder: VisionTransformer,
        config: SupervisedConfig,
        *,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_classes: int | None = None,
    ):
        super().__init__(encoder, config, mean=mean, std=std, num_classes=num_classes)
        if num_classes is None or num_classes < 2:
            raise UserError(
                f"The supervised objective needs labelled data with at least 2 classes, got num_classes={num_classes}; "
                "use shards whose manifest lists the classes."
            )
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.zeros_(self.head.weight)  # ViT paper: new heads start at zero
        nn.init.zeros_(self.head.bias)

    def logits(self, pixels: Tensor) -> Tensor:
        """pixels [B, 3, H, W] in [0, 1] -> [B, num_classes]."""
        features = self.encoder.forward_features(self.normalize(pixels))
        return self.head(self.encoder.forward_head(features, pre_logits=True))

    def forward(self, pixels: Tensor, labels: Tensor | None = None) -> ObjectiveOutput:
        """pixels [B, 3, H, W] in [0, 1], labels [B] long class indices."""
        if labels is None:
            raise UserError("The supervised objective needs labels with every batch; the data gave none.")
        logits = self.logits(pixels).float()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)
        predicted = logits.detach().argmax(dim=-1)
        return ObjectiveOutput(
            loss=loss,
            extras={
                "prediction": predicted,
                "labels": labels.detach(),
                "accuracy": (predicted == labels).float().mean(),
            },
        )

    @torch.no_grad()
    def visualize(self, pixels: Tensor, output: ObjectiveOutput, max_images: int = 8) -> Visualization:
        """The images, framed green where the prediction is right and red where it is wrong."""
        n = pick(pixels, max_images)
        image01 = pixels[:n].float().cpu()
        predicted = output.extras["prediction"][:n].cpu()
        labels = output.extras["labels"][:n].cpu()
        right = predicted == labels
        frame = torch.where(right[:, None], torch.tensor([0.1, 0.8, 0.1]), torch.tensor([0.9, 0.1, 0.1]))
        border = max(1, image01.shape[-1] // 16)
        framed = (
            frame[:, :, None, None]
            .expand(-1, -1, image01.shape[-2] + 2 * border, image01.shape[-1] + 2 * border)
            .clone()
        )
        framed[:, :, border:-border, border:-border] = image01
        grid = make_grid(framed, nrow=min(n, 8), padding=1, pad_value=1.0)
        pairs = ", ".join(f"{int(p)}/{int(t)}" for p, t in zip(predicted, labels))
        caption = (
            f"supervised: green frame = correct, red = wrong; predicted/true class, left to right: {pairs}; "
            f"batch accuracy {100 * float(output.extras['accuracy']):.1f}%"
        )
        # one row of images: each column's label is its prediction and truth (more rows: the caption says it)
        columns = [f"pred {int(p)} true {int(t)}" for p, t in zip(predicted, labels)] if n <= 8 else []
        return Visualization(grid=grid.clamp(0, 1), caption=caption, columns=columns)


__all__ = ["SupervisedConfig", "SupervisedObjective"]
