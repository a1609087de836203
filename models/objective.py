"""The objective registry and the base class every pretraining objective derives from.

An objective is an `nn.Module` that owns the encoder plus whatever it needs on
top (a prediction head, a decoder, mask tokens, a teacher). Its
`forward(pixels, labels)` takes a batch of pixels in [0, 1] and returns an
`ObjectiveOutput`: the scalar loss and the tensors its `visualize` needs.

Adding an objective is one new file in `models/objectives/`, named after it, with
one registered class and nothing else to edit::

    # models/objectives/name.py
    @register_objective("name", NameConfig)   # NameConfig: its options section (param() help, check())
    class NameObjective(Objective): ...       # first docstring line: its help in --help-config

The registry is that folder: `objective_names()` lists its file names (importing
nothing, so the names are known without torch) and `objective_class(name)` imports
`models/objectives/<name>.py` alone. A class registered from elsewhere (a test, a
user's module imported before the config is loaded) is known too.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from timm.models import VisionTransformer
from torch import Tensor, nn

from vitmpp.common.config import from_dict, to_dict
from vitmpp.common.errors import UserError

from .objectives import PACKAGE, builtin_objective_names


@dataclass
class ObjectiveOutput:
    """`loss`: scalar float32 tensor (what the optimizer minimises); `extras`: detached tensors for
    `visualize` and logs."""

    loss: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Visualization:
    """An objective's picture of a batch.

    `grid`: float [3, H, W] in [0, 1], a torchvision `make_grid` of equal tiles with
    `padding` pixels around each; `caption`: what the rows and columns show, in full;
    `columns`: a short label per column of tiles, left to right, which `labelled()`
    draws above the grid (what TensorBoard shows).
    """

    grid: Tensor
    caption: str
    columns: list[str] = field(default_factory=list)
    padding: int = 1

    def labelled(self, min_tile_pixels: int = 96) -> Tensor:
        """The grid enlarged (nearest neighbour, by a whole factor) until a tile is at least
        `min_tile_pixels` wide, under a header row holding each column's label: float [3, H', W']."""
        grid = self.grid.detach().float().cpu().clamp(0, 1)
        if not self.columns:
            return grid
        tile = (grid.shape[-1] - self.padding) / len(self.columns) - self.padding
        factor = max(1, math.ceil(min_tile_pixels / max(tile, 1.0)))
        if factor > 1:
            grid = grid.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)
        return label_columns(grid, self.columns, self.padding * factor)


_REGISTRY: dict[str, tuple[type[Objective], type]] = {}


def register_objective(name: str, config_cls: type) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: make an `Objective` subclass available as `create_objective(name, ...)`."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config class of objective '{name}' must be a dataclass")

    def decorate(cls: type[Objective]) -> type[Objective]:
        if name in _REGISTRY and _REGISTRY[name][0] is not cls:
            raise ValueError(f"objective '{name}' is registered twice ({_REGISTRY[name][0].__name__}, {cls.__name__})")
        cls.objective_name = name
        cls.config_class = config_cls
        _REGISTRY[name] = (cls, config_cls)
        return cls

    return decorate


def objective_names() -> list[str]:
    """Every objective's name: the files of models/objectives/ and any class registered from elsewhere."""
    return sorted(set(builtin_objective_names()) | set(_REGISTRY))


def objective_class(name: str) -> type[Objective]:
    """The registered `Objective` subclass called `name` (UserError listing the known names if unknown)."""
    return _lookup(name)[0]


def objective_summary(name: str) -> str:
    """The first line of the objective class's docstring: its one-line help."""
    doc = (objective_class(name).__doc__ or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else name


def _lookup(name: str) -> tuple[type[Objective], type]:
    if name not in _REGISTRY and name in builtin_objective_names():
        importlib.import_module(f"{PACKAGE}.{name}")  # its @register_objective runs
        if name not in _REGISTRY:
            raise TypeError(f"models/objectives/{name}.py registers no objective named '{name}'")
    if name not in _REGISTRY:
        names = objective_names()
        hint = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
        tail = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise UserError(f"Unknown objective '{name}'{tail}; known objectives: {', '.join(names)}.")
    return _REGISTRY[name]


def objective_config_class(name: str) -> type:
    """The config dataclass of objective `name` (UserError listing the known names if unknown)."""
    return _lookup(name)[1]


def create_objective(
    name: str,
    encoder: VisionTransformer,
    config: Any = None,
    *,
    mean: tuple[float, float, float] | list[float] = IMAGENET_MEAN,
    std: tuple[float, float, float] | list[float] = IMAGENET_STD,
    num_classes: int | None = None,
    **options: Any,
) -> Objective:
    """Build objective `name` around `encoder`.

    `config`: an instance of the objective's config class, already validated (the
    pretraining config's section of that name: `load_config` checked it); or None, and
    then `options` (plain values of its fields, the rest defaults) are validated into
    one here, with one-sentence errors. `mean`/`std`: the normalisation of the
    encoder's input, which the objective applies (`Objective.normalize`).
    `num_classes` is used by objectives that classify (supervised).
    """
    cls, config_cls = _lookup(name)
    if config is None:
        config = from_dict(config_cls, options, source=f"the options of objective '{name}'")
    elif options or not isinstance(config, config_cls):
        raise TypeError(f"create_objective('{name}'): pass a {config_cls.__name__} or options, not both")
    return cls(
        encoder, config, mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std), num_classes=num_classes
    )


class Objective(nn.Module):
    """Base class: an encoder plus an objective-specific loss.

    Subclasses implement `forward(pixels, labels=None) -> ObjectiveOutput` and
    `visualize(pixels, output, max_images=8) -> Visualization`, list their own
    no-decay parameters in `_own_no_weight_decay`, and set the class attributes
    below (the model card, `--help-config` and the stage read them; nothing else
    keeps a list of objectives).

    Normalisation has one owner, the objective: `forward` gets pixels in [0, 1]
    (float32 [B, 3, H, W]; the stage only turns the loader's uint8 into them) and
    `normalize(pixels)` makes the encoder's input with the mean/std it was built
    with. The objective is the one that knows which pixels its targets are made of:
    MPP's colour classes and every picture come from the pixels themselves, MAE's and
    SimMIM's targets from the normalised input, a teacher's from its own features.
    Normalising in the stage made every objective undo it (and MPP's colour bins
    absorb the float error of the round trip).

    Hooks, with their defaults (the loop, the export and the online evaluation call them):

    * `exported_module()`: the network written to encoder.safetensors (default: the
      encoder); a timm `VisionTransformer` that is a submodule of this objective;
    * `feature_encoder()`: the network whose features the online kNN and the analysis
      figures read (default: the encoder); it takes `normalize(pixels)`;
    * `set_run_length(total_steps)`: called once before the first step of every
      process, fresh or resumed (`train.steps` may change on resume), before any
      `after_optimizer_step`: e.g. for an EMA rate annealed over the run;
    * `after_optimizer_step(step)`: after optimizer step `step` (1-based), applied or
      skipped: e.g. an EMA teacher update;
    * `training_transform(img_size, data)`: its own per-sample training transform.

    Randomness (what exact and elastic resume rest on): every random draw of
    `forward` (masks, corruption, noise) comes from torch's global generator of the
    input's device, e.g. `torch.rand(b, n, device=pixels.device)`. The loop
    checkpoints those generators for every logical rank and swaps them per hosted
    rank; a private `torch.Generator` is in no checkpoint and no swap, so a resumed
    or re-sharded run would draw other masks (tests/test_models_rng.py fails such an
    objective). State that must survive a resume (a teacher's weights, an EMA's
    buffers) is a parameter or persistent buffer, so it is in `state_dict()`.
    """

    objective_name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    #: Short name for titles ("masked patch prediction").
    title: ClassVar[str] = ""
    #: The paper: authors, year, title, section where it applies.
    paper: ClassVar[str] = ""
    #: The paper's arXiv id ("2010.11929"), "" when none.
    arxiv: ClassVar[str] = ""
    #: One or two sentences for the model card: what the objective does to an image.
    description: ClassVar[str] = ""
    #: Trained without labels (the model card's `self-supervised` tag).
    self_supervised: ClassVar[bool] = True
    #: Reads the labels of the training data (the model card says so).
    uses_labels: ClassVar[bool] = False
    #: Hugging Face Hub tags of the model card beyond vitmpp's own ("masked-image-modeling").
    hub_tags: ClassVar[tuple[str, ...]] = ()
    #: Options of the embedded CPU demo (`pretrain/main.py objective=NAME` with no config file),
    #: laid over the config class's defaults (which are the paper's).
    embedded_options: ClassVar[dict[str, Any]] = {}
    encoder: VisionTransformer

    def __init__(
        self,
        encoder: VisionTransformer,
        config: Any,
        *,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_classes: int | None = None,
    ):
        super().__init__()
        if not isinstance(encoder, VisionTransformer):
            raise UserError(f"Objectives need a timm VisionTransformer encoder, got {type(encoder).__name__}.")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise UserError(
                f"Normalisation mean/std must be three numbers each (std > 0), got {list(mean)} / {list(std)}."
            )
        self.encoder = encoder
        self.config = config
        self.num_classes = num_classes
        self.norm_mean = tuple(float(m) for m in mean)
        self.norm_std = tuple(float(s) for s in std)
        # non-persistent: the normalisation is config, not state; it follows .to(device)
        self.register_buffer("pixel_mean", torch.tensor(self.norm_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.norm_std).view(1, 3, 1, 1), persistent=False)

    def require_every_patch(self, name: str, verb: str) -> None:
        """For objectives that predict at patch positions: the encoder must keep its fixed grid and
        every patch (no dynamic image size, no patch dropout), or the positions would not line up.
        `name`: the objective's name in the sentence; `verb`: what it does with the patches."""
        if self.encoder.dynamic_img_size:
            raise UserError(f"{name} needs an encoder with a fixed image size (dynamic_img_size=False).")
        if not isinstance(self.encoder.patch_drop, nn.Identity):
            raise UserError(f"{name} {verb}, so the encoder must not drop patches (patch_drop_rate=0).")

    # ---- what subclasses provide
    def forward(self, pixels: Tensor, labels: Tensor | None = None) -> ObjectiveOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def visualize(
        self, pixels: Tensor, output: ObjectiveOutput, max_images: int = 8
    ) -> Visualization:  # pragma: no cover
        raise NotImplementedError

    # ---- hooks (the loop, the export and the evaluation call them; the defaults are the encoder's)
    def exported_module(self) -> VisionTransformer:
        """The network the run exports (encoder.safetensors, the transformers folder): the encoder."""
        return self.encoder

    def feature_encoder(self) -> VisionTransformer:
        """The network whose features the online kNN and the analysis figures read: the encoder."""
        return self.encoder

    def set_run_length(self, total_steps: int) -> None:
        """The run's optimizer steps, told before the first step of every process (fresh or resumed)."""

    def after_optimizer_step(self, step: int) -> None:
        """Called after optimizer step `step` (1-based), applied or skipped: e.g. an EMA teacher update."""

    @classmethod
    def training_transform(cls, img_size: int, data: Any) -> Callable | None:
        """This objective's own per-sample training transform (PIL image -> uint8 tensor), or None for
        the stage's default (MAE's RandomResizedCrop + flip from `data.crop_scale`, `data.hflip`)."""
        return None

    # ---- shared helpers
    def normalize(self, pixels: Tensor) -> Tensor:
        """The encoder's input: float32 (pixels - mean) / std, [B, 3, H, W] (pixels in [0, 1])."""
        return (pixels.float() - self.pixel_mean) / self.pixel_std

    def denormalize(self, normalized: Tensor) -> Tensor:
        """Pixels in [0, 1] of something made in the normalised space (a reconstruction), [B, 3, H, W]."""
        return (normalized.float() * self.pixel_std + self.pixel_mean).clamp(0.0, 1.0)

    def exported_state_dict(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The part of this objective's full `state` (its `state_dict()`, or a gathered one: keys may carry
        torch.compile's `_orig_mod.`) that is `exported_module()`'s, with its keys."""
        exported = self.exported_module()
        path = next((name for name, module in self.named_modules() if module is exported), None)
        if not path:
            raise TypeError(f"{type(self).__name__}.exported_module() is not a submodule of the objective")
        prefix = path + "."
        weights = {}
        for key, value in state.items():
            key = key.replace("_orig_mod.", "")
            if key.startswith(prefix):
                weights[key[len(prefix) :]] = value
        return weights

    def options(self) -> dict:
        """The objective's options as plain values (what `create_objective` takes back)."""
        return to_dict(self.config)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that get no weight decay.

        The encoder's position embedding and class/register tokens, plus what the
        subclass adds in `_own_no_weight_decay` (mask tokens, decoder position
        embeddings). Biases and norms are skipped by timm's optimizer factory by
        their ndim anyway.
        """
        names = {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | set(self._own_no_weight_decay())
        existing = {n for n, _ in self.named_parameters()}
        return names & existing

    def _own_no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for timm's layer-wise lr decay: encoder stem, encoder blocks; heads and decoders last."""
        # no capture groups in the stem: timm reads captured numbers as layer ids
        stem = "|".join([r"^encoder\.(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)", *self._stem_patterns()])
        return dict(stem=stem, blocks=[(r"^encoder\.blocks\.(\d+)", None), (r"^encoder\.norm", (99999,))])

    def _stem_patterns(self) -> list[str]:
        """Regexes of the subclass's parameters that belong with the encoder's input layers (e.g. MPP's [mask])."""
        return []

    def extra_repr(self) -> str:
        return f"objective={self.objective_name!r}, config={self.config}"


def objective_facts(name: str) -> dict[str, Any] | None:
    """What the model card says about objective `name` (its class attributes), None if it is unknown."""
    try:
        cls = objective_class(name)
    except UserError:
        return None
    return {
        "title": cls.title or name,
        "paper": cls.paper,
        "arxiv": cls.arxiv,
        "description": cls.description,
        "self_supervised": cls.self_supervised,
        "uses_labels": cls.uses_labels,
        "hub_tags": list(cls.hub_tags),
    }


# ----------------------------------------------------------------------------- shared visualisation helpers


def pick(images: Tensor, max_images: int) -> int:
    """How many images of the batch to draw."""
    return max(1, min(int(max_images), images.shape[0]))


def paint_patches(images01: Tensor, patch_values: Tensor, where: Tensor, patch_size: int) -> Tensor:
    """Copy of `images01` [B, 3, H, W] with patch i replaced by `patch_values[:, i]` where `where[:, i]`.

    `patch_values`: [B, N, 3] (a flat colour) or [B, N, 3, p, p]; `where`: bool [B, N], row-major.
    """
    b, _, h, w = images01.shape
    gh, gw = h // patch_size, w // patch_size
    if patch_values.dim() == 3:
        patch_values = patch_values[..., None, None].expand(-1, -1, -1, patch_size, patch_size)
    painted = patch_values.reshape(b, gh, gw, 3, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, h, w)
    mask = where.reshape(b, 1, gh, 1, gw, 1).expand(-1, 1, -1, patch_size, -1, patch_size).reshape(b, 1, h, w)
    return torch.where(mask, painted.to(images01.dtype), images01)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font where Pillow has FreeType
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: float) -> list[str]:
    """`text` broken between words into lines no wider than `width` (a word wider than that keeps a line)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def label_columns(grid: Tensor, labels: list[str], padding: int = 1) -> Tensor:
    """`grid` [3, H, W] (a `make_grid` of `len(labels)` equal columns, `padding` pixels around each tile)
    under a white header row with each label centred over its column, wrapped to the tile's width."""
    import numpy as np
    from PIL import Image, ImageDraw

    _, _, width = grid.shape
    count = len(labels)
    pitch = (width - padding) / count  # a tile and the padding after it
    tile = pitch - padding
    font = _font(int(min(20, max(11, tile // 6))))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(measure, label, font, tile - 4) for label in labels]
    top, bottom = font.getbbox("Ag")[1::2]
    line_height = bottom - top + 3
    margin = 4
    height = 2 * margin + line_height * max(len(lines) for lines in wrapped)
    header = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(header)
    for column, lines in enumerate(wrapped):
        centre = padding + column * pitch + tile / 2
        for row, line in enumerate(lines):
            x = centre - draw.textlength(line, font=font) / 2
            draw.text((x, margin + row * line_height - top), line, fill=(20, 20, 20), font=font)
    pixels = torch.from_numpy(np.asarray(header, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return torch.cat([pixels, grid.detach().float().cpu()], dim=1)
