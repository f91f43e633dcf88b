"""`pdiff shard`: every input kind round-trips, limits hold, bad inputs are reported, resume and
verify work. Small synthetic images made on the fly."""
from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pdiff.pipelines import dali_available
from pdiff.pipelines.shards import ShardInputError, ShardSet, read_index, verify, write_shards
from pdiff.pipelines.shards import inputs, preprocess, write
from pdiff.pipelines.shards.format import sha256_file
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


@pytest.fixture
def rng():
    return np.random.default_rng()


def test_class_folders_roundtrip_png(tmp_path, rng):
    imgs = rand_images(rng, 12)
    classes = ["cat", "dog", "emu"]
    expect_labels = []
    src = tmp_path / "src"
    for i, a in enumerate(imgs):                        # file names sort in the order written
        c = i % 3
        (src / classes[c]).mkdir(parents=True, exist_ok=True)
        (src / classes[c] / f"img{i:03d}.png").write_bytes(png_bytes(a))
    order = sorted(range(12), key=lambda i: (classes[i % 3], i))
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
        np.testing.assert_array_equal(got, imgs)
        assert (labels == -1).all()


def test_npz_gray_with_labels_and_npy(tmp_path, rng):
    imgs = rand_images(rng, 21, channels=1)
    labels = rng.integers(0, 10, 21)
    np.savez(tmp_path / "d.npz", images=imgs, labels=labels)
    m = write_shards(tmp_path / "d.npz", tmp_path / "o", workers=1, resolution=16, min_shards=4)
    assert m["channels"] == 1 and m["count"] == 21 and len(m["shards"]) >= 4
    got, lab = all_samples(tmp_path / "o")
    np.testing.assert_array_equal(got, imgs[..., None])
    np.testing.assert_array_equal(lab, labels)
    assert m["num_classes"] == labels.max() + 1
    np.save(tmp_path / "d.npy", imgs)
    np.save(tmp_path / "l.npy", labels)
    m2 = write_shards(tmp_path / "d.npy", tmp_path / "o2", workers=1, labels_file=str(tmp_path / "l.npy"),
                      encoding="raw")
    got2, lab2 = all_samples(tmp_path / "o2")
    np.testing.assert_array_equal(got2, imgs[..., None])
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
    np.testing.assert_array_equal(got, imgs)
    np.testing.assert_array_equal(lab, labels)
    assert m["labeled"] and m["num_classes"] == labels.max() + 1


@pytest.mark.parametrize("encoding,quality", [("jpeg", 95), ("webp", 100), ("raw", 95)])
def test_encodings(tmp_path, rng, encoding, quality):
    # smooth images so that JPEG stays close
    base = rng.integers(0, 256, (5, 4, 4, 3)).astype(np.uint8)
    imgs = np.stack([np.asarray(Image.fromarray(b).resize((16, 16), Image.BILINEAR)) for b in base])
    np.savez(tmp_path / "d.npz", images=imgs)
    m = write_shards(tmp_path / "d.npz", tmp_path / "o", workers=1, encoding=encoding, quality=quality)
    got, _ = all_samples(tmp_path / "o")
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
    with pytest.raises(ShardInputError, match="a.png: wrong size: 24x16 is not square"):
        write_shards(src, tmp_path / "o0", workers=1)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.png").write_bytes(png_bytes(wide[:, 4:-4]))
    (mixed / "b.png").write_bytes(png_bytes(rand_images(rng, 1, size=40)[0]))
    with pytest.raises(ShardInputError, match="b.png: wrong size: 40x40, expected 16x16"):
        write_shards(mixed, tmp_path / "o00", workers=1)
    write_shards(src, tmp_path / "o1", workers=1, resolution=16, transform="center-crop")
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
        for e in read_index(tmp_path / "o" / r["index"]):
            assert e["lbl"][1] == 4                      # fixed-size labels
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
                                         ext=["png", "lbl"], missing_component_behavior="error")
        return fn.decoders.image(img, device="cpu", output_type=types.RGB), lab

    pipe = p()
    pipe.build()
    out, lab = pipe.run()
    np.testing.assert_array_equal(np.array(out.as_tensor()), imgs)
    got = np.array(lab.as_tensor()).reshape(10, 4).copy().view("<i4")[:, 0]
    np.testing.assert_array_equal(got, labels)


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
        "deep.png": (png_bytes(rng.integers(0, 65535, (16, 16), dtype=np.uint16).astype(np.uint16)), "unsupported mode"),
        "notes.txt": (b"hello", "not an image"),
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
    np.testing.assert_array_equal(got, good)
    reported = {Path(s["path"]).name: s["reason"] for s in m["skipped"]["items"]}
    assert set(reported) == set(bad)
    for name, reason in bad.items():
        assert reported[name].startswith(reason), (name, reported[name])
    assert m["skipped"]["count"] == len(bad)
    assert sum(m["skipped"]["by_reason"].values()) == len(bad)
    err = capsys.readouterr().err
    for name in bad:
        assert name in err


@pytest.mark.parametrize("which", ["junk.png", "empty.png", "cut.png", "deep.png", "notes.txt", "small.png", "good0.tiff"])
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
    (src / "13.png").write_bytes(b"")                     # bad input in the 4th shard
    with pytest.raises(ShardInputError, match="13.png"):
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


def test_interrupt_leaves_no_half_shard(tmp_path, rng, monkeypatch):
    imgs = rand_images(rng, 12)
    np.savez(tmp_path / "d.npz", images=imgs)
    real = preprocess._encode
    calls = {"n": 0}

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(preprocess, "_encode", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_shards(tmp_path / "d.npz", tmp_path / "o", workers=1, max_count=4)
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == ["data-000000.idx", "data-000000.tar", "data.progress.json"]
    monkeypatch.setattr(preprocess, "_encode", real)
    write_shards(tmp_path / "d.npz", tmp_path / "o", workers=1, max_count=4)
    got, _ = all_samples(tmp_path / "o")
    np.testing.assert_array_equal(got, imgs)


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
    tar.write_bytes(original[:-1024])
    ok, msg = verify(root)
    assert not ok and "data-000001.tar" in msg and "truncated" in msg
    # a damaged image whose manifest entry was (wrongly) updated: the decode names the sample
    tar.write_bytes(bytes(flipped))
    m["shards"][1]["sha256"] = sha256_file(tar)
    (root / "manifest.json").write_text(json.dumps(m))
    ok, msg = verify(root)
    assert not ok and "data-000001.tar" in msg and "#1" in msg and "decode" in msg


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
    assert shard_main([str(tmp_path / "missing.npz"), str(tmp_path / "o2")]) == 1


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
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        img = np.asarray(Image.open(io.BytesIO(sample[m["image_ext"]])))
        label = int(np.frombuffer(sample[m["label_ext"]], dtype=m["label_dtype"])[0])
        seen.append((img, label))
    assert len(seen) == 10
    for i, (img, label) in enumerate(seen):
        assert np.array_equal(img, imgs[i]) and label == labels[i]


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
        assert write._pool_context().get_start_method() != "fork"
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
