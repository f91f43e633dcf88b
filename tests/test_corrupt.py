"""Damaged samples in training data (#16.1), on both backends: a sample whose bytes fail their CRC-32
never reaches a decoder; ``data.on_corrupt=stop`` ends the run naming the shard, the sample's key,
its byte offset and `pdiff shard verify`; ``skip`` reads the next good sample in its place (the same
after a resume), counts it, and stops past ``data.max_corrupt``. Shards without checksums (format
version 1) still have decode failures caught per sample.

Each backend runs the damage cases in a child process (`child` below): DALI fed damaged bytes can
crash the process (a JPEG with zeroed bytes ended a run with SIGSEGV), which must fail the test, not
end pytest.

Format version 4 holds every member and every row read against its CRC-32: a flipped byte in a raw
patch's rows or in a sample's label member is caught as a decoder's damage is; version 3 (CRC-32s in the
manifest) still trains, its index checked at opening.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pdiff.pipelines import dali_available

# "memory": the in-memory mode (data.cache=host), which reads every sample whole at loading and meets a
# damaged one when a step draws it, as the streaming loaders do.
BACKENDS = ["torch", "memory", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                              reason="NVIDIA DALI is not installed"))]
R, N, PER_SHARD = 16, 12, 5
TESTS = Path(__file__).resolve().parent

# Damage kind -> the clean shard folder it is made from. "raw-rows-*": raw patches smaller than the image,
# read by their rows; "crc-file-record": a byte of the sample's record in its shard's CRC file.
CASES = {"png-flipped-byte": "png", "jpeg-zeroed-bytes": "jpeg", "jpeg-header-flipped-byte": "jpeg",
         "raw-flipped-byte": "raw", "raw-rows-flipped-byte": "raw", "raw-rows-label-flipped-byte": "raw",
         "png-label-flipped-byte": "png", "crc-file-record": "raw", "index-offset": "v3",
         "v3-png-flipped-byte": "v3", "v1-png-flipped-byte": "v1"}
STOP_ONLY = ("index-offset", "crc-file-record")      # damage of the shard set's metadata: no sample to skip


def smooth_images(rng, n):
    base = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(b).resize((R, R), Image.BILINEAR)) for b in base])


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """Clean shards in png, jpeg, raw and the old format, and a damaged copy per case: -> (root, the
    damaged sample per case, labels in stored order)."""
    from pdiff.pipelines.shards import ShardSet, write_shards
    from pdiff.pipelines.shards.options import write_order
    from test_shard import as_version_3, legacy_shards
    root = tmp_path_factory.mktemp("corrupt")
    rng = np.random.default_rng()
    images, labels = smooth_images(rng, N), rng.integers(0, 3, N)
    np.savez(root / "d.npz", images=images, labels=labels)
    for enc in ("png", "jpeg", "raw"):
        write_shards(root / "d.npz", root / enc, workers=1, encoding=enc, max_count=PER_SHARD, progress=False)
    order = write_order(N, 0)
    legacy_shards(root / "v1", images[order], labels[order], per_shard=PER_SHARD)
    shutil.copytree(root / "png", root / "v3")
    as_version_3(root / "v3")
    victims = {}
    for case, clean in CASES.items():
        shutil.copytree(root / clean, root / case)
        sh = ShardSet(root / clean)
        i = int(rng.integers(N))
        tar, off, size = Path(root / case / Path(sh.tars[sh.shard[i]]).name), int(sh.img_off[i]), int(sh.img_size[i])
        blob = bytearray(tar.read_bytes())
        if case == "jpeg-zeroed-bytes":
            sos = bytes(blob[off:off + size]).index(b"\xff\xda")          # zeros in the entropy-coded data
            start = off + sos + 20 + int(rng.integers(0, max(1, size - sos - 60)))
            blob[start:min(start + 32, off + size - 2)] = bytes(min(32, off + size - 2 - start))
        elif case == "jpeg-header-flipped-byte":
            blob[off + 25 + int(rng.integers(0, 40))] ^= 1 << int(rng.integers(8))     # quantization tables
        elif case == "index-offset":
            idx = tar.with_suffix(".idx")
            lines = idx.read_text().split("\n")
            k = i - int(sh.first[sh.shard[i]])
            tok = lines[1 + k].split()
            tok[1] = str(int(tok[1]) + (1 if len(str(int(tok[1]) + 1)) == len(tok[1]) else -1))   # same length
            lines[1 + k] = " ".join(tok)
            idx.write_text("\n".join(lines))
        elif case.startswith("v1"):      # a byte of the PNG signature: no decoder can take it (no CRC to tell)
            blob[off + int(rng.integers(1, 8))] ^= 1 << int(rng.integers(8))
        elif case == "raw-rows-flipped-byte":    # rows R/2-1 and R/2: every patch of R/2 rows reads one of them
            for y in (R // 2 - 1, R // 2):
                blob[off + y * R * 3 + int(rng.integers(R * 3))] ^= 1 << int(rng.integers(8))
        elif "label" in case:            # the one-digit label becomes another digit or a non-digit
            blob[int(sh.lbl_off[i])] ^= 1 << int(rng.integers(8))
        elif case == "crc-file-record":
            crc = tar.with_suffix(".crc")
            data = bytearray(crc.read_bytes())
            in_shard = int((np.asarray(sh.shard) == sh.shard[i]).sum())      # the last shard holds fewer
            k, size = i - int(sh.first[sh.shard[i]]), (len(data) - 16) // in_shard
            data[16 + k * size + int(rng.integers(size))] ^= 1 << int(rng.integers(8))
            crc.write_bytes(bytes(data))
        else:
            blob[off + size // 2 + int(rng.integers(-size // 4, size // 4))] ^= 1 << int(rng.integers(8))
        tar.write_bytes(bytes(blob))
        victims[case] = i
    return root, victims, labels[order]


def child(backend: str, root: str, victims: dict) -> dict:
    """Runs in a fresh process: every case under stop, skip (with a resume half-way) and
    max_corrupt=0; -> what happened, as JSON-able facts."""
    import torch
    from pdiff.config import load_config
    from pdiff.pipelines import build_pipeline
    from pdiff.pipelines.order import SamplePlan
    from pdiff.pipelines.sample_source import SourceError
    from pdiff.pipelines.shards import ShardSet
    from pdiff.schedule import StochasticSchedule

    root, steps, seed = Path(root), 8, 1234

    def make(case, *overrides, workers=0):
        cfg = load_config(None, [f"data.path={root / case}", f"data.resolution={R}", "data.channels=3",
                                 f"data.backend={'torch' if backend == 'memory' else backend}",
                                 f"data.workers={workers}",
                                 "train.batch=4", f"train.seed={seed}", *overrides,
                                 f"data.cache={'host' if backend == 'memory' else 'none'}"])
        # Raw: full-size patches, read and checked whole, or ("raw-rows") patches of R/2 read by their
        # rows, each row checked (ShardSet.read_region).
        sizes = [R // 2] if case.startswith("raw-rows") else [R] if CASES[case] == "raw" else [R // 2, R]
        return build_pipeline(cfg, StochasticSchedule(R, 4, sizes=sizes, probs=[1 / len(sizes)] * len(sizes),
                                                      seed=seed),
                              0, 1, "cpu")

    out = {}
    for case, i in victims.items():
        res = out[case] = {}
        clean = ShardSet(root / CASES[case])
        try:                                                    # stop: the first step that plans sample i
            pipe = make(case)
            for _ in range(steps):
                next(pipe)
            res["stop"] = None
        except SourceError as e:
            res["stop"] = str(e)
        if case in STOP_ONLY:
            continue
        pipe = make(case, "data.on_corrupt=skip", workers=2 if backend == "torch" else 0)
        plan = SamplePlan(N, clean.labels, pipe.schedule, seed, 0, 1)
        batches, ok, planned = [], True, 0
        for k in range(steps):
            b = next(pipe)
            batches.append(b)
            if k == 3:
                state = pipe.state_dict()
            for row, index in enumerate(plan.step(b.images_seen).indices):
                used = (index + 1) % N if index == i else index
                x0, y0 = b.offsets[row].tolist()
                s = b.patch_size
                want = torch.from_numpy(clean.decode(used)[y0:y0 + s, x0:x0 + s].astype(np.int32))   # uint8 HWC
                tolerance = 4 if CASES[case] == "jpeg" else 0               # DALI's JPEG decode vs Pillow's
                ok &= bool((b.patches[row].int() - want).abs().max() <= tolerance)
                ok &= int(b.labels[row]) == int(clean.labels[used])
                planned += int(index == i)
        res["skip"] = {"found": sorted(pipe.corrupt.found), "replaced": pipe.corrupt.replaced, "rows_ok": ok,
                       "planned": planned}
        pipe.close()
        resumed = make(case, "data.on_corrupt=skip")
        resumed.load_state_dict(state)
        same = True
        for want in batches[4:]:
            got = next(resumed)
            same &= torch.equal(got.patches, want.patches) and torch.equal(got.labels, want.labels)
        res["resume_equal"] = same and resumed.corrupt.state_dict() == pipe.corrupt.state_dict()
        resumed.close()
        try:
            pipe = make(case, "data.on_corrupt=skip", "data.max_corrupt=0")
            for _ in range(steps):
                next(pipe)
            res["max0"] = None
        except SourceError as e:
            res["max0"] = str(e)
    return out


@pytest.fixture(scope="module", params=BACKENDS)
def outcomes(request, damaged):
    root, victims, labels = damaged
    code = (f"import json, sys; sys.path.insert(0, {str(TESTS)!r}); import test_corrupt; "
            f"print('RESULT' + json.dumps(test_corrupt.child({request.param!r}, {str(root)!r}, {victims!r})))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, f"the {request.param} child ended with {p.returncode}:\n{p.stderr[-3000:]}"
    result = json.loads(p.stdout.split("RESULT", 1)[1])
    return request.param, root, victims, labels, result, p.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_stop_names_shard_key_offset_and_verify(outcomes, case):
    backend, root, victims, _, result, _ = outcomes
    from pdiff.pipelines.shards import ShardSet
    clean = ShardSet(root / CASES[case])
    i = victims[case]
    msg = result[case]["stop"]
    assert msg is not None, f"{case}: the damaged sample {i} went through unnoticed"
    tar = Path(clean.tars[clean.shard[i]]).name
    assert f"pdiff shard verify {root / case}" in msg
    if case == "index-offset":             # found when the shards are opened: no offset in it is trusted
        assert f"{root / case / tar.replace('.tar', '.idx')}: sha256 differs" in msg
        return
    k = i - clean.first[clean.shard[i]]
    if case == "crc-file-record":          # the file is named, not the sample: its record cannot be trusted
        assert f"{root / case / tar.replace('.tar', '.crc')}: the CRC file of {tar} is damaged at the record of " \
               f"sample #{k} of the shard" in msg
        return
    assert f"{root / case / tar}: sample {i:09d} (#{k} of the shard" in msg
    assert f"member at byte {clean.img_off[i]}" in msg
    assert "data.on_corrupt=skip" in msg
    assert ("cannot be decoded" if case.startswith("v1") else "fails its CRC-32 check") in msg
    if "label" in case:
        assert f"its .cls label (at byte {clean.lbl_off[i]}) fails its CRC-32 check" in msg
    if case == "raw-rows-flipped-byte" and backend != "memory":     # the memory mode reads whole samples
        assert f"its row {R // 2 - 1} fails" in msg or f"its row {R // 2} fails" in msg
    if case.startswith("v1") and backend == "dali":      # DALI failed first; the host decode named the sample
        assert "DALI's decoder failed on it too" in msg


@pytest.mark.parametrize("case", [c for c in CASES if c not in STOP_ONLY])
def test_skip_replaces_with_the_next_sample_counts_and_resumes_exactly(outcomes, case):
    backend, root, victims, labels, result, stderr = outcomes
    res, i = result[case], victims[case]
    assert res["skip"]["planned"] > 0                        # the damaged sample was drawn
    assert res["skip"]["found"] == [i] and res["skip"]["replaced"] == res["skip"]["planned"]
    assert res["skip"]["rows_ok"]                            # its rows carry sample i+1: patch and label
    assert res["resume_equal"]
    assert f"sample {i:09d}" in stderr and "Training on with sample" in stderr
    assert "more than data.max_corrupt=0" in res["max0"] and f"sample {i:09d}" in res["max0"]


def test_checksummed_shards_catch_what_decoders_miss(damaged):
    """Without the CRC-32 a flipped byte in a JPEG's quantization table decodes without a word (the
    damage this guards against), and the host check costs one read per sample."""
    from pdiff.pipelines.sample_source import CorruptSample, decode_sample
    from pdiff.pipelines.shards import ShardSet
    root, victims, _ = damaged
    sh = ShardSet(root / "jpeg-header-flipped-byte")
    i = victims["jpeg-header-flipped-byte"]
    data = os.pread(sh._fd(int(sh.shard[i])), int(sh.img_size[i]), int(sh.img_off[i]))
    decoded = decode_sample(data, "jpeg", R, 3)               # garbage, but no error from Pillow
    assert decoded.shape == (R, R, 3)
    with pytest.raises(CorruptSample, match=f"sample {i:09d}"):
        sh.read(i)
    assert not ShardSet(root / "v1").checksummed and sh.checksummed


def test_train_stops_with_the_message_or_trains_on_and_logs_the_count(tmp_path, damaged):
    """`pdiff train` as a user runs it: stop exits 1 with the message and no traceback; skip trains to
    the end and logs the damaged samples found."""
    from test_train import log_rows, run_train, write_config
    root, victims, _ = damaged
    data = {"path": str(root / "png-flipped-byte"), "channels": 3}
    config = write_config(tmp_path, root, data=data, train={"duration_images": 96, "ckpt_every_images": 96})
    p = run_train(config, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"sample {victims['png-flipped-byte']:09d}" in p.stderr and "data.on_corrupt=skip" in p.stderr
    p = run_train(config, "data.workers=2", "train.run_dir=" + str(tmp_path / "workers"), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]     # raised in a DataLoader worker
    assert f"sample {victims['png-flipped-byte']:09d}" in p.stderr and "DataLoader worker" not in p.stderr
    p = run_train(config, "data.on_corrupt=skip", "train.run_dir=" + str(tmp_path / "skip"))
    rows = log_rows(tmp_path / "skip")
    assert rows[-1]["images_seen"] >= 96 and rows[-1]["data/corrupt_samples"] == 1

