"""The `imagefolder` source: a class-per-folder tree of image files, read exactly.

An ImageFolder is read exactly: its samples are the regular files under the class
folders, each labelled by the class folder it really lies in, so a link can neither
repeat images nor move them to another label, and nothing blocks:

- classes are the real, non-hidden sub-folders of `--root`, in sorted name order; a
  class folder without any file is refused (its label would belong to no image, and
  adding one image later would shift every label after it);
- a symlink to a folder is never followed, whether it leads back inside the tree (a
  loop such as `cat/loop -> ..` would file every other class under `cat`) or outside
  `--root`;
- a symlink to a file is followed when it resolves to a regular file, wherever that
  lies (a "symlink farm", a labelled view of images stored elsewhere, is a common way
  to build a data set; a file link cannot loop), and the image is filed under the
  folder the link is in;
- FIFOs, sockets and devices are never opened (reading a FIFO waits forever);
- everything not read is listed with its reason in the manifest's skipped inputs;
- a tree already split keeps its splits: `train/`, `val/` (or `validation/`) and `test/`
  directly under `--root`, each holding class folders, become the splits `train`,
  `validation` and `test`, with one class list (every class needs training images); a
  tree without `val/` gets its validation split carved from `train/` (`--val-fraction`), one
  without `test/` its test split (`--test-fraction`);
  split folders beside other folders, or holding images directly, are refused as
  ambiguous.

Files PIL cannot read are reported as skipped, never fatal.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from vitmpp.common.errors import UserError
from vitmpp.common.io import UnreadableFile, read_regular_file, special_kind

from .pixels import UnknownScale, to_rgb
from .sources import Item, Loaded, SkipInput, SourceData, is_inside, register_source

# PIL format name -> our member extension, for passing encoded files through unchanged
PIL_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def read_image_bytes(path: Path) -> bytes:
    """The bytes of an input image, or SkipInput with the reason (a FIFO, a device, unreadable)."""
    try:
        return read_regular_file(path)
    except UnreadableFile as err:
        raise SkipInput(err.reason.removeprefix("is ")) from None


def open_image_file(path: Path, *, keep_bytes: bool, draft_side: int | None = None) -> Loaded:
    """Read and fully decode an image file; SkipInput with the reason if it is not one.

    The file's bytes are kept (passed through to the shard) only when they decode to the
    same RGB pixels in any reader: RGB or grey, without a transparent colour."""
    data = read_image_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            if draft_side and fmt == "JPEG":
                # decode at a reduced DCT scale when the result is still at least draft_side
                img.draft("RGB", (draft_side, draft_side))
            img.load()
            exact = img.mode in ("RGB", "L") and "transparency" not in img.info
            rgb = to_rgb(img)
    except Image.DecompressionBombError as err:
        raise SkipInput(f"too large to decode safely: {err}") from None
    except UnknownScale as err:
        raise SkipInput(str(err)) from None
    except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        reason = "not an image" if isinstance(err, Image.UnidentifiedImageError) else f"corrupt image: {err}"
        raise SkipInput(reason) from None
    ext = PIL_FORMAT_EXT.get(fmt or "") if exact else None
    return Loaded(rgb, data if keep_bytes and ext else None, ext)


def _list_class(folder: Path, root: Path, real_root: str, skipped: list[dict]) -> list[Path]:
    """The files of one class folder in name order, by the rules of the module docstring.

    Folders are recognised from `lstat` (never through a link); each real folder is entered
    once (a bind mount can make real folders loop too)."""
    files: list[Path] = []
    entered: set[tuple[int, int]] = set()

    def skip(path: Path, reason: str) -> None:
        skipped.append({"path": path.relative_to(root).as_posix(), "reason": reason})

    def visit(directory: Path) -> None:
        try:
            info = os.stat(directory, follow_symlinks=False)
            if (info.st_dev, info.st_ino) in entered:
                skip(directory, "folder already read through another path, not read again")
                return
            entered.add((info.st_dev, info.st_ino))
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            skip(directory, f"unreadable folder: {err.strerror or err}")
            return
        folders = []
        for entry in entries:
            path = Path(entry.path)
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    folders.append(path)
                elif stat.S_ISREG(mode):
                    files.append(path)
                elif stat.S_ISLNK(mode):
                    target = os.path.realpath(path)
                    target_mode = os.stat(path).st_mode
                    where = "inside" if is_inside(target, real_root) else "outside"
                    if stat.S_ISDIR(target_mode):
                        skip(path, f"symlink to a folder {where} --root, not followed")
                    elif not stat.S_ISREG(target_mode):
                        skip(path, f"symlink to {special_kind(target_mode) or 'a special file'}, not followed")
                    else:
                        files.append(path)
                else:
                    skip(path, f"{special_kind(mode) or 'a special file'}, not a regular file")
            except OSError as err:  # a dangling or looping symlink, a file removed meanwhile
                skip(path, f"unreadable: {err.strerror or err}")
        for path in folders:  # a folder's files first, then its sub-folders (os.walk's order)
            visit(path)

    visit(folder)
    return files


# Folders that name a split when they sit directly under --root (the ImageNet layout:
# root/train/<class>/..., root/val/<class>/...), and the split each becomes.
SPLIT_FOLDERS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


def _class_folders(folder: Path, root: Path, skipped: list[dict]) -> list[str]:
    """The class folders directly under `folder` (non-hidden real folders, in name order); everything
    else there is recorded in `skipped` with its reason (paths relative to `root`)."""
    names: list[str] = []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        where = (Path(entry.path).relative_to(root)).as_posix()
        if entry.is_dir(follow_symlinks=False):
            if entry.name.startswith("."):
                skipped.append({"path": where, "reason": "hidden folder, not a class"})
            else:
                names.append(entry.name)
        elif entry.is_symlink() and entry.is_dir():
            skipped.append({"path": where, "reason": "symlink to a folder, not followed (not a class)"})
        else:
            skipped.append({"path": where, "reason": "outside a class folder"})
    return names


@register_source("imagefolder")
def imagefolder_source(root: Path | None = None, max_size: int | None = None) -> SourceData:
    """A class-per-folder tree under `root`, read exactly (module docstring); a tree already split
    (root/train/<class>, root/val/<class>, root/test/<class>) keeps its splits."""
    if root is None:
        raise UserError("--source imagefolder needs --root, a folder with one sub-folder of images per class.")
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise UserError(f"Image folder '{root}' given with --root {what}; pass a folder of class sub-folders.")
    real_root = os.path.realpath(root)
    skipped: list[dict] = []
    top = _class_folders(root, root, skipped)
    if not top:
        linked = [s["path"] for s in skipped if s["reason"].startswith("symlink to a folder")]
        hint = (
            f"its {len(linked)} symlinked folders (e.g. '{linked[0]}') are not followed, so pass the folder they "
            "lead to as --root"
            if linked
            else "put each class's images in its own sub-folder (root/cat/1.jpg, root/dog/2.jpg)"
        )
        raise UserError(f"Image folder '{root}' has no class sub-folders; {hint}.")
    split_folders = _split_layout(root, top)

    def loader(path: Path) -> Callable[[], Loaded]:
        return lambda: open_image_file(path, keep_bytes=True, draft_side=max_size)

    # (split or None, the folder whose sub-folders are the classes)
    parts = [(SPLIT_FOLDERS[f], root / f) for f in split_folders] if split_folders else [(None, root)]
    classes_of = {folder: (top if split is None else _class_folders(folder, root, skipped)) for split, folder in parts}
    class_names = sorted(set().union(*classes_of.values())) if split_folders else top
    if split_folders:
        stray = sorted(set(class_names) - set(classes_of[root / "train"]))
        if stray:
            raise UserError(
                f"Class folder '{stray[0]}' of '{root}' is in another split's folder but not in train/; "
                "every class needs training images (add them, or remove the folder)."
            )
    index = {name: label for label, name in enumerate(class_names)}
    splits: dict[str | None, list[Item]] = {}
    empty = []
    for split, folder in parts:
        items = []
        for name in classes_of[folder]:
            # every file is tried: an extension filter would hide mislabelled files instead of reporting them
            files = _list_class(folder / name, root, real_root, skipped)
            if not files:
                empty.append((folder / name).relative_to(root).as_posix())
            items += [Item(index[name], path.relative_to(root).as_posix(), loader(path)) for path in files]
        splits[split] = items
    if empty:
        which = (
            f"Class folder '{empty[0]}' under '{root}' holds"
            if len(empty) == 1
            else f"Class folders {', '.join(repr(n) for n in empty)} under '{root}' hold"
        )
        raise UserError(
            f"{which} no files; add images or remove it (every folder is a class, and a class "
            "without images would take a label no sample has)."
        )
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in root.resolve().name) or "images"
    if not split_folders:
        return SourceData(name, class_names, items=splits[None], skipped=skipped, files=True)
    return SourceData(
        name,
        class_names,
        fixed_splits=splits,
        skipped=skipped,
        files=True,
        train_origin="train/",
        own_splits="the tree's own split folders (train/, val/ or validation/, test/)",
    )


def _split_layout(root: Path, top: list[str]) -> list[str]:
    """The split folders of an already split tree (train/ first), [] for a plain class-per-folder tree;
    a tree that is neither is refused with one sentence."""
    named = [f for f in top if f in SPLIT_FOLDERS]
    if not named:
        return []
    others = [f for f in top if f not in SPLIT_FOLDERS]
    holds_classes = {
        f: any(e.is_dir(follow_symlinks=False) and not e.name.startswith(".") for e in os.scandir(root / f))
        for f in named
    }
    if others:
        raise UserError(
            f"Image folder '{root}' mixes split folders ({', '.join(named)}) with other folders "
            f"('{others[0]}'); put every class under train/ (and val/, test/), or, if '{named[0]}' is "
            "really a class, rename it."
        )
    if not any(holds_classes.values()):
        raise UserError(
            f"Image folder '{root}' holds {', '.join(f + '/' for f in named)} with images directly inside, "
            "so it is unclear whether they are splits or classes; for splits put each class in its own "
            "folder (train/cat/1.jpg), for classes rename them."
        )
    if not all(holds_classes.values()):
        flat = next(f for f, has in holds_classes.items() if not has)
        raise UserError(
            f"Image folder '{root}' looks split, but {flat}/ holds no class folders while "
            f"{next(f for f, has in holds_classes.items() if has)}/ does; give every split the same "
            "layout (split/class/image)."
        )
    if "val" in named and "validation" in named:
        raise UserError(f"Image folder '{root}' has both val/ and validation/; keep one of them.")
    if "train" not in named:
        raise UserError(
            f"Image folder '{root}' has {', '.join(f + '/' for f in named)} but no train/; "
            "pretraining and fine-tuning read the train split."
        )
    return sorted(named, key=lambda f: ("train", "val", "validation", "test").index(f))
