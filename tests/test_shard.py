"""`pdiff shard`: every input kind round-trips, limits hold, bad inputs are reported, resume and
verify work. Small synthetic images made on the fly."""
from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pdiff.pipelines import dali_available
from pdiff.pipelines.sample_source import CorruptSample
from pdiff.pipelines.shards import ShardError, ShardInputError, ShardSet, read_index, verify, write_shards
from pdiff.pipelines.shards import inputs, preprocess, write
from pdiff.pipelines.shards.format import CRC_HEADER_BYTES, read_crc_file, sha256_file
from pdiff.pipelines.shards.options import write_order
from pdiff.tools.shard import main as shard_main


def rand_images(rng, n, size=16, channels=3):
    shape = (n, size, size) + ((channels,) if channels == 3 else ())
    return rng.integers(0, 256, shape, dtype=np.uint8)


def png_bytes(arr, fmt="PNG", **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def all_samples(root):
    sh = ShardSet(root)
    return np.stack([sh.decode(i) for i in range(sh.count)]), sh.labels


def as_hwc(a):
    return a[..., None] if a.ndim == 3 else a


def written(n, seed=0):
    """Source positions of the samples as written (the default order: seeded random)."""
    return write_order(n, seed)


@pytest.fixture
def rng():
    return np.random.default_rng()


def test_class_folders_roundtrip_png(tmp_path, rng):
    imgs = rand_images(rng, 12)
    classes = ["cat", "dog", "emu"]
    src = tmp_path / "src"
    for i, a in enumerate(imgs):                        # file names sort in the order written
        c = i % 3
        (src / classes[c]).mkdir(parents=True, exist_ok=True)
        (src / classes[c] / f"img{i:03d}.png").write_bytes(png_bytes(a))
    order = np.array(sorted(range(12), key=lambda i: (classes[i % 3], i)))[written(12)]
    m = write_shards(src, tmp_path / "out", workers=1, max_count=5)
    assert m["count"] == 12 and m["labeled"] and m["classes"] == classes and m["num_classes"] == 3
    assert [r["count"] for r in m["shards"]] == [5, 5, 2]
    got, labels = all_samples(tmp_path / "out")
    np.testing.assert_array_equal(got, imgs[order])
    np.testing.assert_array_equal(labels, [i % 3 for i in order])
    assert m["resolution"] == 16 and m["channels"] == 3 and m["skipped"]["count"] == 0


def test_plain_folder_unlabeled_and_zip_same(tmp_path, rng):
    imgs = rand_images(rng, 7, size=32)
    src = tmp_path / "plain"
    src.mkdir()
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        for i, a in enumerate(imgs):
            (src / f"{i:02d}.png").write_bytes(png_bytes(a))
            zf.writestr(f"{i:02d}.png", png_bytes(a))
    for source, out in ((src, "o1"), (tmp_path / "imgs.zip", "o2")):
        m = write_shards(source, tmp_path / out, workers=1)
        assert not m["labeled"] and m["count"] == 7
        got, labels = all_samples(tmp_path / out)
        np.testing.assert_array_equal(got, imgs[written(7)])
        assert (labels == -1).all()


def test_npz_gray_with_labels_and_npy(tmp_path, rng):
    imgs = rand_images(rng, 21, channels=1)
    labels = rng.integers(0, 10, 21)
    np.savez(tmp_path / "d.npz", images=imgs, labels=labels)
    m = write_shards(tmp_path / "d.npz", tmp_path / "o", workers=1, resolution=16, min_shards=4)
    assert m["channels"] == 1 and m["count"] == 21 and len(m["shards"]) >= 4
    got, lab = all_samples(tmp_path / "o")
    np.testing.assert_array_equal(got, imgs[written(21)][..., None])
    np.testing.assert_array_equal(lab, labels[written(21)])
    assert m["num_classes"] == labels.max() + 1
    np.save(tmp_path / "d.npy", imgs)
    np.save(tmp_path / "l.npy", labels)
    m2 = write_shards(tmp_path / "d.npy", tmp_path / "o2", workers=1, labels_file=str(tmp_path / "l.npy"),
                      encoding="raw", shuffle_seed=None)
    got2, lab2 = all_samples(tmp_path / "o2")
    np.testing.assert_array_equal(got2, imgs[..., None])          # shuffle_seed=None: the source order
    np.testing.assert_array_equal(lab2, labels)
    assert m2["encoding"] == "raw"


def test_edm_zip_with_dataset_json(tmp_path, rng):
    imgs = rand_images(rng, 6)
    labels = rng.integers(0, 4, 6)
    with zipfile.ZipFile(tmp_path / "edm.zip", "w") as zf:
        names = []
        for i, a in enumerate(imgs):
            name = f"{i // 1000:05d}/img{i:08d}.png"
            zf.writestr(name, png_bytes(a))
            names.append([name, int(labels[i])])
        zf.writestr("dataset.json", json.dumps({"labels": names}))
    m = write_shards(tmp_path / "edm.zip", tmp_path / "o", workers=1)
    got, lab = all_samples(tmp_path / "o")
    np.testing.assert_array_equal(got, imgs[written(6)])
    np.testing.assert_array_equal(lab, labels[written(6)])
    assert m["labeled"] and m["num_classes"] == labels.max() + 1


@pytest.mark.parametrize("encoding,quality", [("jpeg", 95), ("webp", 100), ("raw", 95)])
def test_encodings(tmp_path, rng, encoding, quality):
    # smooth images so that JPEG stays close
    base = rng.integers(0, 256, (5, 4, 4, 3)).astype(np.uint8)
    imgs = np.stack([np.asarray(Image.fromarray(b).resize((16, 16), Image.BILINEAR)) for b in base])
    np.savez(tmp_path / "d.npz", images=imgs)
    write_shards(tmp_path / "d.npz", tmp_path / "o", workers=1, encoding=encoding, quality=quality)
    got, _ = all_samples(tmp_path / "o")
    imgs = imgs[written(5)]
    if encoding == "jpeg":
        assert np.abs(got.astype(int) - imgs).mean() < 4
    else:
        np.testing.assert_array_equal(got, imgs)
    sh = ShardSet(tmp_path / "o")
    assert sh.image_ext == {"jpeg": "jpg", "webp": "webp", "raw": "raw"}[encoding]
    if encoding == "raw":
        assert sh.img_size[0] == 16 * 16 * 3


def test_transforms(tmp_path, rng):
    src = tmp_path / "src"
    src.mkdir()
    wide = np.zeros((16, 24, 3), np.uint8)
    wide[:, :4] = 255                                   # the 4 columns a centre crop removes on each side
    wide[:, -4:] = 255
    wide[:, 4:-4] = rng.integers(0, 256, (16, 16, 3))
    (src / "a.png").write_bytes(png_bytes(wide))
    (src / "b.png").write_bytes(png_bytes(rand_images(rng, 1, size=40)[0]))
    with pytest.raises(ShardInputError, match=r"not all of one square size \(40x40: 1 \(e.g. .*b.png\); not square: "
                                              r"1 \(e.g. .*a.png, 24x16\), of 2 looked at\): pass --resolution R "
                                              r"--transform"):
        write_shards(src, tmp_path / "o0", workers=1)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.png").write_bytes(png_bytes(wide[:, 4:-4]))
    (mixed / "b.png").write_bytes(png_bytes(rand_images(rng, 1, size=40)[0]))
    with pytest.raises(ShardInputError, match=r"not all of one square size \(16x16: 1 \(e.g. .*a.png\); "
                                              r"40x40: 1 \(e.g. .*b.png\), of 2 looked at\): pass --resolution"):
        write_shards(mixed, tmp_path / "o00", workers=1)
    (mixed / "c.png").write_bytes(png_bytes(rand_images(rng, 1, size=16)[0]))
    with pytest.raises(ShardInputError, match=r"40x40: 1 \(e.g. .*b.png\).*e.g. --resolution 16 --transform "
                                              r"center-crop; or pass --on-error skip to leave out every image that "
                                              r"is not 16x16"):
        write_shards(mixed, tmp_path / "o00", workers=1)
    write_shards(src, tmp_path / "o1", workers=1, resolution=16, transform="center-crop", shuffle_seed=None)
    got, _ = all_samples(tmp_path / "o1")
    np.testing.assert_array_equal(got[0], wide[:, 4:-4])      # centre square, already 16: no resampling
    assert got.shape == (2, 16, 16, 3)
    write_shards(src, tmp_path / "o2", workers=1, resolution=8, transform="center-crop-dhariwal", channels=1)
    got2, _ = all_samples(tmp_path / "o2")
    assert got2.shape == (2, 8, 8, 1)


def test_limits_keys_labels_and_dali_index(tmp_path, rng):
    imgs = rand_images(rng, 30)
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.arange(30) % 7)
    m = write_shards(tmp_path / "d.npz", tmp_path / "o", workers=2, max_bytes=24 * 1024)
    assert sum(r["count"] for r in m["shards"]) == 30 and 30 > len(m["shards"]) > 2
    for r in m["shards"]:
        assert r["bytes"] <= 24 * 1024 and r["bytes"] == (tmp_path / "o" / r["tar"]).stat().st_size
        with tarfile.open(tmp_path / "o" / r["tar"]) as t:
            names = t.getnames()
        assert all(n.count(".") == 1 for n in names)     # keys without dots
        with tarfile.open(tmp_path / "o" / r["tar"]) as t:
            for e in read_index(tmp_path / "o" / r["index"]):
                offset, size = e["cls"]                  # the label: decimal text, what the index says
                t.fileobj.seek(offset)
                assert 0 <= int(t.fileobj.read(size).decode("ascii")) < 7
    m2 = write_shards(tmp_path / "d.npz", tmp_path / "o2", workers=1, min_shards=8)
    assert len(m2["shards"]) >= 8
    assert (tmp_path / "o" / "manifest.json").exists()
    assert not list((tmp_path / "o").glob("*.tmp")) and not list((tmp_path / "o").glob("*.progress.json"))


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_dali_reader_accepts_indexes(tmp_path, rng):
    from nvidia.dali import fn, pipeline_def, types
    imgs = rand_images(rng, 10)
    labels = rng.integers(0, 5, 10)
    np.savez(tmp_path / "d.npz", images=imgs, labels=labels)
    m = write_shards(tmp_path / "d.npz", tmp_path / "o", workers=1, max_count=4)
    root = tmp_path / "o"

    @pipeline_def(batch_size=10, num_threads=1, device_id=None)
    def p():
        img, lab = fn.readers.webdataset(paths=[str(root / r["tar"]) for r in m["shards"]],
                                         index_paths=[str(root / r["index"]) for r in m["shards"]],
                                         ext=["png", "cls"], missing_component_behavior="error")
        return fn.decoders.image(img, device="cpu", output_type=types.RGB), lab

    pipe = p()
    pipe.build()
    out, lab = pipe.run()
    np.testing.assert_array_equal(np.array(out.as_tensor()), imgs[written(10)])
    got = [int(bytes(np.array(lab[k])).decode("ascii")) for k in range(10)]
    np.testing.assert_array_equal(got, labels[written(10)])


def make_bad_folder(root: Path, rng):
    good = rand_images(rng, 4)
    root.mkdir()
    for i, a in enumerate(good):
        (root / f"good{i}.png").write_bytes(png_bytes(a))
    full = png_bytes(rand_images(rng, 1)[0])
    bad = {
        "junk.png": (b"\x89PNG not really" + os.urandom(40), "undecodable"),
        "empty.png": (b"", "empty file"),
        "cut.png": (full[: len(full) // 2], "truncated"),
        "deep.png": (png_bytes(rng.integers(0, 65535, (16, 16), dtype=np.uint16).astype(np.uint16)),
                     "unsupported mode"),
        "small.png": (png_bytes(rand_images(rng, 1, size=8)[0]), "wrong size"),
        "good0.tiff": (png_bytes(good[0], "TIFF"), "duplicate key"),
    }
    for name, (data, _) in bad.items():
        (root / name).write_bytes(data)
    return good, {name: reason for name, (_, reason) in bad.items()}


def test_bad_inputs_skip_reports_each(tmp_path, rng, capsys):
    good, bad = make_bad_folder(tmp_path / "src", rng)
    m = write_shards(tmp_path / "src", tmp_path / "o", workers=1, on_error="skip", resolution=16)
    assert m["count"] == 4
    got, _ = all_samples(tmp_path / "o")
    names = sorted(p.name for p in (tmp_path / "src").iterdir())
    kept = [int(n[4]) for n in np.array(names)[written(len(names))] if n.startswith("good") and n.endswith(".png")]
    np.testing.assert_array_equal(got, good[kept])
    reported = {Path(s["path"]).name: s["reason"] for s in m["skipped"]["items"]}
    assert set(reported) == set(bad)
    for name, reason in bad.items():
        assert reported[name].startswith(reason), (name, reported[name])
    assert m["skipped"]["count"] == len(bad)
    assert sum(m["skipped"]["by_reason"].values()) == len(bad)
    err = capsys.readouterr().err
    for name in bad:
        assert name in err


@pytest.mark.parametrize("which", ["junk.png", "empty.png", "cut.png", "deep.png", "small.png", "good0.tiff"])
def test_bad_inputs_stop_names_path(tmp_path, rng, which):
    good, bad = make_bad_folder(tmp_path / "src", rng)
    for name in bad:
        if name != which:
            (tmp_path / "src" / name).unlink()
    with pytest.raises(ShardInputError) as e:
        write_shards(tmp_path / "src", tmp_path / "o", workers=1, resolution=16)
    assert which in str(e.value) and bad[which] in str(e.value)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_empty_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardInputError, match="empty"):
        write_shards(tmp_path / "empty", tmp_path / "o", workers=1)
    np.savez(tmp_path / "e.npz", images=np.zeros((0, 8, 8), np.uint8))
    with pytest.raises(ShardInputError, match="empty"):
        write_shards(tmp_path / "e.npz", tmp_path / "o", workers=1)
    np.savez(tmp_path / "f.npz", images=np.zeros((3, 8, 8), np.float32))
    with pytest.raises(ShardInputError, match="uint8"):
        write_shards(tmp_path / "f.npz", tmp_path / "o", workers=1)


def test_parallel_workers_write_the_same_shards(tmp_path, rng):
    src = tmp_path / "src"
    for i, a in enumerate(rand_images(rng, 40)):
        (src / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (src / f"c{i % 2}" / f"{i:02d}.png").write_bytes(png_bytes(a))
    (src / "c1" / "zz.png").write_bytes(b"broken")
    with zipfile.ZipFile(tmp_path / "src.zip", "w") as zf:
        for p in sorted(src.rglob("*.png")):
            zf.write(p, p.relative_to(src).as_posix())
    one = write_shards(src, tmp_path / "one", workers=1, max_count=8, on_error="skip")
    for source, out in ((src, "two"), (tmp_path / "src.zip", "zip2")):
        two = write_shards(source, tmp_path / out, workers=2, max_count=8, on_error="skip")
        assert [r["sha256"] for r in one["shards"]] == [r["sha256"] for r in two["shards"]]
        assert two["count"] == 40 and two["skipped"]["by_reason"] == {"undecodable": 1}


def test_resume_keeps_complete_shards_and_matches_fresh_run(tmp_path, rng):
    imgs = rand_images(rng, 20)
    src = tmp_path / "src"
    src.mkdir()
    for i, a in enumerate(imgs):
        (src / f"{i:02d}.png").write_bytes(png_bytes(a))
    bad = f"{written(20)[13]:02d}.png"                     # written 14th: a bad input in the 4th shard
    (src / bad).write_bytes(b"")
    with pytest.raises(ShardInputError, match=bad):
        write_shards(src, tmp_path / "o", workers=1, max_count=4)
    out = tmp_path / "o"
    assert sorted(p.name for p in out.glob("*.tar")) == ["data-000000.tar", "data-000001.tar", "data-000002.tar"]
    assert not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "data-000002.tar").write_bytes((out / "data-000002.tar").read_bytes()[:-700])   # damaged since
    (out / "data-000003.tar.tmp").write_bytes(b"half")                                      # a stray temp file
    m = write_shards(src, out, workers=1, max_count=4, on_error="skip")
    assert m["count"] == 19 and m["skipped"]["count"] == 1
    assert (out / "data-000000.tar").stat().st_mtime_ns == kept["data-000000.tar"]
    assert (out / "data-000001.tar").stat().st_mtime_ns == kept["data-000001.tar"]
    assert not list(out.glob("*.tmp"))
    fresh = write_shards(src, tmp_path / "fresh", workers=1, max_count=4, on_error="skip")
    assert [r["sha256"] for r in m["shards"]] == [r["sha256"] for r in fresh["shards"]]
    ok, msg = verify(out)
    assert ok, msg
    # a re-run of a complete folder changes nothing; other options are refused
    assert write_shards(src, out, workers=1, max_count=4, on_error="skip")["shards"] == m["shards"]
    with pytest.raises(ShardInputError, match="overwrite"):
        write_shards(src, out, workers=1, max_count=5, on_error="skip")


@contextlib.contextmanager
def interrupted_at_encode(monkeypatch, n: int):
    """The shard writer's n-th image encode raises KeyboardInterrupt (a Ctrl-C mid-run); the real
    encoder is back afterwards."""
    real, calls = preprocess._encode, {"n": 0}

    def interrupted(*a):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(preprocess, "_encode", interrupted)
    try:
        yield
    finally:
        monkeypatch.setattr(preprocess, "_encode", real)


def test_interrupt_leaves_no_half_shard(tmp_path, rng, monkeypatch):
    imgs = rand_images(rng, 12)
    np.savez(tmp_path / "d.npz", images=imgs)
    with interrupted_at_encode(monkeypatch, 7), pytest.raises(KeyboardInterrupt):
        write_shards(tmp_path / "d.npz", tmp_path / "o", workers=1, max_count=4)
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == [write.LOCK_FILE, "data-000000.crc", "data-000000.idx", "data-000000.tar", "data.progress.json"]
    write_shards(tmp_path / "d.npz", tmp_path / "o", workers=1, max_count=4)
    got, _ = all_samples(tmp_path / "o")
    np.testing.assert_array_equal(got, imgs[written(12)])


def test_verify_catches_flipped_byte_truncation_and_bad_sample(tmp_path, rng):
    imgs = rand_images(rng, 9)
    np.savez(tmp_path / "d.npz", images=imgs)
    root = tmp_path / "o"
    m = write_shards(tmp_path / "d.npz", root, workers=1, max_count=3)
    assert verify(root)[0]
    tar = root / m["shards"][1]["tar"]
    original = tar.read_bytes()
    sh = ShardSet(root)
    off = int(sh.img_off[4])                              # sample 4 = second shard, #1
    flipped = bytearray(original)
    flipped[off + 40] ^= 0xFF
    tar.write_bytes(bytes(flipped))
    ok, msg = verify(root)
    assert not ok and "data-000001.tar" in msg and "sha256" in msg
    assert f"sample 000000004 (#1 of the shard; its .png member at byte {off}" in msg and "fails its CRC-32" in msg
    tar.write_bytes(original[:-1024])
    ok, msg = verify(root)
    assert not ok and "data-000001.tar" in msg and "truncated" in msg
    # a damaged image whose manifest entry was (wrongly) updated, CRC-32 too: the decode names the sample
    tar.write_bytes(bytes(flipped))
    m["shards"][1]["sha256"] = sha256_file(tar)
    rewrite_crc_record(root, m["shards"][1], 1, data_crc=zlib.crc32(bytes(flipped[off:off + int(sh.img_size[4])])))
    (root / "manifest.json").write_text(json.dumps(m))
    ok, msg = verify(root)
    assert not ok and "data-000001.tar" in msg and "#1" in msg and "decode" in msg


def rewrite_crc_record(root: Path, rec: dict, k: int, **fields) -> None:
    """Set fields of record ``k`` in the shard's CRC file as a writer would (its own check and the
    manifest record's sha256 too: ``rec`` is updated, the caller writes the manifest)."""
    path = root / rec["crc"]
    head = path.read_bytes()[:CRC_HEADER_BYTES]
    records = read_crc_file(root, rec, int(np.frombuffer(head[12:16], "<u4")[0]))
    for key, value in fields.items():
        records[key][k] = value
    records["check"][k] = zlib.crc32(records[k:k + 1].tobytes()[:-4])
    path.write_bytes(head + records.tobytes())
    rec["crc_sha256"] = sha256_file(path)


def test_cli_npz_info_verify(tmp_path, rng, capsys):
    imgs = rand_images(rng, 25, size=32, channels=1)
    np.savez(tmp_path / "digits.npz", images=imgs, labels=np.arange(25) % 10)
    out = tmp_path / "shards"
    assert shard_main([str(tmp_path / "digits.npz"), str(out), "--resolution", "32", "--min-shards", "4",
                       "--workers", "1", "--quiet"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["command"][:3] == ["pdiff", "shard", str(tmp_path / "digits.npz")]
    assert m["count"] == 25 and m["channels"] == 1 and m["num_classes"] == 10 and len(m["shards"]) == 4
    capsys.readouterr()
    from pdiff.cli import main as pdiff_main
    assert pdiff_main(["shard", "info", str(out)]) == 0          # through the `pdiff` dispatch table
    text = capsys.readouterr().out
    assert "25 at 32x32" in text and "10 classes" in text
    assert shard_main(["verify", str(out)]) == 0
    (out / m["shards"][0]["tar"]).write_bytes(b"x")
    assert shard_main(["verify", str(out)]) == 1
    assert "data-000000.tar" in capsys.readouterr().err
    assert pdiff_main(["shard", str(tmp_path / "missing.npz"), str(tmp_path / "o2")]) == 1   # no traceback
    err = capsys.readouterr().err
    assert "missing.npz" in err and "Traceback" not in err


def test_shards_read_with_the_webdataset_library(tmp_path, rng):
    """The shards are plain WebDataset tars: the webdataset library reads the same images and
    labels (so other tools can use them), in shard order."""
    import webdataset as wds
    imgs = rand_images(rng, 10)
    labels = rng.integers(0, 5, 10)
    np.savez(tmp_path / "d.npz", images=imgs, labels=labels)
    m = write_shards(tmp_path / "d.npz", tmp_path / "out", max_count=4, workers=1, progress=False)
    urls = [str(tmp_path / "out" / s["tar"]) for s in m["shards"]]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8"):
        seen.append((sample[m["image_ext"]], sample["cls"]))     # .cls decodes to an int out of the box
    assert len(seen) == 10
    order = written(10)
    for i, (img, label) in enumerate(seen):
        assert np.array_equal(img, imgs[order[i]]) and label == labels[order[i]] and isinstance(label, int)


def test_pool_workers_fork_only_from_a_single_thread(tmp_path, rng):
    """A process with other threads (trainer writers, DALI, this test runner) starts the workers by
    forkserver, so no lock a thread held at fork time is inherited; the shards are the same as with
    one worker. A worker also drops any SIGTERM handler it inherits, so terminate() ends it."""
    import signal
    import threading
    np.savez(tmp_path / "d.npz", images=rand_images(rng, 40), labels=np.arange(40) % 3)
    write_shards(tmp_path / "d.npz", tmp_path / "one", workers=1, max_count=8, progress=False)
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        assert write.pool_context().get_start_method() != "fork"
        write_shards(tmp_path / "d.npz", tmp_path / "two", workers=2, max_count=8, progress=False)
    finally:
        release.set()
        thread.join()
    (a, la), (b, lb) = all_samples(tmp_path / "one"), all_samples(tmp_path / "two")
    assert np.array_equal(a, b) and np.array_equal(la, lb)

    previous = signal.signal(signal.SIGTERM, lambda *args: None)
    try:
        preprocess.init_worker(inputs.Inputs.__new__(inputs.Inputs), {})
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)
        preprocess._WORKER.clear()


# ---------------------------------------------------------------------------------------------
# The CLI as a user runs it (stderr is a pipe here, not a terminal, as under SLURM or nohup)

def run_cli(*args, seconds="0"):
    """`pdiff ...` in a fresh process; progress lines every ``seconds``."""
    import subprocess
    import sys
    env = dict(os.environ, PDIFF_PROGRESS_SECONDS=seconds)
    r = subprocess.run([sys.executable, "-m", "pdiff.cli", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def test_cli_ignores_files_that_are_not_images_and_names_them(tmp_path, rng):
    """#11.7: stray files (.DS_Store, Thumbs.db, LICENSE.txt, README.md, hidden files and folders, macOS
    '._' copies) are skipped by extension, counted and named; an image that fails to decode still
    follows --on-error."""
    src = tmp_path / "src"
    imgs = rand_images(rng, 3)
    for i, (c, name) in enumerate((("cats", "a.png"), ("cats", "b.jpg"), ("dogs", "c.PNG"))):
        (src / c).mkdir(parents=True, exist_ok=True)
        Image.fromarray(imgs[i]).save(src / c / name, format="JPEG" if name.endswith("jpg") else "PNG")
    stray = {".DS_Store": b"\x00\x00\x00\x01Bud1", "cats/Thumbs.db": os.urandom(64), "LICENSE.txt": b"MIT",
             "dogs/README.md": b"# dogs", "dogs/._c.PNG": os.urandom(32), ".cache/x.png": png_bytes(imgs[0])}
    for name, data in stray.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    r = run_cli("shard", src, tmp_path / "out", "--workers", "1")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["count"] == 3 and m["classes"] == ["cats", "dogs"] and m["skipped"]["count"] == 0
    shown = {".DS_Store", "cats/Thumbs.db", "LICENSE.txt", "dogs/README.md", "dogs/._c.PNG", ".cache/"}
    assert set(m["ignored"]["files"]) == shown and m["ignored"]["count"] == len(shown)
    line = next(x for x in r.stderr.splitlines() if x.startswith("ignored"))
    assert line.startswith(f"ignored {len(shown)} file(s) that are not images:") and all(n in line for n in shown)

    (src / "dogs" / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(50))     # an image that does not decode
    r = run_cli("shard", src, tmp_path / "stop", "--workers", "1")
    assert r.returncode == 1 and "dogs/d.png: undecodable" in r.stderr and "--on-error skip" in r.stderr
    r = run_cli("shard", src, tmp_path / "skip", "--workers", "1", "--on-error", "skip")
    assert r.returncode == 0 and "skipped 1 inputs: undecodable 1" in r.stderr


def test_cli_progress_lines_without_a_terminal(tmp_path, rng):
    """#11.8: with stderr not a terminal, `pdiff shard` and `pdiff shard verify` print progress lines
    (every PDIFF_PROGRESS_SECONDS; 0 here: one per update) that end at the total."""
    np.savez(tmp_path / "d.npz", images=rand_images(rng, 40))
    r = run_cli("shard", tmp_path / "d.npz", tmp_path / "out", "--workers", "1", "--max-count", "10")
    lines = [x for x in r.stderr.splitlines() if x.startswith("shard: ")]
    assert r.returncode == 0 and len(lines) >= 3
    assert lines[0].startswith("shard: 0/40 img (0.0%)") and lines[-1].startswith("shard: 40/40 img (100.0%)")
    assert "img/s" in lines[-1] and "elapsed" in lines[-1]
    r = run_cli("shard", "verify", tmp_path / "out", "--workers", "2")
    lines = [x for x in r.stderr.splitlines() if x.startswith("verify: ")]
    assert r.returncode == 0 and "OK, 40 samples in 4 shards" in r.stdout
    assert len(lines) == 1 + 4 + 1 and lines[-1].startswith("verify: 40/40 samples (100.0%)")   # start, 4 shards, end
    r = run_cli("shard", "verify", tmp_path / "out", "--quiet")
    assert r.returncode == 0 and "verify:" not in r.stderr
    r = run_cli("shard", "verify", "--help")
    assert r.returncode == 0 and "--workers" in r.stdout


def test_verify_lists_every_damaged_sample_in_parallel_and_streams(tmp_path, rng):
    """#11.8: verify runs over shards in worker processes and names every damaged sample (not only the
    first), reading each shard a little at a time (never the whole shard)."""
    import importlib
    import tracemalloc
    verify_module = importlib.import_module("pdiff.pipelines.shards.verify")
    np.savez(tmp_path / "d.npz", images=rand_images(rng, 48, size=128))
    root = tmp_path / "out"
    m = write_shards(tmp_path / "d.npz", root, workers=1, max_count=12, encoding="raw", progress=False)
    sh = ShardSet(root)
    damaged = sorted(rng.choice(48, 3, replace=False).tolist())
    for i in damaged:
        tar = Path(sh.tars[sh.shard[i]])
        blob = bytearray(tar.read_bytes())
        blob[int(sh.img_off[i]) + int(rng.integers(sh.img_size[i]))] ^= 1 << int(rng.integers(8))
        tar.write_bytes(bytes(blob))
    ok, msg = verify(root, workers=2)
    assert not ok and msg.startswith(f"{root}: 3 damaged sample(s)")
    for i in damaged:
        assert f"{sh.tars[sh.shard[i]]}: sample {i:09d} (#{i - sh.first[sh.shard[i]]} of the shard; its .raw member " \
               f"at byte {sh.img_off[i]}" in msg
    assert msg.count("fails its CRC-32 check") == 3 and "data.on_corrupt=skip" in msg

    shard_bytes = m["shards"][0]["bytes"]
    assert shard_bytes > 2 * verify_module._CHUNK
    tracemalloc.start()
    verify(root, workers=1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < shard_bytes / 2, (peak, shard_bytes)


def test_labels_are_webdataset_cls_and_samples_are_mixed(tmp_path, rng):
    """#11.9: class folders written in a seeded random order: the first shard holds several classes; the
    order is `write_order`'s, --seed changes it and --source-order keeps the source's; labels are .cls
    text members."""
    src = tmp_path / "src"
    imgs = rand_images(rng, 30)
    for i, a in enumerate(imgs):
        (src / f"class{i // 10}").mkdir(parents=True, exist_ok=True)
        (src / f"class{i // 10}" / f"{i:02d}.png").write_bytes(png_bytes(a))
    seed = int(rng.integers(1 << 20))
    assert run_cli("shard", src, tmp_path / "mixed", "--max-count", "10", "--seed", seed, "--workers",
                   "1").returncode == 0
    got, labels = all_samples(tmp_path / "mixed")
    order = write_order(30, seed)
    np.testing.assert_array_equal(got, imgs[order])
    np.testing.assert_array_equal(labels, order // 10)
    assert len(set(labels[:10].tolist())) > 1                   # shard 0: not class 0 alone
    with tarfile.open(tmp_path / "mixed" / "data-000000.tar") as t:
        names = t.getnames()
        assert names[:2] == ["000000000.png", "000000000.cls"]
        assert t.extractfile(names[1]).read() == str(order[0] // 10).encode()
    assert run_cli("shard", src, tmp_path / "plain", "--max-count", "10", "--source-order", "--workers",
                   "1").returncode == 0
    got, labels = all_samples(tmp_path / "plain")
    np.testing.assert_array_equal(got, imgs)
    np.testing.assert_array_equal(labels, np.arange(30) // 10)
    assert json.loads((tmp_path / "plain" / "manifest.json").read_text())["shuffle_seed"] is None


def legacy_shards(root: Path, images: np.ndarray, labels: np.ndarray, per_shard: int = 5) -> None:
    """A shard folder as pdiff wrote it before format version 3: 4-byte .lbl labels, no CRC-32s."""
    from pdiff.pipelines.shards.format import index_text
    root.mkdir()
    shards = []
    for s in range(0, len(images), per_shard):
        tar, entries = root / f"data-{s // per_shard:06d}.tar", []
        with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as t:
            for k in range(s, min(s + per_shard, len(images))):
                comps = []
                for ext, data in (("png", png_bytes(images[k])), ("lbl", np.int32(labels[k]).tobytes())):
                    info = tarfile.TarInfo(f"{k:09d}.{ext}")
                    info.size = len(data)
                    comps.append((ext, t.offset + 512, len(data), info.name))
                    t.addfile(info, io.BytesIO(data))
                entries.append(comps)
        idx = tar.with_suffix(".idx")
        idx.write_text(index_text(entries))
        shards.append({"tar": tar.name, "index": idx.name, "count": len(entries), "bytes": tar.stat().st_size,
                       "sha256": sha256_file(tar), "index_bytes": idx.stat().st_size, "index_sha256": sha256_file(idx)})
    n = int(labels.max()) + 1
    (root / "manifest.json").write_text(json.dumps({
        "format": "pdiff-webdataset", "version": 1, "tool": "pdiff shard", "tool_version": "1", "command": ["x"],
        "created": "2026-01-01T00:00:00Z", "source": "x", "resolution": images.shape[1], "channels": 3,
        "encoding": "png", "image_ext": "png", "label_ext": "lbl", "label_dtype": "<i4", "quality": None,
        "transform": "none", "count": len(images), "labeled": True, "num_classes": n,
        "classes": [str(c) for c in range(n)],
        "shards": shards, "bytes": sum(r["bytes"] for r in shards), "skipped": {"count": 0, "by_reason": {},
                                                                                "items": []}}))


def test_crc_file_holds_each_member_and_row_crc(tmp_path, rng):
    """Version 4's CRC file, against a direct computation on fresh random data: per sample its members'
    places, its label, the CRC-32 of its data and label members and of each of its rows (raw and latent:
    R x C values a row; encoded images: no rows)."""
    n, r = 7, 12
    imgs, labels = rng.integers(0, 256, (n, r, r, 3)).astype(np.uint8), rng.integers(0, 5, n)
    lat = rng.standard_normal((n, r, r, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", images=imgs, labels=labels)
    np.save(tmp_path / "lat.npy", lat)
    order = write_order(n, 0)
    for enc, src, want in (("raw", "d.npz", imgs), ("latent", "lat.npy", lat), ("png", "d.npz", None)):
        out = tmp_path / enc
        opts = dict(dtype="float32") if enc == "latent" else {}
        m = write_shards(tmp_path / src, out, workers=1, encoding=enc, max_count=3, progress=False, **opts)
        sh = ShardSet(out)
        rows = r if want is not None else 0
        records = np.concatenate([read_crc_file(out, rec, rows) for rec in m["shards"]])
        assert [rec["crc"] for rec in m["shards"]] == [f"data-{k:06d}.crc" for k in range(3)]
        for i in range(n):
            data = os.pread(sh._fd(sh.shard_of(i)[0]), int(records["data_size"][i]), int(records["data_offset"][i]))
            label = str(int(labels[order[i]])).encode() if enc != "latent" else b"-1"
            assert int(records["label"][i]) == int(label) and int(records["label_crc"][i]) == zlib.crc32(label)
            assert int(records["data_crc"][i]) == zlib.crc32(data)
            if want is None:
                assert records["row_crc"].shape == (n, 0)
                continue
            sample = want[order[i]]
            assert data == sample.tobytes()
            assert records["row_crc"][i].tolist() == [zlib.crc32(sample[y].tobytes()) for y in range(r)]


def test_damaged_or_missing_crc_file_is_named(tmp_path, rng):
    """A CRC file that is damaged (a record's bytes, its header, its size) or missing stops a reader with
    a message naming the file, not the sample; `pdiff shard verify` names it too."""
    imgs = rng.integers(0, 256, (8, 8, 8, 3)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=imgs)
    root = tmp_path / "o"
    m = write_shards(tmp_path / "d.npz", root, workers=1, encoding="raw", max_count=4, progress=False)
    crc = root / m["shards"][1]["crc"]
    original = crc.read_bytes()
    size = (len(original) - CRC_HEADER_BYTES) // 4
    k = int(rng.integers(4))
    damaged = bytearray(original)
    damaged[CRC_HEADER_BYTES + k * size + int(rng.integers(size))] ^= 1 << int(rng.integers(8))
    crc.write_bytes(bytes(damaged))
    sh = ShardSet(root)
    with pytest.raises(ShardError, match=f"{crc}: the CRC file of data-000001.tar is damaged at the record of "
                                         f"sample #{k} of the shard"):
        sh.read(4 + k)
    assert sh.read(0) == imgs[write_order(8, 0)[0]].tobytes()      # the other shard reads on
    ok, msg = verify(root, workers=1)
    assert not ok and f"{crc}: the CRC file of data-000001.tar is damaged" in msg
    crc.write_bytes(original[:-3])
    with pytest.raises(ShardError, match=f"{crc}: the CRC file of data-000001.tar is {len(original) - 3} bytes"):
        ShardSet(root).plan_labels[5]
    crc.write_bytes(b"NOTACRC!" + original[8:])
    with pytest.raises(ShardError, match=f"{crc}: the CRC file of data-000001.tar is damaged \\(its header"):
        ShardSet(root).read(5)
    crc.unlink()
    with pytest.raises(ShardError, match=f"{crc}: the CRC file of data-000001.tar is missing"):
        ShardSet(root).read(6)
    ok, msg = verify(root, workers=1)
    assert not ok and f"{crc}: the CRC file of data-000001.tar is missing" in msg


def as_version_3(root: Path) -> None:
    """Turn a folder this pdiff wrote (version 4) into the folder the version 3 writer made of the same
    inputs: the same tars and indexes, each sample's CRC-32 (over data and label) as text in the manifest,
    no CRC files (with --encode-features the CRC-32 spans the .feat member too)."""
    m = json.loads((root / "manifest.json").read_text())
    features = bool(m.get("features"))
    for rec in m["shards"]:
        records = read_crc_file(root, rec, 0 if m["encoding"] not in ("raw", "latent") else m["resolution"],
                                features)
        with open(root / rec["tar"], "rb") as f:
            blob = f.read()
        members = [("data_offset", "data_size"), ("label_offset", "label_size")]
        members += [("feat_offset", "feat_size")] if features else []
        crcs = []
        for r in records:
            crc = 0
            for o, n in members:
                crc = zlib.crc32(blob[int(r[o]):int(r[o]) + int(r[n])], crc)
            crcs.append(crc)
        rec["crc32"] = "".join(f"{c:08x}" for c in crcs)
        (root / rec.pop("crc")).unlink()
        del rec["crc_bytes"], rec["crc_sha256"]
    m["version"] = 3
    (root / "manifest.json").write_text(json.dumps(m))


def test_shards_of_format_version_3_still_read_and_verify(tmp_path, rng):
    """Version 3 (CRC-32s as text in the manifest) trains and verifies as before; its whole reads are
    checked, as they were."""
    imgs, labels = rand_images(rng, 11, size=16), rng.integers(0, 4, 11)
    np.savez(tmp_path / "d.npz", images=imgs, labels=labels)
    for enc in ("png", "raw"):
        write_shards(tmp_path / "d.npz", tmp_path / enc, workers=1, encoding=enc, max_count=4, progress=False)
        v4 = ShardSet(tmp_path / enc)
        want, want_labels = np.stack([v4.decode(i) for i in range(11)]), v4.labels.copy()
        as_version_3(tmp_path / enc)
        v3 = ShardSet(tmp_path / enc)
        assert v3.version == 3 and v3.checksummed and not list((tmp_path / enc).glob("*.crc"))
        np.testing.assert_array_equal(np.stack([v3.decode(i) for i in range(11)]), want)
        np.testing.assert_array_equal(v3.labels, want_labels)
        np.testing.assert_array_equal(v3.plan_labels[np.array([3, 0, 10])], want_labels[[3, 0, 10]])
        assert verify(tmp_path / enc, workers=1)[0]
        tar = Path(v3.tars[v3.shard[5]])
        blob = bytearray(tar.read_bytes())
        blob[int(v3.img_off[5]) + 3] ^= 0x10
        tar.write_bytes(bytes(blob))
        with pytest.raises(CorruptSample, match="sample 000000005 .*fails its CRC-32 check"):
            ShardSet(tmp_path / enc).read(5)


def test_shards_of_format_version_1_still_read(tmp_path, rng):
    """#11.9: old shards (.lbl labels, no CRC-32s) read, verify and describe themselves as before."""
    imgs, labels = rand_images(rng, 12), rng.integers(0, 4, 12)
    legacy_shards(tmp_path / "old", imgs, labels)
    got, got_labels = all_samples(tmp_path / "old")
    np.testing.assert_array_equal(got, imgs)
    np.testing.assert_array_equal(got_labels, labels)
    assert not ShardSet(tmp_path / "old").checksummed
    ok, msg = verify(tmp_path / "old")
    assert ok and "format version 1 keeps no per-sample CRC-32s" in msg, msg
    r = run_cli("shard", "info", tmp_path / "old")
    assert r.returncode == 0 and "version 1, labels .lbl, no per-sample CRC-32s" in r.stdout


# ---------------------------------------------------------------------------------------------
# The writer against odd inputs and odd folders (#16.7)

def test_cli_non_utf8_file_names(tmp_path, rng):
    """A file name that is not UTF-8 is an input like any other: no UnicodeEncodeError, shown with
    its odd byte escaped; a bad image under such a name follows --on-error."""
    src = tmp_path / "src"
    (src / "c").mkdir(parents=True)
    for i, a in enumerate(rand_images(rng, 3)):
        (src / "c" / f"{i}.png").write_bytes(png_bytes(a))
    good = rand_images(rng, 1)[0]
    os.makedirs(os.fsencode(src) + b"/d\xff", exist_ok=True)
    with open(os.fsencode(src) + b"/d\xff/caf\xe9.png", "wb") as f:
        f.write(png_bytes(good))
    r = run_cli("shard", src, tmp_path / "ok", "--workers", "1")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    assert m["count"] == 4 and m["classes"] == ["c", "d\\xff"]
    got, labels = all_samples(tmp_path / "ok")
    assert any(np.array_equal(g, good) and lab == 1 for g, lab in zip(got, labels))
    with open(os.fsencode(src) + b"/d\xff/bad\xe9.png", "wb") as f:
        f.write(b"not a png")
    r = run_cli("shard", src, tmp_path / "stop", "--workers", "1")
    assert r.returncode == 1 and "d\\xff/bad\\xe9.png: undecodable" in r.stderr and "--on-error skip" in r.stderr
    r = run_cli("shard", src, tmp_path / "skip", "--workers", "2", "--on-error", "skip")
    assert r.returncode == 0 and "skipped" in r.stderr and "bad\\xe9.png" in r.stderr
    assert json.loads((tmp_path / "skip" / "manifest.json").read_text())["count"] == 4


def test_cli_odd_image_sorting_first_is_the_one_named(tmp_path, rng):
    """Channel count and size come from most images, not the first: a grayscale image first in an
    RGB set joins it as RGB; a color image in a grayscale set, or a small image first, is named."""
    src = tmp_path / "src"
    src.mkdir()
    gray = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    (src / "0_gray.png").write_bytes(png_bytes(gray))
    colour = rand_images(rng, 5)
    for i, a in enumerate(colour):
        (src / f"{i + 1}.png").write_bytes(png_bytes(a))
    r = run_cli("shard", src, tmp_path / "rgb", "--workers", "1", "--source-order")
    assert r.returncode == 0, r.stderr
    got, _ = all_samples(tmp_path / "rgb")
    assert got.shape == (6, 16, 16, 3)
    np.testing.assert_array_equal(got[0], np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(got[1:], colour)

    grays = tmp_path / "grays"
    grays.mkdir()
    (grays / "0_colour.png").write_bytes(png_bytes(colour[0]))
    for i in range(4):
        (grays / f"{i + 1}.png").write_bytes(png_bytes(rng.integers(0, 256, (16, 16), dtype=np.uint8)))
    r = run_cli("shard", grays, tmp_path / "g", "--workers", "1")
    assert r.returncode == 1 and "0_colour.png: color image: in a grayscale set" in r.stderr
    assert "--channels 3" in r.stderr

    sizes = tmp_path / "sizes"
    sizes.mkdir()
    (sizes / "0_small.png").write_bytes(png_bytes(rand_images(rng, 1, size=8)[0]))
    for i, a in enumerate(rand_images(rng, 4)):
        (sizes / f"{i + 1}.png").write_bytes(png_bytes(a))
    r = run_cli("shard", sizes, tmp_path / "s", "--workers", "1")       # named before any is written
    assert r.returncode == 1 and "16x16: 4 (e.g. " in r.stderr and "8x8: 1 (e.g. " in r.stderr
    assert "0_small.png), of 5 looked at" in r.stderr and "every image that is not 16x16" in r.stderr
    assert not (tmp_path / "s").exists()


def test_resume_deletes_only_what_its_journal_names(tmp_path, rng, monkeypatch):
    """Files of the user's in OUT that look like shards are never deleted on resume or --overwrite;
    one in the way of a shard about to be written stops the run by name and stays as it was."""
    imgs = rand_images(rng, 12)
    np.savez(tmp_path / "d.npz", images=imgs)
    out = tmp_path / "out"
    out.mkdir()
    mine = {"data-000777.tar": os.urandom(600), "data-notes.idx": b"my notes", "data-000001.tar.bak": b"x"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    with interrupted_at_encode(monkeypatch, 7), pytest.raises(KeyboardInterrupt):
        write_shards(tmp_path / "d.npz", out, workers=1, max_count=4, progress=False)
    (out / "data-000001.tar.tmp").write_bytes(b"half")            # as a kill -9 would leave it: ours
    m = write_shards(tmp_path / "d.npz", out, workers=1, max_count=4, progress=False)
    assert m["count"] == 12 and not (out / "data-000001.tar.tmp").exists()
    for name, data in mine.items():
        assert (out / name).read_bytes() == data
    m = write_shards(tmp_path / "d.npz", out, workers=1, max_count=3, progress=False, overwrite=True)
    assert len(m["shards"]) == 4
    for name, data in mine.items():
        assert (out / name).read_bytes() == data

    other = tmp_path / "other"
    other.mkdir()
    (other / "data-000001.idx").write_bytes(b"the user's")
    r = run_cli("shard", tmp_path / "d.npz", other, "--max-count", "4", "--workers", "1")
    assert r.returncode == 1 and f"{other / 'data-000001.idx'} is in the way" in r.stderr
    assert "move it away, or choose another --name" in r.stderr
    assert (other / "data-000001.idx").read_bytes() == b"the user's"


def test_cli_damaged_manifest_and_arrays_are_named(tmp_path, rng):
    """A corrupt manifest.json (writer, reader, info, verify) and a garbage .npz/.npy: messages with
    the path, exit 1, no traceback."""
    np.savez(tmp_path / "d.npz", images=rand_images(rng, 6))
    out = tmp_path / "out"
    write_shards(tmp_path / "d.npz", out, workers=1, progress=False)
    manifest = out / "manifest.json"
    text = manifest.read_text()
    for damage in (text[: len(text) // 2], "[1, 2]", text.replace('"shards"', '"shardz"')):
        manifest.write_text(damage)
        for args in (("shard", "info", out), ("shard", "verify", out)):
            r = run_cli(*args)
            assert r.returncode == 1 and str(manifest) in r.stderr, r.stderr
        with pytest.raises(ShardError, match=str(manifest)):
            ShardSet(out)
    manifest.write_text(text[:100])
    r = run_cli("shard", tmp_path / "d.npz", out, "--workers", "1")
    assert r.returncode == 1 and f"{manifest}: the shard manifest is not valid JSON" in r.stderr
    assert "--overwrite" in r.stderr
    (out / "data-000003.tar").write_bytes(b"the user's")      # looks like a shard by name only: stays
    assert run_cli("shard", tmp_path / "d.npz", out, "--workers", "1", "--overwrite").returncode == 0
    assert (out / "data-000003.tar").read_bytes() == b"the user's" and verify(out)[0]

    for name, data in (("junk.npz", os.urandom(300)), ("zip.npz", b"PK\x03\x04" + os.urandom(300)),
                       ("junk.npy", os.urandom(300)), ("cut.npy",
                                                       (tmp_path / "d.npz").read_bytes()[:0] + b"\x93NUMPY")):
        (tmp_path / name).write_bytes(data)
        r = run_cli("shard", tmp_path / name, tmp_path / f"o-{name}")
        assert r.returncode == 1 and f"{tmp_path / name}: " in r.stderr, r.stderr


@pytest.mark.parametrize("where", ["shard", "index", "manifest"])
def test_cli_disk_full_names_the_file(tmp_path, rng, monkeypatch, capsys, where):
    """A write that fails (disk full) names the file and says how to go on; re-running resumes."""
    import errno
    np.savez(tmp_path / "d.npz", images=rand_images(rng, 12))
    out = tmp_path / "out"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "shard":
        calls = {"n": 0}
        real_addfile = tarfile.TarFile.addfile

        def addfile(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 13:              # 2 members a sample, 4 samples a shard: inside the second shard
                raise full
            return real_addfile(self, *a, **k)
        monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
        victim = out / "data-000001.tar.tmp"
    else:
        real_write = Path.write_text
        victim = out / ("data-000000.idx.tmp" if where == "index" else "manifest.json.tmp")

        def write_text(self, *a, **k):
            if self == victim:
                raise full
            return real_write(self, *a, **k)
        monkeypatch.setattr(Path, "write_text", write_text)
    from pdiff.cli import main as pdiff_main       # the CLI reports a ShardError as its message
    rc = pdiff_main(["shard", str(tmp_path / "d.npz"), str(out), "--max-count", "4", "--workers", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and f"{victim}: cannot write: No space left on device" in err and "re-run the same command" in err
    assert not victim.exists() and not (out / "manifest.json").exists()
    monkeypatch.undo()
    assert shard_main([str(tmp_path / "d.npz"), str(out), "--max-count", "4", "--workers", "1", "--quiet"]) == 0
    assert verify(out)[0]


# ---------------------------------------------------------------------------------------------
# The first hour with `pdiff shard` (issue 23): where OUT may be, usage errors, the resolution a
# default run trains on, what the summary says, one writer per OUT

def pdiff_cli(capsys, *argv) -> tuple[int, str]:
    """`pdiff ARGV` in this process, as the console script runs it: (exit status, stderr)."""
    from pdiff.cli import main as pdiff_main
    capsys.readouterr()
    rc = pdiff_main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_cli_out_is_never_the_source_and_a_missing_source_leaves_no_out(tmp_path, rng, capsys):
    src = tmp_path / "photos"
    (src / "cats").mkdir(parents=True)
    for i, a in enumerate(rand_images(rng, 2)):
        (src / "cats" / f"{i}.png").write_bytes(png_bytes(a))
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    for given, out, words in ((src, src, "is the source folder"),
                              (src / "cats" / "..", src / "shards", "lies inside the source folder"),
                              (src, src / "cats" / "x", "lies inside the source folder")):
        rc, err = pdiff_cli(capsys, "shard", given, out, "--workers", "1")
        assert rc == 2 and words in err and f"e.g. {tmp_path / 'photos-shards'}" in err, err
        assert sorted(p.relative_to(src) for p in src.rglob("*")) == before      # nothing written into SRC
    rc, err = pdiff_cli(capsys, "shard", tmp_path / "fotos", tmp_path / "out", "--workers", "1")
    assert rc == 1 and f"{tmp_path / 'fotos'}: no such file or folder" in err
    assert not (tmp_path / "out").exists()
    rc, err = pdiff_cli(capsys, "shard", src, tmp_path / "out", "--workers", "1", "--quiet")
    assert rc == 0 and ShardSet(tmp_path / "out").count == 2


@pytest.mark.parametrize("args,exit_code,words", [
    (["--resolution", "0"], 2, "--resolution 0: must be positive; the smallest that trains with the defaults is 16"),
    (["--resolution", "33", "--transform", "resize"], 2, "R/2 = 16.5 is not a whole number"),
    (["--resolution", "24", "--transform", "center-crop"], 2, "R/2 = 12 is not a multiple of 8"),
    (["--resolution", "80", "--transform", "center-crop"], 2, "that train with the defaults: 64 or 96"),
    (["--transform", "resize"], 2, "--transform resize needs --resolution"),
    (["--quality", "0"], 2, "quality must lie in 1..100"),
    (["--max-bytes", "10Q"], 2, "argument --max-bytes: '10Q' is not a size: give bytes, or a number with a unit"),
    (["--max-count", "0"], 2, "must be positive"),
])
def test_cli_usage_errors_exit_2_before_out_is_made(tmp_path, rng, args, exit_code, words):
    """A usage mistake is exit status 2 (as the README says and argparse does) with a message that
    names the option; a resolution the default patch sizes and network cannot train is refused at
    shard time with the nearest that can."""
    np.savez(tmp_path / "d.npz", images=rand_images(rng, 2))
    r = run_cli("shard", tmp_path / "d.npz", tmp_path / "out", "--workers", "1", *args)
    assert r.returncode == exit_code and words in r.stderr, r.stderr
    assert "_size" not in r.stderr and not (tmp_path / "out").exists()


def test_the_resolutions_shard_accepts_are_those_the_default_schedule_and_network_train():
    """The rule `pdiff shard --resolution` applies, held against the real components: the default
    schedule's patch sizes (PatchSchedule) and the default network's own input check, for R = 1..130."""
    import torch
    from pdiff.network_config import NetworkConfig
    from pdiff.networks import build_network, network_config
    from pdiff.schedule import PatchSchedule
    net = build_network(network_config(NetworkConfig().arch, model_channels=8, num_blocks=1, attn_resolutions=[]),
                        64, 1)
    for r in range(1, 131):
        try:
            sizes = PatchSchedule(r, batch=4).sizes
            for s in sizes:
                net.check_input(torch.zeros(1, 3, s, s), torch.zeros(1), None)
            trains = True
        except ValueError:
            trains = False
        assert preprocess.trains_with_defaults(r) == trains, r
        assert (preprocess.resolution_refusal(r) == "") == trains, r
        for near in preprocess.nearest_default_resolutions(r):
            assert preprocess.trains_with_defaults(near)
    assert preprocess.nearest_default_resolutions(33) == [32, 48]


def test_cli_summary_counts_nested_class_folders_and_upscaled_images(tmp_path, rng, capsys):
    """Images in sub-folders of a class folder are labelled by the class folder, and images smaller
    than R are enlarged by the transform: the summary counts both and names an example."""
    src = tmp_path / "src"
    files = {"cats/0.png": 16, "cats/kittens/1.png": 16, "cats/kittens/2.png": 8, "dogs/3.png": 12,
             "dogs/old/4.png": 16}
    for name, size in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(png_bytes(rand_images(rng, 1, size=size)[0]))
    rc, err = pdiff_cli(capsys, "shard", src, tmp_path / "out", "--resolution", "16", "--transform", "center-crop",
                        "--workers", "1", "--source-order")
    assert rc == 0, err
    assert ("3 image(s) in 2 sub-folder(s) of class folders (cats/kittens, dogs/old) are labelled by their top "
            "folder") in err
    assert f"upscaled 2 image(s) smaller than 16x16 (the smallest: {src / 'cats/kittens/2.png'}, 8x8)" in err
    assert list(ShardSet(tmp_path / "out").labels) == [0, 0, 0, 1, 1]
    flat = tmp_path / "flat"
    flat.mkdir()
    for name, size in (("a.png", 16), ("b.png", 10)):
        (flat / name).write_bytes(png_bytes(rand_images(rng, 1, size=size)[0]))
    rc, err = pdiff_cli(capsys, "shard", flat, tmp_path / "out2", "--resolution", "16", "--transform", "resize",
                        "--workers", "1")
    assert rc == 0 and "sub-folder" not in err and "upscaled 1 image(s) smaller than 16x16" in err, err


def test_cli_a_second_writer_on_the_same_out_is_refused(tmp_path, rng):
    """Two `pdiff shard` runs into one OUT: the second, started while the first is writing, is
    refused by name (host, pid, since) with what to do, and touches nothing; the first's shards
    verify. The first is held inside its writing loop until the second has been refused."""
    import socket
    import subprocess
    import sys
    import time
    imgs = rand_images(rng, 12)
    np.savez(tmp_path / "d.npz", images=imgs)
    out, inside, go = tmp_path / "out", tmp_path / "inside", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from pathlib import Path
from pdiff.pipelines.shards import write
from pdiff.cli import main
real = write.process_chunk
def held(chunk):
    Path({str(inside)!r}).touch()
    while not Path({str(go)!r}).exists():
        time.sleep(0.05)
    return real(chunk)
write.process_chunk = held
sys.exit(main(["shard", {str(tmp_path / 'd.npz')!r}, {str(out)!r}, "--workers", "1", "--max-count", "4"]))
"""], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not inside.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert inside.exists(), first.stderr.read() if first.poll() is not None else "the first writer never began"
        files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        second = run_cli("shard", tmp_path / "d.npz", out, "--workers", "1", "--max-count", "4")
        assert second.returncode == 1, second.stderr
        assert (f"{out} is being written by another `pdiff shard`: host {socket.gethostname()}, pid {first.pid}, "
                f"since ") in second.stderr
        assert "Let it finish, or stop it first" in second.stderr and "choose another OUT" in second.stderr
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files      # the second touched nothing
    finally:
        go.touch()
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    ok, msg = verify(out)
    assert ok, msg
    got, _ = all_samples(out)
    np.testing.assert_array_equal(got, as_hwc(imgs)[written(12)])
    again = run_cli("shard", tmp_path / "d.npz", out, "--workers", "1", "--max-count", "4")   # free again
    assert again.returncode == 0 and "already complete" in again.stderr
