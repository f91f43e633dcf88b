"""Decode only what is cropped: the header cut of PNG and JPEG (pipelines/regions.py) gives the full
decode's rows bit for bit and really stops the decoder; sources crop regions, reading only the rows
of raw samples; DALI's ROI decoder gives the full decode's JPEG patches."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pdiff.pipelines import dali_available
from pdiff.pipelines.regions import top_rows
from pdiff.pipelines.sample_source import CorruptSample, decode_sample
from pdiff.pipelines.shards import write_shards
from pdiff.pipelines.sources import open_source
from test_shard import as_version_3


def smooth_images(rng, n, r, channels):
    """Colour fields plus noise (as benchmarks use), so the codecs' rounding is exercised."""
    out = []
    for _ in range(n):
        low = rng.integers(0, 256, (5, 5, channels), dtype=np.uint8)
        im = Image.fromarray(low[..., 0] if channels == 1 else low).resize((r, r), Image.BICUBIC)
        out.append(np.clip(np.asarray(im, np.int16).reshape(r, r, channels) + rng.normal(0, 8, (r, r, channels)),
                           0, 255).astype(np.uint8))
    return out


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(buf, format=fmt, **kw)
    return buf.getvalue()


CODECS = [("png", "PNG", {}), ("jpeg", "JPEG", {"quality": 90}), ("jpeg", "JPEG", {"quality": 75, "subsampling": 0}),
          ("jpeg", "JPEG", {"quality": 95, "subsampling": 1})]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("encoding,fmt,kw", CODECS)
def test_top_rows_decode_the_full_decodes_rows(encoding, fmt, kw, channels):
    rng = np.random.default_rng()
    r = int(rng.choice([40, 64, 96]))
    for img in smooth_images(rng, 3, r, channels):
        data = encode(img, fmt, **kw)
        full = decode_sample(data, encoding, r, channels)
        for rows in sorted({1, 7, 8, 9, 16, 17, r // 2, r - 9, r - 1, r, *rng.integers(1, r + 1, 4).tolist()}):
            cut = top_rows(data, encoding, rows)
            part = decode_sample(cut, encoding, r, channels, rows=rows)
            assert rows <= part.shape[0] <= r and part.shape[1:] == (r, channels)
            if encoding == "png":
                assert part.shape[0] == rows                       # the decoder stopped at the patch's last row
            elif rows + 32 <= r:
                assert part.shape[0] < r                           # a JPEG stops within two MCU rows of it
            np.testing.assert_array_equal(part[:rows], full[:rows])


def test_top_rows_leaves_what_it_cannot_cut():
    """Progressive JPEG (every scan covers the whole image), interlaced PNG (rows spread over 7
    passes), WebP and bytes that are no image are decoded whole: their bytes come back unchanged."""
    rng = np.random.default_rng()
    img = smooth_images(rng, 1, 48, 3)[0]
    png, progressive, webp = encode(img, "PNG"), encode(img, "JPEG", progressive=True), encode(img, "WEBP")
    adam7 = bytearray(png)
    adam7[28] = 1                       # the IHDR's interlace method (Pillow writes no interlaced PNGs)
    cases = [(progressive, "jpeg"), (bytes(adam7), "png"), (webp, "webp"), (b"not an image", "png"),
             (b"not an image", "jpeg"), (png, "jpeg"), (progressive, "png"), (png, "raw")]
    for data, enc in cases:
        assert top_rows(data, enc, 5) == data, enc
    assert top_rows(png, "png", 48) == png and top_rows(png, "png", 100) == png     # nothing below to cut


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("regions")
    rng = np.random.default_rng()
    images = np.stack(smooth_images(rng, 12, 48, 3))
    np.savez(root / "d.npz", images=images)
    for enc in ("png", "jpeg", "raw"):
        write_shards(root / "d.npz", root / enc, workers=1, encoding=enc, quality=90, max_count=5, progress=False)
    lat = rng.standard_normal((12, 48, 48, 4)).astype(np.float16)
    np.save(root / "lat.npy", lat)
    write_shards(root / "lat.npy", root / "latent", workers=1, encoding="latent", dtype="float16", max_count=5,
                 progress=False)
    return root


@pytest.mark.parametrize("enc", ["png", "jpeg", "raw", "latent"])
def test_sources_crop_regions_as_the_full_decode(shards, enc):
    src = open_source(shards / enc)
    rng = np.random.default_rng()
    for _ in range(20):
        i, s = int(rng.integers(src.count)), int(rng.choice([12, 24, 48]))
        x0, y0 = (int(v) for v in rng.integers(0, 48 - s + 1, 2))
        got = src.decode_region(i, x0, y0, s)
        assert got.shape == (s, s, src.channels) and got.dtype == src.dtype
        np.testing.assert_array_equal(got, src.decode(i)[y0:y0 + s, x0:x0 + s])


def test_raw_regions_read_only_their_rows(shards, monkeypatch):
    """A raw patch of s rows reads s rows of the sample (s R C bytes), not the sample."""
    src = open_source(shards / "raw")
    reads = []
    real = type(src)._pread
    monkeypatch.setattr(type(src), "_pread", lambda self, i, off, size,
                        what: reads.append(size) or real(self, i, off, size, what))
    out = np.empty((12, 12, 3), np.uint8)
    src.read_region(3, 30, 17, 12, out)
    assert reads == [12 * 48 * 3, int(src.lbl_size[3])]           # the rows, then the label member (its CRC-32)
    np.testing.assert_array_equal(out, src.decode(3)[17:29, 30:42])


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_dali_roi_decoder_gives_the_full_decodes_jpeg_patches(shards):
    """DALI's ROI decoder (fn.decoders.image_slice, what the DALI backend runs) against its full
    decoder followed by a slice, on the CPU: identical here (libjpeg-turbo skips rows and columns
    without changing the pixels it does decode). On the GPU (nvJPEG), test_pipeline's CUDA test allows
    4 levels against the CPU."""
    from nvidia.dali import fn, pipeline_def, types
    src = open_source(shards / "jpeg")
    rng = np.random.default_rng()
    n = src.count
    s = np.array([rng.choice([12, 24, 48]) for _ in range(n)], np.int32)
    anchors = np.array([rng.integers(0, 48 - k + 1, 2) for k in s], np.int32)      # (y0, x0)
    data = [np.frombuffer(src.read(i), np.uint8) for i in range(n)]
    shapes = np.stack([s, s], 1).astype(np.int32)

    @pipeline_def
    def graph(roi):
        d, a, sh = fn.external_source(source=lambda: (data, anchors, shapes), num_outputs=3, batch=True,
                                      dtype=[types.UINT8, types.INT32, types.INT32])
        if roi:
            return fn.decoders.image_slice(d, a, sh, axes=[0, 1], device="cpu", output_type=types.RGB)
        return fn.slice(fn.decoders.image(d, device="cpu", output_type=types.RGB), a, sh, axes=[0, 1])
    out = {}
    for roi in (True, False):
        p = graph(roi, batch_size=n, num_threads=1, device_id=None)
        p.build()
        (o,) = p.run()
        out[roi] = [np.array(o[j]) for j in range(n)]
    for a, b, k in zip(out[True], out[False], s):
        assert a.shape == (k, k, 3)
        np.testing.assert_array_equal(a, b)


BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                    reason="NVIDIA DALI is not installed"))]


def full_decodes(backend, encoded: list[bytes]) -> list[np.ndarray]:
    """Each image decoded whole by the backend's own decoder: Pillow, or DALI's CPU decoder."""
    if backend == "torch":
        return [decode_sample(d, "jpeg", 48, 3) for d in encoded]
    from nvidia.dali import fn, pipeline_def, types
    data = [np.frombuffer(d, np.uint8) for d in encoded]

    @pipeline_def
    def graph():
        return fn.decoders.image(fn.external_source(source=lambda: data, batch=True, dtype=types.UINT8),
                                 device="cpu", output_type=types.RGB)
    p = graph(batch_size=len(data), num_threads=1, device_id=None)
    p.build()
    (out,) = p.run()
    return [np.array(out[j]) for j in range(len(data))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_jpeg_patches_are_the_full_decodes_regions(shards, backend):
    """Through the pipelines, with flips: every JPEG patch equals the region of the image that the
    backend's decoder gives when it decodes it whole (the cut header and the ROI decoder change
    which work is done, not the pixels)."""
    import torch
    from pdiff.config import load_config
    from pdiff.pipelines import build_pipeline
    from pdiff.pipelines.order import SamplePlan
    from pdiff.schedule import StochasticSchedule
    seed = int(np.random.default_rng().integers(1 << 30))
    cfg = load_config(None, [f"data.path={shards / 'jpeg'}", "data.resolution=48", "data.channels=3",
                             f"data.backend={backend}", "data.workers=1", "train.batch=2", f"train.seed={seed}",
                             "data.xflip=true"])
    sch = StochasticSchedule(48, 2, sizes=[12, 24, 48], probs=[0.4, 0.3, 0.3], seed=seed)
    pipe = build_pipeline(cfg, sch, 0, 1)
    src = pipe.source
    full = full_decodes(backend, [src.read(i) for i in range(src.count)])
    plan = SamplePlan(src.count, src.labels, sch, seed, 0, 1, xflip=True)
    for _ in range(6):
        b = next(pipe)
        step = plan.step(b.images_seen)
        s = b.patch_size
        for j, i in enumerate(step.indices):
            x0, y0 = step.read_xy[j]
            want = full[i][y0:y0 + s, x0:x0 + s]
            want = want[:, ::-1] if step.flips[j] else want
            assert torch.equal(b.patches[j], torch.from_numpy(np.array(want)))   # a copy: Pillow arrays are read-only
    pipe.close()


def _damage_row(shards: Path, tmp_path: Path, enc: str, i: int, row: int, col: int, version: int = 4):
    """A copy of the ``enc`` shards (as version 3 if asked) with one byte of sample i's row ``row`` flipped."""
    root = tmp_path / f"{enc}-v{version}"
    shutil.copytree(shards / enc, root)
    if version == 3:
        as_version_3(root)
    clean = open_source(root)
    item = 1 if enc == "raw" else 2                            # uint8 / float16
    c = clean.channels
    tar = root / Path(clean.tars[clean.shard[i]]).name
    blob = bytearray(tar.read_bytes())
    blob[int(clean.img_off[i]) + (row * 48 + col) * c * item + item - 1] ^= 0x7C      # a float16's exponent
    tar.write_bytes(bytes(blob))
    return open_source(root)


@pytest.mark.parametrize("enc", ["raw", "latent"])
def test_row_reads_check_exactly_the_rows_read(shards, tmp_path, enc, monkeypatch):
    """Format version 4: a raw or latent patch read by its rows holds each row against its own CRC-32
    (and the label member against its own): a damaged byte outside the rows is not read and cannot
    matter; inside them it names the sample and the row. The read is the rows plus the label member."""
    rng = np.random.default_rng()
    clean = open_source(shards / enc)
    i, row, col = int(rng.integers(clean.count)), int(rng.integers(30, 48)), int(rng.integers(48))
    src = _damage_row(shards, tmp_path, enc, i, row, col)
    out = np.empty((12, 12, clean.channels), clean.dtype)
    reads = []
    real = type(src)._pread
    monkeypatch.setattr(type(src), "_pread",
                        lambda self, k, off, size, what: reads.append(size) or real(self, k, off, size, what))
    src.read_region(i, 5, 7, 12, out)                          # rows 7..18: the damage is below them
    assert reads == [12 * 48 * clean.channels * clean.dtype.itemsize, int(clean.lbl_size[i])]
    np.testing.assert_array_equal(out, clean.decode(i)[7:19, 5:17])
    with pytest.raises(CorruptSample, match=f"sample {i:09d} .*: its row {row} fails its CRC-32 check"):
        src.read_region(i, 0, row - 11, 12, out)               # the patch's last row is the damaged one
    with pytest.raises(CorruptSample, match=f"sample {i:09d} .*: its data fails its CRC-32 check"):
        src.read_region(i, 0, 0, 48, np.empty((48, 48, clean.channels), clean.dtype))   # whole


def test_version_3_row_reads_keep_their_trade_off(shards, tmp_path):
    """Version 3 keeps one CRC-32 per sample: its raw patches read by rows are not checked (a damaged
    byte in them is a wrong pixel), its latent patches are read whole to be checked, and whole reads
    name the sample, as before version 4."""
    clean = open_source(shards / "raw")
    src = _damage_row(shards, tmp_path, "raw", 7, 30, 5, version=3)
    out = np.empty((12, 12, 3), np.uint8)
    src.read_region(7, 0, 25, 12, out)                          # rows 25..36 hold it: one wrong byte
    assert (out != clean.decode(7)[25:37, 0:12]).sum() == 1
    with pytest.raises(CorruptSample, match="sample 000000007.*CRC-32"):
        src.read_region(7, 0, 0, 48, np.empty((48, 48, 3), np.uint8))
    latent = _damage_row(shards, tmp_path, "latent", 3, 40, 2, version=3)
    with pytest.raises(CorruptSample, match="sample 000000003.*CRC-32"):
        latent.read_region(3, 0, 0, 12, np.empty((12, 12, 4), np.float16))    # the damage is far below
