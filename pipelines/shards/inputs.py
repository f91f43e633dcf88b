"""What `pdiff shard` reads: a folder or a zip of images, or a numpy array (images or latents), listed
as items (key, path for reports, reference, label) before any pixel is decoded.

A folder or zip is read as its image files, by extension (``IMAGE_SUFFIXES``, as EDM's dataset tool
keeps the files Pillow has an extension for): anything else (.DS_Store, Thumbs.db, LICENSE.txt,
README.md) and hidden files and folders are ignored, and counted and named in the summary. A file
name that is not UTF-8 is read like any other and shown with its odd bytes escaped.

Labels: class sub-folders become labels 0..K-1 in sorted order, unless an EDM-style ``dataset.json``
with ``{"labels": [[name, label], ...]}`` gives them; an ``.npz`` may hold a labels array and an
``.npy`` may come with a separate ``.npy`` of labels. Latents are float arrays (N, H, W, C), or
(N, C, H, W) with ``layout="nchw"``.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pdiff.errors import UserError

if TYPE_CHECKING:
    from pdiff.pipelines.shards.options import Options


class ShardInputError(UserError, ValueError):
    """A bad input under the 'stop' policy, or a source that cannot be sharded at all."""


class ShardUsageError(ShardInputError):
    """Options that cannot work together, or SRC and OUT that must not be where they are: a usage
    error, exit status 2 as for argparse's own."""
    exit_code = 2


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                            ".ppm", ".pgm", ".pbm", ".pnm", ".tga"})


def is_image_name(rel: str) -> bool:
    """``rel`` (a '/'-separated path inside the source) names an image file that is not hidden."""
    parts = rel.split("/")
    if parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts):   # macOS zips carry ._ copies
        return False
    return os.path.splitext(parts[-1])[1].lower() in IMAGE_SUFFIXES


def shown(name: str) -> str:
    """A file name as reports show it: bytes that are not UTF-8 (kept by Python as lone surrogates,
    which cannot be printed or written as UTF-8) appear as \\xNN escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


@dataclass
class Item:
    key: str      # source key (path without extension): duplicates are bad inputs
    path: str     # shown in reports
    ref: Any      # file path, zip member name or array index
    label: int


@dataclass
class Inputs:
    """The items of one source and how to load each (in the writer's worker processes too)."""
    kind: str                          # dir | zip | array
    root: str
    items: list[Item]
    classes: list[str] = field(default_factory=list)
    labeled: bool = False
    bad: list[tuple[int, str, str]] = field(default_factory=list)   # (position, path, reason) found while listing
    ignored: list[str] = field(default_factory=list)                # files that are not images (shown names)
    nested: list[str] = field(default_factory=list)     # images below a sub-folder of their class folder
    upscaled: list[tuple[int, str]] = field(default_factory=list)   # (position, 'WxH') of images smaller than
                                                                    # R x R, noted while they are written
    array: np.ndarray | None = None
    _zip: zipfile.ZipFile | None = None

    def load(self, ref) -> bytes | np.ndarray:
        if self.kind == "dir":
            return Path(ref).read_bytes()
        if self.kind == "zip":
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.root)
            return self._zip.read(ref)
        return np.asarray(self.array[ref])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"] = None
        return state

    def reorder(self, order: np.ndarray) -> None:
        """Put the items in ``order`` (positions into the current list); the bad-input positions follow."""
        new_position = np.empty(len(order), np.int64)
        new_position[order] = np.arange(len(order))
        self.items = [self.items[p] for p in order]
        self.bad = sorted((int(new_position[pos]), path, reason) for pos, path, reason in self.bad)


def _labels_from_names(names: list[str], where: str) -> tuple[list[int], list[str], list[tuple[int, str]]]:
    """Class folders: the first path component. A layout with sub-folders labels every image by its
    top folder; an image outside any folder is then a bad input."""
    nested = any("/" in n for n in names)
    if not nested:
        return [-1] * len(names), [], []
    classes = sorted({shown(n.split("/", 1)[0]) for n in names if "/" in n})
    index = {c: i for i, c in enumerate(classes)}
    labels, bad = [], []
    for pos, n in enumerate(names):
        if "/" in n:
            labels.append(index[shown(n.split("/", 1)[0])])
        else:
            labels.append(-1)
            bad.append((pos, f"outside the class folders of {where} (move it into one or remove it)"))
    return labels, classes, bad


def _edm_labels(meta: dict, names: list[str], where: str):
    labels_list = meta.get("labels")
    if labels_list is None:
        return [-1] * len(names), [], [], False
    table = {str(k).replace("\\", "/"): v for k, v in labels_list}
    labels, bad = [], []
    for pos, n in enumerate(names):
        v = table.get(n)
        if v is None or isinstance(v, list) or not isinstance(v, (int, np.integer)) or v < 0:
            labels.append(-1)
            bad.append((pos, f"no integer class label in {where}/dataset.json"))
        else:
            labels.append(int(v))
    k = max([lab for lab in labels if lab >= 0], default=-1) + 1
    return labels, [str(i) for i in range(k)], bad, True


def _items_from_names(kind, root, names, refs, meta_text, ignored) -> Inputs:
    if meta_text is not None:
        try:
            meta = json.loads(meta_text)
        except json.JSONDecodeError as e:
            raise ShardInputError(f"{root}/dataset.json: not valid JSON: {e}") from None
        labels, classes, bad, labeled = _edm_labels(meta, names, root)
    else:
        labels, classes, bad = _labels_from_names(names, root)
        labeled = bool(classes)
    items = [Item(n.rsplit(".", 1)[0] if "." in n.rsplit("/", 1)[-1] else n,
                  shown(f"{root}/{n}" if kind == "zip" else r),
                  r, lab) for n, r, lab in zip(names, refs, labels)]
    nested = [shown(n) for n in names if n.count("/") > 1] if meta_text is None else []
    src = Inputs(kind, root, items, classes, labeled, ignored=[shown(n) for n in ignored], nested=nested)
    src.bad = [(pos, items[pos].path, reason) for pos, reason in bad]
    return src


def open_inputs(path: str | Path, opts: Options) -> Inputs:
    p = Path(path)
    if not p.exists():
        raise ShardInputError(f"{p}: no such file or folder")
    if p.is_dir():
        names, ignored = [], []
        for dirpath, dirnames, filenames in os.walk(p):
            hidden = sorted(d for d in dirnames if d.startswith("."))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))     # never walk .git and the like
            ignored += [os.path.relpath(os.path.join(dirpath, d), p).replace(os.sep, "/") + "/" for d in hidden]
            for f in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, f), p).replace(os.sep, "/")
                if rel != "dataset.json":
                    (names if is_image_name(rel) else ignored).append(rel)
        meta = (p / "dataset.json").read_text() if (p / "dataset.json").exists() else None
        return _items_from_names("dir", str(p), names, [str(p / n) for n in names], meta, ignored)
    if p.suffix.lower() == ".zip":
        try:
            zf = zipfile.ZipFile(p)
        except zipfile.BadZipFile as e:
            raise ShardInputError(f"{p}: not a readable zip file: {e}") from None
        with zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir() and i.filename != "dataset.json"]
            meta = zf.read("dataset.json").decode() if "dataset.json" in zf.namelist() else None
        ignored = [n for n in names if not is_image_name(n)]
        names = [n for n in names if is_image_name(n)]
        return _items_from_names("zip", str(p), names, names, meta, ignored)
    if p.suffix.lower() in (".npz", ".npy"):
        return _array_inputs(p, opts)
    raise ShardInputError(f"{p}: unknown source kind (expected a folder, .zip, .npz or .npy)")


_NUMPY_MAGIC = {".npy": b"\x93NUMPY", ".npz": b"PK"}


def _array_inputs(p: Path, opts: Options) -> Inputs:
    labels = None
    with open(p, "rb") as f:
        head = f.read(6)
    magic = _NUMPY_MAGIC[p.suffix.lower()]
    if not head.startswith(magic):
        what = "numpy.save" if p.suffix.lower() == ".npy" else "numpy.savez"
        raise ShardInputError(f"{p}: not a {p.suffix.lower()} file (it does not begin with {magic!r}); write it "
                              f"with {what}, or check that the path names the right file")
    try:
        if p.suffix.lower() == ".npy":
            images = np.load(p, mmap_mode="r")
            if opts.labels_file:
                labels = np.load(opts.labels_file)
        else:
            with np.load(p) as z:
                keys = list(z.keys())
                key = opts.images_key or next((k for k in ("images", "x", "X") if k in keys), None)
                if key is None:
                    cands = [k for k in keys if z[k].ndim in (3, 4)]
                    if len(cands) != 1:
                        raise ShardInputError(f"{p}: cannot tell which array holds the images (arrays: "
                                              f"{', '.join(keys)}); pass --images-key")
                    key = cands[0]
                if key not in keys:
                    raise ShardInputError(f"{p}: no array {key!r} (arrays: {', '.join(keys)})")
                images = z[key]
                lkey = opts.labels_key or next((k for k in ("labels", "y") if k in keys), None)
                if lkey is not None:
                    if lkey not in keys:
                        raise ShardInputError(f"{p}: no array {lkey!r} (arrays: {', '.join(keys)})")
                    labels = z[lkey]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, ShardInputError):
            raise
        raise ShardInputError(f"{p}: cannot read the array ({type(e).__name__}: {e}); the file is damaged or "
                              f"not written by numpy") from None
    if opts.encoding == "latent" and not opts.encode_vae:
        _check_latent_array(p, images, opts)
    elif images.dtype != np.uint8:
        hint = (" (for latents pass --format latent)" if np.issubdtype(images.dtype, np.floating) else "")
        raise ShardInputError(f"{p}: images are {images.dtype}, expected uint8 (scale to 0..255 and cast "
                              f"first){hint}")
    elif images.ndim == 4 and images.shape[-1] == 1:
        pass
    elif not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise ShardInputError(f"{p}: images have shape {images.shape}, expected (N, H, W), (N, H, W, 1) "
                              f"or (N, H, W, 3)")
    n = images.shape[0]
    classes: list[str] = []
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != n:
            raise ShardInputError(f"{p}: {labels.shape[0]} labels for {n} images")
        if not np.issubdtype(labels.dtype, np.integer) or (n and labels.min() < 0):
            raise ShardInputError(f"{p}: labels must be non-negative integers (got {labels.dtype})")
        classes = [str(i) for i in range(int(labels.max()) + 1 if n else 0)]
    items = [Item(f"{i:09d}", f"{p}[{i}]", i, int(labels[i]) if labels is not None else -1) for i in range(n)]
    return Inputs("array", str(p), items, classes, labels is not None, array=images)


def latent_shape(shape: tuple, layout: str) -> tuple[int, int, int]:
    """(H, W, C) of one sample of an (N, ...) latent array in ``layout``."""
    if layout == "nchw":
        return shape[2], shape[3], shape[1]
    return shape[1], shape[2], shape[3]


def _check_latent_array(p: Path, a: np.ndarray, opts: Options) -> None:
    if not np.issubdtype(a.dtype, np.floating):
        raise ShardInputError(f"{p}: --format latent needs a float16/float32 array, got {a.dtype} "
                              f"(uint8 images: use --format png or raw)")
    if a.ndim != 4:
        raise ShardInputError(f"{p}: latents have shape {a.shape}; expected 4 axes, (N, H, W, C) with --layout nhwc "
                              f"or (N, C, H, W) with --layout nchw")
    h, w, c = latent_shape(a.shape, opts.layout)
    if h != w:
        other = "nchw" if opts.layout == "nhwc" else "nhwc"
        oh, ow, oc = latent_shape(a.shape, other)
        hint = (f"; as --layout {other} they would be {oh}x{ow} with {oc} channels: pass --layout {other}"
                if oh == ow else "")
        raise ShardInputError(f"{p}: latents of shape {a.shape} read as --layout {opts.layout} are {h}x{w} with {c} "
                              f"channels, not square{hint}")
    if c > h:
        other = "nchw" if opts.layout == "nhwc" else "nhwc"
        raise ShardInputError(f"{p}: latents of shape {a.shape} read as --layout {opts.layout} have {c} channels, "
                              f"more than their {h}x{w} size: the channel axis is likely wrong (pass --layout {other})")
    if opts.resolution is not None and opts.resolution != h:
        raise ShardInputError(f"{p}: latents are {h}x{h} but --resolution is {opts.resolution} (latents are not "
                              f"resized; drop --resolution or pass {h})")
    if opts.channels != "auto" and int(opts.channels) != c:
        raise ShardInputError(f"{p}: latents have {c} channels but --channels is {opts.channels} (drop --channels)")




def duplicate_keys(items: list[Item]) -> dict[int, int]:
    """Position of each item whose key an earlier item has -> that earlier position."""
    first: dict[str, int] = {}
    dup = {}
    for pos, it in enumerate(items):
        if it.key in first:
            dup[pos] = first[it.key]
        else:
            first[it.key] = pos
    return dup
