"""The comparison's grid (`vitmpp.experiments.compare`): its config, its cells and what each cell runs.

    CompareConfig --encoder_runs--> name -> pretraining run folders --cells--> [Cell] (encoder x pretraining run
        x protocol x label fraction x seed) --cell_arguments--> one finetune command line per cell

`check_cells` resolves every cell's config before the first cell runs; `only_grown` tells a grid that only
gained cells (finished ones are kept) from a changed one.
"""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from vitmpp.common.config import load_config, param
from vitmpp.common.errors import ConfigError, UserError
from vitmpp.finetune.config import PROTOCOLS

METRICS = (
    "test_last_top1",
    "test_last_top5",
    "test_selected_top1",
    "test_selected_top5",
    "val_last_top1",
    "val_best_top1",
)


def metric_split(metric: str) -> str:
    """The split a table metric is scored on: 'test', or 'validation' (a table for choosing recipes)."""
    return "validation" if metric.startswith("val_") else "test"


@dataclass
class PretrainingPlan:
    """Pretraining runs the comparison makes itself (one per recipe and seed)."""

    recipes: dict[str, str] = param(
        default_factory=dict,
        help="encoder name -> pretraining recipe and its own key=value overrides (README, Evaluate and compare)",
    )
    seeds: list[int] = param(default_factory=lambda: [0], help="pretraining seeds: one run per recipe and seed")
    overrides: list[str] = param(default_factory=list, help="key=value overrides applied to every pretraining run")
    launcher: str | None = param(None, help="command that runs a pretraining (default: python -m vitmpp.pretrain.main)")


@dataclass
class CompareConfig:
    encoders: dict[str, str | list[str]] = param(
        default_factory=dict,
        help="name -> run folder or encoder file, a list of them (one per pretraining seed), or 'random'",
    )
    pretraining: PretrainingPlan = field(default_factory=PretrainingPlan)
    protocols: list[str] = param(default_factory=lambda: ["linear", "finetune", "scratch", "knn"])
    protocol_encoders: dict[str, list[str]] = param(
        default_factory=dict,
        help="protocol -> the encoders it runs on (default: every encoder), e.g. {finetune: [mae, supervised]}",
    )
    label_fractions: list[float] = param(default_factory=lambda: [0.1, 1.0])
    seeds: list[int] = param(default_factory=lambda: [0, 1, 2])
    recipes: dict[str, str] = param(
        default_factory=dict,
        help="protocol -> recipe file and its own key=value overrides, looked up beside this config first",
    )
    overrides: list[str] = param(default_factory=list, help="key=value overrides applied to every cell")
    output_dir: str = param("runs/compare", help="where cells and results go")
    launcher: str | None = param(None, help="command that runs a cell (default: python -m vitmpp.finetune.main)")
    metric: str = param(
        "test_last_top1",
        choices=METRICS,
        help="what the table reports: test at the last or the validation-chosen evaluation, or "
        "validation for choosing recipes (README, Evaluate and compare)",
    )
    compute_matched_scratch: bool = param(
        False, help="add a scratch row trained on as many images as pretraining plus fine-tuning (docs/small-data.md)"
    )

    def check(self) -> None:
        if not self.encoders and not self.pretraining.recipes:
            raise ConfigError(
                "Key 'encoders' (or 'pretraining.recipes') must name at least one encoder (name: run folder)."
            )
        for name in self.pretraining.recipes:
            if name in self.encoders:
                raise ConfigError(f"Encoder '{name}' is named in both 'encoders' and 'pretraining.recipes'; keep one.")
        for section, entries in (("pretraining.recipes", self.pretraining.recipes), ("recipes", self.recipes)):
            for name, entry in entries.items():
                words = shlex.split(entry)
                if not words or any("=" not in word for word in words[1:]):
                    raise ConfigError(
                        f"Key '{section}.{name}' must be a recipe file optionally followed by "
                        f"key=value overrides, got '{entry}'."
                    )
        for name, path in self.encoders.items():
            if isinstance(path, list) and (not path or "random" in path):
                raise ConfigError(f"Key 'encoders.{name}' must list one or more run folders ('random' stands alone).")
        if self.compute_matched_scratch and "scratch" not in self.protocols:
            raise ConfigError("Key 'compute_matched_scratch' adds a scratch row; add 'scratch' to 'protocols'.")
        for protocol in self.protocols:
            if protocol not in PROTOCOLS:
                raise ConfigError(f"Key 'protocols' holds '{protocol}'; allowed: {', '.join(PROTOCOLS)}.")
            if protocol not in self.recipes:
                raise ConfigError(
                    f"Key 'recipes' has no recipe for protocol '{protocol}'; "
                    f"add recipes.{protocol}: configs/finetune/....yaml."
                )
        known = set(self.encoders) | set(self.pretraining.recipes)
        for protocol, names in self.protocol_encoders.items():
            if protocol not in self.protocols or protocol == "scratch":
                raise ConfigError(
                    f"Key 'protocol_encoders.{protocol}' limits a protocol that is not run on encoders "
                    f"here; name one of {', '.join(p for p in self.protocols if p != 'scratch')}."
                )
            unknown = [name for name in names if name not in known]
            if unknown or not names:
                raise ConfigError(
                    f"Key 'protocol_encoders.{protocol}' names {', '.join(unknown) or 'no encoder'}; "
                    f"name encoders of 'encoders' or 'pretraining.recipes' ({', '.join(sorted(known))})."
                )
        for fraction in self.label_fractions:
            if not 0 < fraction <= 1:
                raise ConfigError(f"Key 'label_fractions' must hold numbers in (0, 1], got {fraction}.")
        # a repeated value would name two cells alike (one result counted twice, or two runs in one folder)
        for key, values in (
            ("seeds", self.seeds),
            ("label_fractions", self.label_fractions),
            *([("pretraining.seeds", self.pretraining.seeds)] if self.pretraining.recipes else []),
            ("protocols", self.protocols),
            *((f"encoders.{name}", paths) for name, paths in self.encoders.items() if isinstance(paths, list)),
        ):
            if not values:
                raise ConfigError(f"Key '{key}' is empty; give it at least one value.")
            repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
            if repeated:
                raise ConfigError(f"Key '{key}' repeats {', '.join(repeated)}; give each value once.")


SCRATCH, MATCHED = "-", "matched"  # the encoder names of the two scratch rows


@dataclass(frozen=True)
class Cell:
    encoder: str  # SCRATCH or MATCHED for the scratch rows
    protocol: str
    label_fraction: float
    seed: int
    run: int = 0  # which pretraining run of the encoder (its index in the encoder's list)
    tag: str = ""  # the run in the folder name: "p<seed>" for runs made by `pretraining`, "p<index>" in a list

    @property
    def name(self) -> str:
        """The cell's folder: `mpp-linear-f0.1-s0`, `mpp-p1-linear-f0.1-s0` (pretraining seed 1, or the second
        of a list), `scratch-f0.1-s0`, `scratch-matched-f0.1-s0` (never a leading dash, which shell tools read
        as an option). A pretraining seed keeps its name when seeds are added, so finished cells are reused."""
        if self.encoder == SCRATCH:
            what = self.protocol
        elif self.encoder == MATCHED:
            what = f"{self.protocol}-matched"
        else:
            what = f"{self.encoder}{f'-{self.tag}' if self.tag else ''}-{self.protocol}"
        return f"{what}-f{self.label_fraction:g}-s{self.seed}"


def encoder_runs(cfg: CompareConfig, out: Path) -> dict[str, list[str]]:
    """name -> its pretraining run folders (or 'random'), those made by `pretraining` included."""
    runs = {name: list(path) if isinstance(path, list) else [path] for name, path in cfg.encoders.items()}
    for name in cfg.pretraining.recipes:
        runs[name] = [str(out / "pretrain" / f"{name}-s{seed}") for seed in cfg.pretraining.seeds]
    return runs


def encoders_for(cfg: CompareConfig, protocol: str, runs: dict[str, list[str]]) -> list[str]:
    """The encoders a protocol is run on: scratch needs none (SCRATCH, and MATCHED with
    compute_matched_scratch); a random encoder is not fine-tuned, because fine-tuning random weights
    is what `scratch` measures (with its own recipe)."""
    if protocol == "scratch":
        return [SCRATCH, MATCHED] if cfg.compute_matched_scratch else [SCRATCH]
    names = list(runs)
    if protocol in cfg.protocol_encoders:  # limited by the config to some encoders, in the encoders' order
        names = [name for name in names if name in cfg.protocol_encoders[protocol]]
    if protocol == "finetune":
        return [name for name in names if runs[name] != ["random"]]
    return names


def cells(cfg: CompareConfig, runs: dict[str, list[str]]) -> list[Cell]:
    out = []
    for protocol in cfg.protocols:
        for encoder in encoders_for(cfg, protocol, runs):
            count = len(runs.get(encoder, [None]))
            for run in range(count):
                if encoder in cfg.pretraining.recipes:
                    tag = f"p{cfg.pretraining.seeds[run]}"
                else:
                    tag = f"p{run}" if count > 1 else ""
                for fraction in cfg.label_fractions:
                    for seed in cfg.seeds:
                        out.append(Cell(encoder, protocol, fraction, seed, run, tag))
    return out


def random_encoder(runs: dict[str, list[str]], out: Path) -> Path:
    """A randomly initialised encoder with the first real encoder's architecture (seed 0)."""
    import torch

    from vitmpp.models import create_encoder, save_encoder

    target = out / "random-encoder"
    if (target / "encoder.safetensors").is_file():
        return target
    reference = next((paths[0] for paths in runs.values() if paths != ["random"]), None)
    if reference is None:
        raise UserError("Encoder 'random' needs a real encoder in 'encoders' to copy its architecture from.")
    from vitmpp.models.importer import encoder_description

    info = encoder_description(encoder_file(reference))  # ours, or any checkpoint the importer reads
    torch.manual_seed(0)
    encoder = create_encoder(info["name"], img_size=info["img_size"], **info.get("overrides", {}))
    save_encoder(encoder, target, objective="random", step=0, extra=info.get("extra"))
    return target


def encoder_file(path: str) -> Path:
    """Our encoder.safetensors in a run folder, or a checkpoint file or timm/transformers folder as given."""
    candidate = Path(path)
    if (
        candidate.is_dir()
        and (candidate / "config.json").is_file()
        and not (candidate / "encoder.safetensors").is_file()
    ):
        return candidate
    file = candidate / "encoder.safetensors" if candidate.is_dir() else candidate
    if not file.is_file():
        raise UserError(
            f"Encoder '{path}' not found (no {file}); run its pretraining first (see README, 'Evaluate and compare')."
        )
    return file


def cell_encoder(path: str) -> str:
    """What a cell's `encoder=` names: our run folder, or the checkpoint itself."""
    file = encoder_file(path)
    return str(file.parent if file.name == "encoder.safetensors" else file)


def pretraining_images(folder: str) -> int:
    """Images the encoder in `folder` was pretrained on (steps x global batch, from encoder.json); 0 if unknown
    (an imported checkpoint: its pretraining is not ours to count)."""
    from vitmpp.models import read_encoder_info

    file = encoder_file(folder)
    if file.name != "encoder.safetensors" and file.suffix != ".safetensors":
        return 0
    try:
        info = read_encoder_info(file)
    except UserError:  # a safetensors file of another library: no encoder.json
        return 0
    return int(((info.get("extra") or {}).get("train") or {}).get("images_seen") or 0)


def _resolve(recipe: str, key: str, config_path: str | os.PathLike) -> str:
    """A recipe path next to the compare config file (so a config works from any working directory),
    else in the working directory; a missing recipe is one sentence naming `key`."""
    here = Path(config_path).resolve().parent
    candidates = [Path(recipe)] if Path(recipe).is_absolute() else [here / recipe, Path(recipe)]
    match = next((c for c in candidates if c.is_file()), None)
    if match is None:
        raise UserError(
            f"Recipe '{recipe}' (key {key} of {config_path}) is neither next to that file "
            f"({here / recipe}) nor in the working directory; fix the path."
        )
    return str(match)


def resolve_recipes(cfg: CompareConfig, config_path: str | os.PathLike) -> dict[str, str]:
    """protocol -> recipe path (see `_resolve`); the entry's own overrides are `recipe_overrides`'."""
    return {
        protocol: _resolve(shlex.split(recipe)[0], f"recipes.{protocol}", config_path)
        for protocol, recipe in cfg.recipes.items()
    }


def recipe_overrides(cfg: CompareConfig, protocol: str) -> list[str]:
    """The key=value overrides a `recipes` entry carries after its file ("knn.yaml train.epochs=null"),
    applied after the shared `overrides`."""
    return shlex.split(cfg.recipes.get(protocol, ""))[1:]


def cell_arguments(
    cfg: CompareConfig,
    cell: Cell,
    encoder_paths: dict[str, list[str]],
    cells_dir: Path,
    recipe: str,
    matched_steps: int | None,
) -> list[str]:
    """The finetune command line of one cell (without --resume): recipe, cell keys, shared then own overrides."""
    args = [
        "--config",
        recipe,
        f"protocol={cell.protocol}",
        f"data.label_fraction={cell.label_fraction}",
        f"train.seed={cell.seed}",
        f"run.output_dir={cells_dir}",
        f"run.name={cell.name}",
        *cfg.overrides,
        *recipe_overrides(cfg, cell.protocol),
    ]
    if cell.protocol == "scratch":  # the architecture of the first real encoder
        args.append(f"encoder={next(paths[0] for name, paths in encoder_paths.items() if name != 'random')}")
        if cell.encoder == MATCHED and matched_steps is not None:
            args.append(f"train.steps={matched_steps}")
    else:
        args.append(f"encoder={encoder_paths[cell.encoder][cell.run]}")
    return args


def check_cells(
    cfg: CompareConfig,
    grid: list[Cell],
    encoder_paths: dict[str, list[str]],
    cells_dir: Path,
    recipes: dict[str, str],
    matched_steps: int | None,
) -> None:
    """Resolve and validate every cell's config before the first cell runs: a recipe that the shared
    overrides break is one sentence naming the cell and its recipe file, not a failure halfway."""
    from vitmpp.finetune.config import FinetuneConfig

    for cell in grid:
        args = cell_arguments(cfg, cell, encoder_paths, cells_dir, recipes[cell.protocol], matched_steps)
        try:
            load_config(FinetuneConfig, args[1], args[2:])
        except ConfigError as err:
            own = " or that entry's own overrides" if recipe_overrides(cfg, cell.protocol) else ""
            raise UserError(
                f"Cell {cell.name} (protocol {cell.protocol}, recipe {args[1]}) cannot run: "
                f"{str(err).rstrip('.')}. Nothing has run; fix the recipe, compare's overrides{own}, or "
                f'give that recipe its own, as in recipes: {{{cell.protocol}: "{Path(args[1]).name} '
                'key=value"}.'
            ) from None


# keys whose lists only choose cells: a value added to one adds cells and changes none
_GRID_LISTS = ("seeds", "label_fractions", "protocols", "pretraining.seeds")


def only_grown(before: dict, after: dict, changed: list[str]) -> bool:
    """True when the `changed` keys (config.diff_keys of the saved config and this one) only add to
    (or reorder) the grid: values added to seeds, label_fractions, protocols or pretraining.seeds, or
    a new encoder or pretraining recipe, or compute_matched_scratch turned on or off (its row's cells
    alone). Then every finished cell is what it was, so no --overwrite is needed."""
    from vitmpp.common.config import flatten

    old, new = flatten(before), flatten(after)
    for key in changed:
        if key in _GRID_LISTS:
            if not set(map(str, old.get(key) or [])) <= set(map(str, new.get(key) or [])):
                return False
        elif key == "compute_matched_scratch":
            continue  # adds or drops the compute-matched row's own cells; no other cell changes
        elif not (key.startswith(("encoders.", "pretraining.recipes.")) and key not in old):
            return False
    return True


def resolve_pretraining(cfg: CompareConfig, config_path: str | os.PathLike) -> dict[str, tuple[str, list[str]]]:
    """encoder name -> (pretraining recipe path (see `_resolve`), that entry's own overrides)."""
    words = {name: shlex.split(entry) for name, entry in cfg.pretraining.recipes.items()}
    return {name: (_resolve(w[0], f"pretraining.recipes.{name}", config_path), w[1:]) for name, w in words.items()}


def matched_scratch_steps(
    cfg: CompareConfig, scratch_recipe: str, encoder_paths: dict[str, list[str]]
) -> tuple[int, int]:
    """(steps, pretraining images) of the compute-matched scratch row: the scratch recipe's own steps
    plus as many steps as the most-pretrained encoder's pretraining images fill at its global batch."""
    from vitmpp.finetune.config import FinetuneConfig

    recipe = load_config(FinetuneConfig, scratch_recipe, [*cfg.overrides, *recipe_overrides(cfg, "scratch")])
    if recipe.train.steps is None:
        raise UserError(
            f"compute_matched_scratch needs train.steps in the scratch recipe {scratch_recipe} (it sets "
            "train.epochs); set train.steps there."
        )
    pretrained = max(
        (pretraining_images(p) for name, paths in encoder_paths.items() if name != "random" for p in paths), default=0
    )
    return recipe.train.steps + math.ceil(pretrained / recipe.train.global_batch), pretrained
