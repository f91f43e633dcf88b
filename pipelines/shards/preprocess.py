"""One sample on its way into a shard: load it, check it, bring it to R x R (the transforms), encode
it. Runs in the writer's worker processes (numpy and Pillow only). A bad input raises `BadInput` with
a short reason (the skip report counts by it) and a detail."""
from __future__ import annotations

import io
import signal
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pdiff.network_config import UNetConfig
from pdiff.pipelines.sample_source import LATENT_DTYPES
from pdiff.pipelines.shards.inputs import IMAGE_SUFFIXES, Inputs, ShardInputError, latent_shape
from pdiff.schedule import default_patch_sizes

if TYPE_CHECKING:
    from pdiff.pipelines.shards.options import Options

TRANSFORMS = ("none", "center-crop", "center-crop-dhariwal", "resize")
GRAY_MODES = {"1", "L", "LA", "La"}
COLOR_MODES = {"P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def image_batches(results, batch: int):
    """The worker processes' chunks of results (input position, sample bytes or None, bad-input reason),
    re-cut into lists holding ``batch`` images each (bad inputs ride along in their place; the last list
    may hold fewer): what an encoder that runs once per ``batch`` images consumes."""
    pending, images = [], 0
    for chunk in results:
        for result in chunk:
            pending.append(result)
            if result[1] is not None:
                images += 1
                if images == batch:
                    yield pending
                    pending, images = [], 0
    if pending:
        yield pending


class BadInput(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


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


def _prepare(data, path: str, resolution: int | None, channels: int, transform: str, auto_channels: bool = False,
             upscaled: list[str] | None = None):
    """-> (R, R, C) uint8 array; raises BadInput. With ``auto_channels`` (the count was taken from most
    images) a grayscale image joins a color set as RGB (nothing is lost), but a color image in a
    grayscale set is a bad input: turning it gray would lose its color without a word. An image whose
    shorter side is under R is enlarged by the transform: its size 'WxH' is appended to ``upscaled``."""
    from PIL import Image
    im = _to_pil(data, Path(path.split("[")[0]).suffix.lower())
    if im.mode not in GRAY_MODES | COLOR_MODES:
        raise BadInput("unsupported mode", f"mode {im.mode} (8-bit gray or color images only)")
    if auto_channels and channels == 1 and native_channels(im) == 3:
        raise BadInput("color image", "in a grayscale set (most images are grayscale); pass --channels 1 to "
                                      "convert it to gray, or --channels 3 to keep the colors of all")
    im = im.convert("L" if channels == 1 else "RGB")
    w, h = im.size
    if transform != "none" and min(w, h) < resolution and upscaled is not None:
        upscaled.append(f"{w}x{h}")
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


# --------------------------------------------------------------------------------------------
# The worker processes: each holds the inputs and the settings, and turns chunks of positions into
# encoded samples or bad-input reasons.

_WORKER: dict = {}


class Chunk(list):
    """`process_chunk`'s results, a list as before, with the images among them that the transform
    enlarged: ``upscaled``, (position, 'WxH') each (it travels from the worker processes with the list)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.upscaled: list[tuple[int, str]] = []


def init_worker(source: Inputs, settings: dict) -> None:
    source._zip = None        # a forked worker must not share the parent's zip file position
    # A worker forked from a process with its own SIGTERM handler (a trainer, a test runner) must
    # still die when the pool terminates it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER["source"], _WORKER["settings"] = source, settings


def process_chunk(chunk: list[int]) -> list[tuple[int, bytes | None, str | None]]:
    """-> per item (position, encoded bytes or None, 'reason: detail' or None)."""
    src, st = _WORKER["source"], _WORKER["settings"]
    out = Chunk()
    for pos in chunk:
        item = src.items[pos]
        try:
            try:
                data = src.load(item.ref)
            except (OSError, KeyError, zipfile.BadZipFile) as e:
                raise BadInput("unreadable", str(e)) from None
            if st["encoding"] == "latent" and not st.get("vae"):
                out.append((pos, _prepare_latent(data, st), None))
            else:       # images; those for a VAE go to its encoder (encode_vae.py) as raw pixels
                size: list[str] = []
                arr = _prepare(data, item.path, st["resolution"], st["channels"], st["transform"], st["auto_channels"],
                               size)
                out.upscaled += [(pos, s) for s in size]
                out.append((pos, _encode(arr, "raw" if st.get("vae") else st["encoding"], st["quality"]), None))
        except BadInput as e:
            out.append((pos, None, f"{e.reason}: {e.detail}" if e.detail else e.reason))
    return out


PROBE_IMAGES = 64       # images looked at (spread over the source) to find its size and channel count


def probe(src: Inputs, opts: Options) -> tuple[int, int]:
    """Resolution and channel count: given, or what most of up to PROBE_IMAGES images spread over the
    source have (their headers only), so that one odd image that sorts first is named as the odd one
    instead of making every other image wrong."""
    if opts.encoding == "latent" and not opts.encode_vae:
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
    need_size = opts.resolution is None
    sizes: dict[int, list[str]] = {}
    channels: dict[int, list[str]] = {}
    not_square: list[str] = []
    bad_pos = {b[0] for b in src.bad}
    candidates = [pos for pos in range(len(src.items)) if pos not in bad_pos]
    picks = [candidates[int(k)] for k in np.unique(np.linspace(0, len(candidates) - 1, PROBE_IMAGES).round())] \
        if candidates else []
    for pos in picks:
        item = src.items[pos]
        try:
            size, mode = _header(src.load(item.ref))
        except Exception:                   # reported with its reason when it is written
            continue
        if mode not in GRAY_MODES | COLOR_MODES:
            continue
        channels.setdefault(1 if mode in GRAY_MODES else 3, []).append(item.path)
        if need_size and size[0] == size[1]:
            sizes.setdefault(size[0], []).append(item.path)
        elif need_size:
            not_square.append(f"{item.path}, {size[0]}x{size[1]}")
    if need_size and opts.on_error == "stop" and (len(sizes) > 1 or not_square):
        raise ShardInputError(_several_sizes(src.root, sizes, not_square))
    if not channels or (need_size and not sizes):
        raise ShardInputError(f"{src.root}: none of the {len(picks)} images looked at could be read as a square "
                              f"8-bit image ({len(src.items)} files; pass --resolution and --channels, or check "
                              f"the files)")
    res = opts.resolution or _majority(sizes, src.root, "sizes", lambda r: f"{r}x{r}", "--resolution")
    # A tie of gray and color goes to 3: gray images become RGB without a loss; the reverse would lose color.
    ch = (_majority(channels, src.root, "channel counts", str, "--channels", tie=3) if opts.channels == "auto"
          else int(opts.channels))
    return res, ch


def _several_sizes(root: str, sizes: dict[int, list[str]], not_square: list[str]) -> str:
    """Why images of several sizes cannot be sharded without --resolution, and the options that will."""
    ranked = sorted(sizes, key=lambda r: -len(sizes[r]))
    seen = [f"{r}x{r}: {len(sizes[r])} (e.g. {sizes[r][0]})" for r in ranked]
    seen += [f"not square: {len(not_square)} (e.g. {not_square[0]})"] if not_square else []
    looked_at = sum(map(len, sizes.values())) + len(not_square)
    common = ranked[0] if ranked else None
    r = common if common and trains_with_defaults(common) else (nearest_default_resolutions(common or 0)[0])
    tie = len(ranked) > 1 and len(sizes[ranked[0]]) == len(sizes[ranked[1]])
    skip = (f"; or pass --on-error skip to leave out every image that is not {common}x{common}"
            if common and not tie else "")
    return (f"{root}: the images are not all of one square size ({'; '.join(seen)}, of {looked_at} looked at): "
            f"pass --resolution R --transform center-crop to bring each to R x R (the centre square; --transform "
            f"resize stretches instead), e.g. --resolution {r} --transform center-crop{skip}")


# Which resolutions train with the defaults: the default patch sizes (`default_patch_sizes`: {R/2, R}
# below 64 px, {R/4, R/2, R} from 64; docs/patch_defaults.md) must each divide R, and the default
# network downsamples by 2 ** (len(network.channel_mult) - 1), which must divide every patch size.
DEFAULT_DOWNSAMPLE = 2 ** (len(UNetConfig().channel_mult) - 1)    # the default network, DDPM++, is a U-Net


def trains_with_defaults(resolution: int) -> bool:
    """Whether R x R images train with the default patch sizes on the default network."""
    if resolution < 1:
        return False
    sizes, _ = default_patch_sizes(resolution, 0.5)
    return all(s >= 1 and resolution % s == 0 and s % DEFAULT_DOWNSAMPLE == 0 for s in sizes)


def nearest_default_resolutions(resolution: int) -> list[int]:
    """The resolutions nearest ``resolution`` that train with the defaults: the nearest below, where
    there is one, and the nearest above."""
    below = next((r for r in range(resolution - 1, 0, -1) if trains_with_defaults(r)), None)
    above = next(r for r in range(max(resolution + 1, 1), 2 ** 31) if trains_with_defaults(r))
    return [r for r in (below, above) if r is not None]


def resolution_refusal(resolution: int) -> str:
    """'' when ``resolution`` trains with the defaults, else why not and the nearest sizes that do."""
    if trains_with_defaults(resolution):
        return ""
    near = " or ".join(map(str, nearest_default_resolutions(resolution)))
    if resolution < 1:
        return f"--resolution {resolution}: must be positive; the smallest that trains with the defaults is {near}"
    d = DEFAULT_DOWNSAMPLE
    sizes, _ = default_patch_sizes(resolution, 0.5)
    parts = [(f"R/{k}", resolution / k) for k in ((4, 2) if len(sizes) == 3 else (2,))]
    wrong = [f"{name} = {v:g} is not a whole number" if v != int(v) else f"{name} = {v:g} is not a multiple of {d}"
             for name, v in parts if v != int(v) or int(v) % d]
    return (f"--resolution {resolution}: {'; '.join(wrong)}, and the default patch sizes (R/2 and R below 64 px, "
            f"R/4, R/2 and R from 64; docs/patch_defaults.md) must be whole multiples of {d}, the default "
            f"network's downsampling factor (2 ** (len(network.channel_mult) - 1)): so R must be a multiple of "
            f"{2 * d} below 64 px and of {4 * d} from 64. The nearest that train with the defaults: {near}")


def _header(data) -> tuple[tuple[int, int], str]:
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        return im.size, im.mode


def _majority(votes: dict[int, list[str]], root: str, what: str, show, flag: str, tie: int | None = None) -> int:
    """The value most images have; a tie is ``tie`` where given, else refused, naming an image of each value."""
    ranked = sorted(votes, key=lambda v: -len(votes[v]))
    if len(ranked) > 1 and len(votes[ranked[0]]) == len(votes[ranked[1]]):
        if tie is not None:
            return tie
        examples = "; ".join(f"{show(v)}: {len(votes[v])} (e.g. {votes[v][0]})" for v in ranked)
        raise ShardInputError(f"{root}: the images looked at have different {what} and no clear majority "
                              f"({examples}); pass {flag}")
    return ranked[0]
