"""The machinery behind `pdiff shard`: read a source, preprocess every image to R x R, write tar
shards with DALI indexes, then the manifest (last).

Sources: a folder or a zip of images (class sub-folders become labels 0..K-1 in sorted order; an
EDM-style ``dataset.json`` with ``{"labels": [[name, label], ...]}`` takes precedence), or a numpy
``.npz``/``.npy`` array of shape (N, H, W) or (N, H, W, C) in uint8.

Latents (``encoding="latent"``, ``pdiff shard X.npy OUT --format latent``): a float array (N, H, W, C)
or, with ``layout="nchw"``, (N, C, H, W), any C, already encoded by the user (e.g. Stable Diffusion VAE
latents multiplied by 0.18215). Each sample is stored as H x W x C little-endian float16 or float32
bytes (``dtype``), as given: no transform, no scaling. The choice is explicit, not made from the
array's dtype, so that float images in 0..1 are never mistaken for latents. ``latent_scale`` is
recorded in the manifest (the factor the latents already carry); nothing applies it. A sample with
a NaN or an infinity (also after a cast to float16 overflows) is a bad input like any other.

Resumable: after each complete shard, ``NAME.progress.json`` records the shard (size, sha256, the
input range it covers and a hash of the keys in it). A re-run with the same options keeps the shards
that still match and goes on from the first one that does not. Shards are written as ``*.tmp`` and
renamed, so a final name never holds a half-written file.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import signal
import sys
import tarfile
import threading
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pdiff.pipelines.shards import (FORMAT, FORMAT_VERSION, IMAGE_EXTS, LABEL_DTYPE, LABEL_EXT, LATENT_DTYPES, MANIFEST,
                              ShardError, check_files, decode_image, load_manifest, read_index, sample_dtype,
                              sha256_file, write_index)

TOOL_VERSION = "1"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
TRANSFORMS = ("none", "center-crop", "center-crop-dhariwal", "resize")
LAYOUTS = ("nhwc", "nchw")
ENCODINGS = tuple(IMAGE_EXTS)
GRAY_MODES = {"1", "L", "LA", "La"}
COLOR_MODES = {"P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


class ShardInputError(ValueError):
    """A bad input under the 'stop' policy, or a source that cannot be sharded at all."""


class BadInput(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass
class Options:
    resolution: int | None = None         # None: taken from the first image (transform 'none' only)
    transform: str = "none"
    channels: int | str = "auto"          # 1, 3 or auto (the first image's: gray -> 1, else 3)
    encoding: str = "png"                 # png | jpeg | webp | raw | latent (float arrays only)
    layout: str = "nhwc"                  # latent: the array's axes, nhwc or nchw
    dtype: str = "float16"                # latent: stored as float16 or float32
    latent_scale: float = 1.0             # latent: the factor the latents already carry (recorded only)
    quality: int = 95                     # jpeg / webp (webp 100 = lossless)
    max_count: int = 10_000               # samples per shard at most
    max_bytes: int = 1 << 30              # bytes per shard at most (one sample larger than this still gets a shard)
    min_shards: int = 1                   # at least this many shards (ranks x workers)
    name: str = "data"
    on_error: str = "stop"                # stop | skip
    workers: int = 0                      # 0: all cores
    images_key: str | None = None         # .npz: the array of images (default: 'images', 'x' or the only 3/4-d array)
    labels_key: str | None = None         # .npz: the labels (default: 'labels' or 'y' if present)
    labels_file: str | None = None        # .npy source: labels in a separate .npy
    overwrite: bool = False
    progress: bool | None = None          # None: when stderr is a terminal
    command: list[str] | None = None

    def check(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ShardInputError(f"transform {self.transform!r} is not one of {', '.join(TRANSFORMS)}")
        if self.encoding not in ENCODINGS:
            raise ShardInputError(f"format {self.encoding!r} is not one of {', '.join(ENCODINGS)}")
        if self.channels not in (1, 3, "auto"):
            raise ShardInputError(f"channels must be 1, 3 or auto, got {self.channels!r}")
        if self.on_error not in ("stop", "skip"):
            raise ShardInputError(f"on-error must be stop or skip, got {self.on_error!r}")
        if self.layout not in LAYOUTS:
            raise ShardInputError(f"layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.dtype not in LATENT_DTYPES:
            raise ShardInputError(f"dtype {self.dtype!r} is not one of {', '.join(LATENT_DTYPES)}")
        if self.encoding == "latent":
            if self.transform != "none":
                raise ShardInputError(f"--transform {self.transform}: latents are stored as given (no image "
                                      f"transforms); resize the images before encoding them, or drop --transform")
            if not (isinstance(self.latent_scale, (int, float)) and math.isfinite(self.latent_scale)
                    and self.latent_scale > 0):
                raise ShardInputError(f"latent scale must be a positive number, got {self.latent_scale!r}")
        if self.transform != "none" and not self.resolution:
            raise ShardInputError(f"--transform {self.transform} needs --resolution")
        if self.resolution is not None and self.resolution < 2:
            raise ShardInputError(f"resolution must be at least 2, got {self.resolution}")
        if not 1 <= self.quality <= 100:
            raise ShardInputError(f"quality must lie in 1..100, got {self.quality}")
        if self.max_count < 1 or self.max_bytes < 1 or self.min_shards < 1:
            raise ShardInputError("max-count, max-bytes and min-shards must be positive")
        if not self.name or any(c in self.name for c in "./\\ "):
            raise ShardInputError(f"shard name {self.name!r} must be non-empty without dots, slashes or spaces")


# --------------------------------------------------------------------------------------------
# Sources

@dataclass
class Item:
    key: str      # source key (path without extension): duplicates are bad inputs
    path: str     # shown in reports
    ref: Any      # file path, zip member name or array index
    label: int


@dataclass
class Source:
    kind: str                          # dir | zip | array
    root: str
    items: list[Item]
    classes: list[str] = field(default_factory=list)
    labeled: bool = False
    bad: list[tuple[int, str, str]] = field(default_factory=list)   # (position, path, reason) found while listing
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


def _labels_from_names(names: list[str], where: str) -> tuple[list[int], list[str], list[tuple[int, str]]]:
    """Class folders: the first path component. A layout with sub-folders labels every image by its
    top folder; an image outside any folder is then a bad input."""
    nested = any("/" in n for n in names)
    if not nested:
        return [-1] * len(names), [], []
    classes = sorted({n.split("/", 1)[0] for n in names if "/" in n})
    index = {c: i for i, c in enumerate(classes)}
    labels, bad = [], []
    for pos, n in enumerate(names):
        if "/" in n:
            labels.append(index[n.split("/", 1)[0]])
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


def _items_from_names(kind, root, names, refs, meta_text) -> Source:
    if meta_text is not None:
        try:
            meta = json.loads(meta_text)
        except json.JSONDecodeError as e:
            raise ShardInputError(f"{root}/dataset.json: not valid JSON: {e}") from None
        labels, classes, bad, labeled = _edm_labels(meta, names, root)
    else:
        labels, classes, bad = _labels_from_names(names, root)
        labeled = bool(classes)
    items = [Item(n.rsplit(".", 1)[0] if "." in n.rsplit("/", 1)[-1] else n, f"{root}/{n}" if kind == "zip" else r,
                  r, lab) for n, r, lab in zip(names, refs, labels)]
    src = Source(kind, root, items, classes, labeled)
    src.bad = [(pos, items[pos].path, reason) for pos, reason in bad]
    return src


def open_source(path: str | Path, opts: Options) -> Source:
    p = Path(path)
    if not p.exists():
        raise ShardInputError(f"{p}: no such file or folder")
    if p.is_dir():
        names = []
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames.sort()
            for f in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, f), p).replace(os.sep, "/")
                if rel != "dataset.json":
                    names.append(rel)
        meta = (p / "dataset.json").read_text() if (p / "dataset.json").exists() else None
        return _items_from_names("dir", str(p), names, [str(p / n) for n in names], meta)
    if p.suffix.lower() == ".zip":
        try:
            zf = zipfile.ZipFile(p)
        except zipfile.BadZipFile as e:
            raise ShardInputError(f"{p}: not a readable zip file: {e}") from None
        with zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir() and i.filename != "dataset.json"]
            meta = zf.read("dataset.json").decode() if "dataset.json" in zf.namelist() else None
        return _items_from_names("zip", str(p), names, names, meta)
    if p.suffix.lower() in (".npz", ".npy"):
        return _array_source(p, opts)
    raise ShardInputError(f"{p}: unknown source kind (expected a folder, .zip, .npz or .npy)")


def _array_source(p: Path, opts: Options) -> Source:
    labels = None
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
    except (ValueError, OSError) as e:
        if isinstance(e, ShardInputError):
            raise
        raise ShardInputError(f"{p}: cannot read the array: {e}") from None
    if opts.encoding == "latent":
        _check_latent_array(p, images, opts)
    elif images.dtype != np.uint8:
        hint = (" (for latents pass --format latent)" if np.issubdtype(images.dtype, np.floating) else "")
        raise ShardInputError(f"{p}: images are {images.dtype}, expected uint8 (scale to 0..255 and cast "
                              f"first){hint}")
    elif images.ndim == 4 and images.shape[-1] == 1:
        pass
    elif not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise ShardInputError(f"{p}: images have shape {images.shape}, expected (N, H, W), (N, H, W, 1) or (N, H, W, 3)")
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
    return Source("array", str(p), items, classes, labels is not None, array=images)


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


# --------------------------------------------------------------------------------------------
# One sample: load, check, transform, encode (runs in the worker processes)

def _to_pil(data, path_suffix: str):
    from PIL import Image
    if isinstance(data, np.ndarray):
        return Image.fromarray(data[:, :, 0] if data.ndim == 3 and data.shape[2] == 1 else data)
    if len(data) == 0:
        raise BadInput("empty file")
    try:
        im = Image.open(io.BytesIO(data))
    except Exception as e:
        if path_suffix in IMAGE_SUFFIXES:
            detail = (f"Pillow cannot identify the data of this {path_suffix} file" if "cannot identify" in str(e)
                      else str(e))
            raise BadInput("undecodable", detail) from None
        raise BadInput("not an image", f"cannot identify the format ({path_suffix or 'no extension'})") from None
    try:
        im.verify()                                  # checksums (PNG CRCs) and structure
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:
        msg = str(e)
        if "truncat" in msg.lower() or isinstance(e, EOFError):
            raise BadInput("truncated", msg) from None
        raise BadInput("undecodable", msg) from None
    return im


def native_channels(im) -> int:
    return 1 if im.mode in GRAY_MODES else 3


def _prepare(data, path: str, resolution: int | None, channels: int | None, transform: str):
    """-> (R, R, C) uint8 array; raises BadInput."""
    from PIL import Image
    im = _to_pil(data, Path(path.split("[")[0]).suffix.lower())
    if im.mode not in GRAY_MODES | COLOR_MODES:
        raise BadInput("unsupported mode", f"mode {im.mode} (8-bit gray or color images only)")
    if channels is None:
        channels = native_channels(im)
    im = im.convert("L" if channels == 1 else "RGB")
    w, h = im.size
    if transform == "none":
        if w != h:
            raise BadInput("wrong size", f"{w}x{h} is not square (give --transform center-crop)")
        if resolution is not None and (w, h) != (resolution, resolution):
            raise BadInput("wrong size", f"{w}x{h}, expected {resolution}x{resolution} (give --transform to resize)")
    elif transform == "resize":
        im = im.resize((resolution, resolution), Image.LANCZOS)
    elif transform == "center-crop":            # EDM dataset_tool: largest centred square, then resize
        c = min(w, h)
        im = im.crop(((w - c) // 2, (h - c) // 2, (w - c) // 2 + c, (h - c) // 2 + c))
        im = im.resize((resolution, resolution), Image.LANCZOS)
    elif transform == "center-crop-dhariwal":   # ADM: box-halve while large, bicubic, centre crop
        while min(*im.size) >= 2 * resolution:
            im = im.resize(tuple(x // 2 for x in im.size), Image.BOX)
        scale = resolution / min(*im.size)
        im = im.resize(tuple(round(x * scale) for x in im.size), Image.BICUBIC)
        w, h = im.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(im)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _encode(arr: np.ndarray, encoding: str, quality: int) -> bytes:
    if encoding == "raw":
        return np.ascontiguousarray(arr).tobytes()
    from PIL import Image
    im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    if encoding == "png":
        im.save(buf, format="PNG")
    elif encoding == "jpeg":
        # full-resolution chroma at high quality: 4:2:0 smears colour edges of small images
        im.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        im.save(buf, format="WEBP", quality=quality, lossless=quality == 100)
    return buf.getvalue()


def _prepare_latent(arr: np.ndarray, st: dict) -> bytes:
    """One latent sample -> its stored bytes (H x W x C, little-endian ``st['dtype']``); raises BadInput."""
    a = np.asarray(arr)
    if st["layout"] == "nchw":
        a = a.transpose(1, 2, 0)
    bad = int(np.count_nonzero(~np.isfinite(a)))
    if bad:
        raise BadInput("non-finite", f"{bad} NaN or infinite value(s) of {a.size}")
    with np.errstate(over="ignore"):                 # an overflow to inf is reported just below
        stored = np.ascontiguousarray(a, dtype=LATENT_DTYPES[st["dtype"]])
    bad = int(np.count_nonzero(~np.isfinite(stored)))
    if bad:
        raise BadInput("non-finite", f"{bad} value(s) overflow {st['dtype']} (largest |v| {float(np.abs(a).max()):g}; "
                                     f"use --dtype float32)")
    return stored.tobytes()


_WORKER: dict = {}


def _pool_context():
    """fork while this process runs a single thread (the CLI): fast, and the workers share the item
    list. A process with other threads (a trainer's writers, DALI, a test runner) gets forkserver:
    a thread holding a lock at fork time would leave that lock held forever in the child."""
    methods = multiprocessing.get_all_start_methods()
    try:
        threads = len(os.listdir("/proc/self/task"))      # native threads too, on Linux
    except OSError:
        threads = threading.active_count()
    if "fork" in methods and threads == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _init_worker(source: Source, settings: dict) -> None:
    source._zip = None        # a forked worker must not share the parent's zip file position
    # A worker forked from a process with its own SIGTERM handler (a trainer, a test runner) must
    # still die when the pool terminates it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER["source"], _WORKER["settings"] = source, settings


def _process_chunk(chunk: list[int]) -> list[tuple[int, bytes | None, str | None]]:
    """-> per item (position, encoded bytes or None, 'reason: detail' or None)."""
    src, st = _WORKER["source"], _WORKER["settings"]
    out = []
    for pos in chunk:
        item = src.items[pos]
        try:
            try:
                data = src.load(item.ref)
            except (OSError, KeyError, zipfile.BadZipFile) as e:
                raise BadInput("unreadable", str(e)) from None
            if st["encoding"] == "latent":
                out.append((pos, _prepare_latent(data, st), None))
            else:
                arr = _prepare(data, item.path, st["resolution"], st["channels"], st["transform"])
                out.append((pos, _encode(arr, st["encoding"], st["quality"]), None))
        except BadInput as e:
            out.append((pos, None, f"{e.reason}: {e.detail}" if e.detail else e.reason))
    return out


# --------------------------------------------------------------------------------------------
# Writing

class _TarShard:
    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.with_name(final.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.entries: list[list[tuple[str, int, int, str]]] = []

    @staticmethod
    def cost(sizes) -> int:
        return sum(512 + -(-s // 512) * 512 for s in sizes)

    def projected(self, sizes) -> int:
        end = self.tar.offset + self.cost(sizes) + 2 * tarfile.BLOCKSIZE     # two zero blocks close a tar
        return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE            # padded to whole records

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        comps = []
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            offset = self.tar.offset + tarfile.BLOCKSIZE      # ustar header = one block for short names
            self.tar.addfile(info, io.BytesIO(data))
            comps.append((ext, offset, len(data), info.name))
        self.entries.append(comps)

    def finish(self, index_path: Path) -> dict:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        idx_tmp = index_path.with_name(index_path.name + ".tmp")
        write_index(idx_tmp, self.entries)
        rec = {"tar": self.final.name, "index": index_path.name, "count": len(self.entries),
               "bytes": self.tmp.stat().st_size, "sha256": sha256_file(self.tmp),
               "index_bytes": idx_tmp.stat().st_size, "index_sha256": sha256_file(idx_tmp)}
        os.replace(idx_tmp, index_path)
        os.replace(self.tmp, self.final)
        return rec

    def abandon(self) -> None:
        try:
            self.tar.close()
        except Exception:
            pass
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _keys_hash(items: list[Item], start: int, end: int) -> str:
    h = hashlib.sha256()
    for it in items[start:end]:
        h.update(f"{it.key}\0{it.label}\n".encode())
    return h.hexdigest()[:16]


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _probe(src: Source, opts: Options, log) -> tuple[int, int]:
    """Resolution and channel count: given, or from the first image that decodes."""
    if opts.encoding == "latent":
        if src.kind != "array":
            raise ShardInputError(f"{src.root}: --format latent reads a .npy or .npz float array, not image files")
        h, _, c = latent_shape(src.array.shape, opts.layout)
        return h, c
    if src.kind == "array":
        a = src.array
        ch = 1 if a.ndim == 3 or a.shape[-1] == 1 else 3
        if opts.transform == "none" and a.shape[1] != a.shape[2]:
            raise ShardInputError(f"{src.root}: images are {a.shape[2]}x{a.shape[1]}, not square; give --transform")
        res = opts.resolution or a.shape[1]
        return res, ch if opts.channels == "auto" else int(opts.channels)
    bad_pos = {b[0] for b in src.bad}
    for pos, item in enumerate(src.items):
        if pos in bad_pos:
            continue
        try:
            im = _to_pil(src.load(item.ref), Path(item.path).suffix.lower())
        except (BadInput, OSError):
            continue
        if im.mode not in GRAY_MODES | COLOR_MODES or (opts.transform == "none" and im.size[0] != im.size[1]):
            continue
        ch = native_channels(im) if opts.channels == "auto" else int(opts.channels)
        return opts.resolution or im.size[0], ch
    raise ShardInputError(f"{src.root}: no image in the source could be decoded "
                          f"({len(src.items)} files; the bad-input report follows)")


def write_shards(source: str | Path, out_dir: str | Path, **options) -> dict:
    """Shard ``source`` into ``out_dir``; returns the manifest. See `Options` for the options."""
    opts = Options(**options)
    opts.check()
    log = _Log(opts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = open_source(source, opts)
    items = src.items
    if not items:
        raise ShardInputError(f"{source}: the source is empty (no files or no array rows)")
    resolution, channels = _probe(src, opts, log)
    per_shard = min(opts.max_count, max(1, math.ceil(len(items) / opts.min_shards)))
    settings = {"resolution": resolution, "channels": channels, "transform": opts.transform,
                "encoding": opts.encoding, "quality": opts.quality if opts.encoding in ("jpeg", "webp") else None}
    latent = opts.encoding == "latent"
    if latent:
        settings.update(layout=opts.layout, dtype=opts.dtype, scale=float(opts.latent_scale))
    fingerprint = dict(settings, source=str(Path(source).resolve()), kind=src.kind, per_shard=per_shard,
                       max_bytes=opts.max_bytes, name=opts.name, n_items=len(items), tool_version=TOOL_VERSION)
    journal_path = out / f"{opts.name}.progress.json"
    manifest_path = out / MANIFEST

    if opts.overwrite:
        _remove_outputs(out, opts.name)
    elif manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("fingerprint") == fingerprint:
            check_files(out, old, checksums=True)
            log.info(f"{out}: already complete ({old['count']} samples in {len(old['shards'])} shards)")
            return old
        raise ShardInputError(f"{out} already holds shards written with other options or another source; "
                              f"pass --overwrite to replace them, or choose another folder")

    done = _resume(out, opts.name, journal_path, fingerprint, items, log)
    start = done[-1]["input_end"] if done else 0
    listing_bad = {pos: (path, reason) for pos, path, reason in src.bad}
    dup = _duplicates(items)
    written = sum(r["count"] for r in done)

    todo = list(range(start, len(items)))
    step = max(1, min(32, per_shard // 4))         # work units for the pool, small next to a shard
    chunks = [todo[i:i + step] for i in range(0, len(todo), step)]
    workers = opts.workers or os.cpu_count() or 1
    t0 = time.time()
    shard: _TarShard | None = None
    shard_start, shard_skipped = start, []
    bar = log.bar(len(items), start)
    pool = None
    try:
        if workers > 1 and len(chunks) > 1:
            pool = _pool_context().Pool(workers, initializer=_init_worker, initargs=(src, settings))
            results = pool.imap(_process_chunk, chunks)
        else:
            _init_worker(src, settings)
            results = map(_process_chunk, chunks)
        for chunk_result in results:
            for pos, data, reason in chunk_result:
                bar.update(1)
                item = items[pos]
                if pos in listing_bad:
                    reason = listing_bad[pos][1]
                elif pos in dup:
                    reason = f"duplicate key: {item.key!r} also names {items[dup[pos]].path}"
                if reason is not None:
                    if opts.on_error == "stop":
                        raise ShardInputError(f"{item.path}: {reason} (fix or remove it, or pass --on-error skip "
                                              f"to skip bad inputs and count them)")
                    log.warn(f"skipped {item.path}: {reason}")
                    shard_skipped.append({"path": item.path, "reason": reason})
                    continue
                members = [(IMAGE_EXTS[opts.encoding], data),
                           (LABEL_EXT, np.asarray([item.label], LABEL_DTYPE).tobytes())]
                sizes = [len(d) for _, d in members]
                if shard is not None and (len(shard.entries) >= per_shard or shard.projected(sizes) > opts.max_bytes):
                    done.append(_close_shard(shard, out, pos, shard_start, shard_skipped, items, journal_path,
                                             fingerprint, done))
                    shard, shard_start, shard_skipped = None, pos, []
                if shard is None:
                    shard = _TarShard(out / f"{opts.name}-{len(done):06d}.tar")
                shard.add(f"{written:09d}", members)
                written += 1
        if shard is not None:
            done.append(_close_shard(shard, out, len(items), shard_start, shard_skipped, items, journal_path,
                                     fingerprint, done))
            shard = None
        elif shard_skipped and done:       # bad inputs after the last shard: account them to it
            done[-1]["skipped"].extend(shard_skipped)
            done[-1]["input_end"] = len(items)
            _atomic_json(journal_path, {"fingerprint": fingerprint, "shards": done})
        skipped = [s for rec in done for s in rec["skipped"]]
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
        if shard is not None:
            shard.abandon()
    if written == 0:
        raise ShardInputError(f"{source}: every input was skipped ({len(shard_skipped)} bad); nothing to write")

    reasons = Counter(s["reason"].split(":")[0] for s in skipped)
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION if latent else 1, "tool": "pdiff shard", "tool_version": TOOL_VERSION,
        "command": opts.command or ["write_shards", str(source), str(out_dir)],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": str(source), "resolution": resolution, "channels": channels,
        "encoding": opts.encoding, "image_ext": IMAGE_EXTS[opts.encoding], "label_ext": LABEL_EXT,
        "label_dtype": LABEL_DTYPE.str, "quality": settings["quality"], "transform": opts.transform,
        "count": written, "labeled": src.labeled, "num_classes": len(src.classes), "classes": src.classes,
        "shards": [{k: r[k] for k in ("tar", "index", "count", "bytes", "sha256", "index_bytes", "index_sha256")}
                   for r in done],
        "bytes": sum(r["bytes"] for r in done),
        "skipped": {"count": len(skipped), "by_reason": dict(reasons), "items": skipped},
        "fingerprint": fingerprint,
    }
    if latent:      # samples are H x W x C (the input's layout was converted); values as given
        manifest.update(dtype=opts.dtype, shape=[resolution, resolution, channels], layout="hwc",
                        scale=float(opts.latent_scale), input_layout=opts.layout)
    if len(done) < opts.min_shards:
        log.warn(f"only {len(done)} shards for --min-shards {opts.min_shards} (bad inputs were skipped)")
    _atomic_json(manifest_path, manifest)
    journal_path.unlink(missing_ok=True)
    log.info(summary(manifest, time.time() - t0))
    return manifest


def _close_shard(shard, out, end, start, skipped, items, journal_path, fingerprint, done) -> dict:
    rec = shard.finish(out / shard.final.name.replace(".tar", ".idx"))
    rec.update(input_start=start, input_end=end, keys=_keys_hash(items, start, end), skipped=skipped)
    _atomic_json(journal_path, {"fingerprint": fingerprint, "shards": done + [rec]})
    return rec


def _duplicates(items: list[Item]) -> dict[int, int]:
    first: dict[str, int] = {}
    dup = {}
    for pos, it in enumerate(items):
        if it.key in first:
            dup[pos] = first[it.key]
        else:
            first[it.key] = pos
    return dup


def _shard_files(out: Path, name: str) -> list[Path]:
    return [p for p in out.glob(f"{name}-*") if p.name.endswith((".tar", ".idx", ".tmp"))]


def _remove_outputs(out: Path, name: str) -> None:
    for p in _shard_files(out, name) + [out / MANIFEST, out / f"{name}.progress.json"]:
        p.unlink(missing_ok=True)


def _resume(out: Path, name: str, journal_path: Path, fingerprint: dict, items, log):
    """Keep the journal's shards that still match (in order); remove every other shard file."""
    done: list[dict] = []
    if journal_path.exists():
        journal = json.loads(journal_path.read_text())
        if journal.get("fingerprint") != fingerprint and not journal.get("shards"):
            journal = {"shards": []}              # nothing was finished: nothing to protect
        elif journal.get("fingerprint") != fingerprint:
            raise ShardInputError(f"{out} holds an unfinished run with other options or another source; "
                                  f"pass --overwrite to start again, or re-run the original command")
        for rec in journal["shards"]:
            tar, idx = out / rec["tar"], out / rec["index"]
            ok = (tar.exists() and idx.exists() and tar.stat().st_size == rec["bytes"]
                  and rec["keys"] == _keys_hash(items, rec["input_start"], rec["input_end"])
                  and sha256_file(tar) == rec["sha256"] and sha256_file(idx) == rec["index_sha256"])
            if not ok:
                log.warn(f"{tar}: does not match the progress record; writing it again from there")
                break
            done.append(rec)
        if done:
            log.info(f"{out}: resuming after {len(done)} complete shards")
    keep = {out / r["tar"] for r in done} | {out / r["index"] for r in done}
    for p in _shard_files(out, name):
        if p not in keep:
            p.unlink()
    _atomic_json(journal_path, {"fingerprint": fingerprint, "shards": done})
    return done


class _Log:
    def __init__(self, opts: Options):
        self.show = sys.stderr.isatty() if opts.progress is None else opts.progress
        self.quiet = opts.progress is False

    def info(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr)

    def warn(self, msg: str) -> None:
        print(msg, file=sys.stderr)

    def bar(self, total: int, initial: int):
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, disable=not self.show, unit="img", desc="shard")


def summary(manifest: dict, seconds: float | None = None) -> str:
    m = manifest
    lines = [f"{m['count']} samples in {len(m['shards'])} shards, {m['bytes'] / 1e6:.1f} MB"
             + (f", {seconds:.1f} s" if seconds is not None else "")]
    sk = m["skipped"]
    if sk["count"]:
        lines.append(f"skipped {sk['count']} inputs: " + ", ".join(f"{r} {n}" for r, n in sorted(sk["by_reason"].items())))
    else:
        lines.append("skipped 0 inputs")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# verify / info

def verify(root: str | Path, log=print) -> tuple[bool, str]:
    """Sizes and checksums against the manifest, then decode every sample. Returns (ok, message)
    where the message names the first bad shard and sample."""
    root = Path(root)
    try:
        m = load_manifest(root)
    except ShardError as e:
        return False, str(e)
    R, C, enc = m["resolution"], m["channels"], m["encoding"]
    if enc not in IMAGE_EXTS:
        return False, f"{root}: unknown encoding {enc!r} in the manifest"
    ext = IMAGE_EXTS[enc]
    try:
        dtype = sample_dtype(m)
    except ShardError as e:
        return False, f"{root}: {e}"
    total = 0
    for rec in m["shards"]:
        tar, idx = root / rec["tar"], root / rec["index"]
        for p, size, sha in ((tar, rec["bytes"], rec["sha256"]), (idx, rec["index_bytes"], rec["index_sha256"])):
            if not p.exists():
                return False, f"{p}: missing"
            if p.stat().st_size != size:
                return False, f"{p}: {p.stat().st_size} bytes, the manifest says {size} (truncated or replaced)"
            if sha256_file(p) != sha:
                return False, f"{p}: sha256 differs from the manifest (corrupted)"
        try:
            entries = read_index(idx)
        except ShardError as e:
            return False, str(e)
        if len(entries) != rec["count"]:
            return False, f"{idx}: {len(entries)} samples, the manifest says {rec['count']}"
        with open(tar, "rb") as f:
            blob = f.read()
        for k, e in enumerate(entries):
            where = f"{tar}: sample #{k} (global {total + k})"
            if ext not in e or LABEL_EXT not in e:
                return False, f"{where}: lacks .{ext} or .{LABEL_EXT}"
            (io_, isz), (lo, lsz) = e[ext], e[LABEL_EXT]
            if io_ + isz > len(blob) or lo + lsz > len(blob) or lsz != 4:
                return False, f"{where}: index points outside the archive"
            try:
                arr = decode_image(blob[io_:io_ + isz], enc, R, C, dtype)
            except Exception as err:
                return False, f"{where}: cannot decode: {err}"
            if enc == "latent" and not np.isfinite(arr).all():
                return False, f"{where}: {int(np.count_nonzero(~np.isfinite(arr)))} non-finite value(s)"
            label = int(np.frombuffer(blob[lo:lo + 4], LABEL_DTYPE)[0])
            if m["labeled"] and not 0 <= label < m["num_classes"]:
                return False, f"{where}: label {label} outside 0..{m['num_classes'] - 1}"
        total += rec["count"]
    if total != m["count"]:
        return False, f"{root}: shards hold {total} samples, the manifest says {m['count']}"
    return True, f"{root}: OK, {total} samples in {len(m['shards'])} shards decode and match the manifest"


def info(root: str | Path) -> str:
    m = load_manifest(root)
    sizes = [r["bytes"] for r in m["shards"]]
    counts = [r["count"] for r in m["shards"]]
    classes = m["classes"]
    if m["encoding"] == "latent":
        what = [f"latents     {m['count']} of {m['resolution']}x{m['resolution']}x{m['channels']} (H x W x C)",
                f"stored as   latent {m['dtype']}, scale {m['scale']:g} (already applied by the user; "
                f"input layout {m.get('input_layout', 'nhwc')})"]
    else:
        what = [f"images      {m['count']} at {m['resolution']}x{m['resolution']}, {m['channels']} channel(s)",
                f"stored as   {m['encoding']}" + (f" (quality {m['quality']})" if m.get("quality") else "")
                + f", transform {m['transform']}"]
    lines = [
        f"folder      {root}",
        *what,
        f"labels      " + (f"{m['num_classes']} classes: " + ", ".join(classes[:12]) + (" ..." if len(classes) > 12 else "")
                           if m["labeled"] else "none"),
        f"shards      {len(sizes)} ({m['shards'][0]['tar']} .. {m['shards'][-1]['tar']}), "
        f"{min(counts)}..{max(counts)} samples, {min(sizes) / 1e6:.2f}..{max(sizes) / 1e6:.2f} MB, total {m['bytes'] / 1e6:.1f} MB",
        f"skipped     {m['skipped']['count']}" + ("" if not m["skipped"]["count"] else " ("
                                                  + ", ".join(f"{r} {n}" for r, n in m["skipped"]["by_reason"].items()) + ")"),
        f"source      {m['source']}",
        f"written     {m['created']} by {m['tool']} {m['tool_version']}",
        f"command     {' '.join(m['command'])}",
    ]
    return "\n".join(lines)
