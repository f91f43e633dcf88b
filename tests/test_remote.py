"""Shards in object storage (pipelines/remote.py), against a local S3-compatible server (moto in server
mode on 127.0.0.1, started and stopped here; dummy credentials; no other network): batches and a
training run from s3:// equal those from the local folder, in both loaders; `pdiff shard SRC s3://...`
uploads; every failure (missing object, access denied, a download cut halfway, a sha256 that differs)
is a clear error naming the object and leaves no partial file; the cache stays within its limit; resume."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from pdiff.cli import main
from pdiff.config import load_config
from pdiff.pipelines import build_pipeline, dali_available, open_source
from pdiff.pipelines import remote
from pdiff.pipelines.order import SamplePlan
from pdiff.pipelines.remote import Prefetcher, RemoteError, upload_shards
from pdiff.pipelines.shards import write_shards
from pdiff.pipelines.shards.format import MANIFEST, shard_files
from pdiff.schedule import StochasticSchedule

BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                    reason="NVIDIA DALI is not installed"))]
R = 16


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's S3 on a free port of 127.0.0.1 for the session; AWS_* point every client (s3fs here, and
    trainer subprocesses that inherit the environment) at it with dummy credentials."""
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)       # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    nowhere = str(tmp_path_factory.mktemp("aws") / "none")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_CONFIG_FILE": nowhere,
           "AWS_SHARED_CREDENTIALS_FILE": nowhere}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3fs_(s3_endpoint):
    import fsspec
    return fsspec.filesystem("s3", skip_instance_cache=True)


def new_bucket(fs) -> str:
    name = f"pdiff-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return name


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """37 random labelled RGB 16x16 images as PNG and raw shards of at most 10 samples (4 shards)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng()
    np.savez(root / "d.npz", images=rng.integers(0, 256, (37, R, R, 3), dtype=np.uint8), labels=rng.integers(0, 5, 37))
    for enc in ("png", "raw"):
        write_shards(root / "d.npz", root / enc, workers=1, encoding=enc, max_count=10, progress=False)
    return root


def put_folder(fs, local: Path, url: str) -> str:
    """A shard folder copied as is (as `aws s3 sync` would)."""
    for p in sorted(local.iterdir()):
        fs.put_file(str(p), f"{url}/{p.name}")
    return url


@pytest.fixture(scope="module")
def bucket_data(dataset, s3fs_):
    bucket = new_bucket(s3fs_)
    return {enc: put_folder(s3fs_, dataset / enc, f"s3://{bucket}/{enc}") for enc in ("png", "raw")}


def make(path, backend="torch", seed=0, batch=4, workers=0, sizes=(4, 8, 16), probs=(0.4, 0.3, 0.3), cache_dir="",
         limit=0.0, world=1, rank=0, cache="none"):
    cfg = load_config(None, [f"data.path={path}", f"data.resolution={R}", "data.channels=3", f"data.backend={backend}",
                             f"data.workers={workers}", f"train.batch={batch}", f"train.seed={seed}",
                             f"data.cache_dir={cache_dir}", f"data.cache_limit_gb={limit}", f"data.cache={cache}"])
    sch = StochasticSchedule(R, batch, sizes=list(sizes), probs=list(probs), seed=seed)
    return build_pipeline(cfg, sch, rank=rank, world_size=world)


def same_batches(a, b):
    assert a.patch_size == b.patch_size and a.images_seen == b.images_seen
    assert torch.equal(a.patches, b.patches) and torch.equal(a.offsets, b.offsets) and torch.equal(a.labels, b.labels)


def tar_bytes(folder: Path) -> int:
    """Bytes of the tars under ``folder``, those being downloaded included (the prefetcher runs on: a file
    listed may be gone, evicted or renamed, when it is looked at)."""
    total = 0
    for entry in os.scandir(next(folder.iterdir())):
        if entry.name.endswith((".tar", ".part")):
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                pass
    return total


# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("enc", ["png", "raw"])
def test_batches_from_s3_equal_the_local_folder(dataset, bucket_data, tmp_path, backend, enc):
    """Both loaders read the fetched copies: every batch (patches, offsets, labels) equals the local run's,
    across epoch boundaries; each cached file is the manifest's, byte for byte."""
    seed = int(np.random.default_rng().integers(1 << 30))
    workers = 2 if backend == "torch" and enc == "png" else 0       # DataLoader worker processes read copies too
    local = make(dataset / enc, backend, seed, workers=workers)
    far = make(bucket_data[enc], backend, seed, workers=workers, cache_dir=tmp_path)
    for _ in range(12):                                              # 37 images: crosses epochs
        same_batches(next(far), next(local))
    assert far.source.fingerprint() == local.source.fingerprint()
    manifest = json.loads((dataset / enc / MANIFEST).read_text())
    root = far.source.cache.root
    for rec in manifest["shards"]:
        for name, size, sha in shard_files(rec):
            if (root / name).exists():
                assert hashlib.sha256((root / name).read_bytes()).hexdigest() == sha
    far.close()
    local.close()
    far.source.close()


def test_in_memory_mode_from_s3_equals_the_local_folder(dataset, bucket_data, tmp_path):
    """data.cache=host loads the whole set from the fetched copies (no prefetcher: it reads once) and
    gives the local folder's batches."""
    seed = int(np.random.default_rng().integers(1 << 30))
    local = make(dataset / "png", seed=seed, cache="host")
    far = make(bucket_data["png"], seed=seed, cache="host", cache_dir=tmp_path)
    for _ in range(6):
        same_batches(next(far), next(local))
    assert far.source._prefetcher is None
    far.close()
    far.source.close()


def test_training_from_s3_equals_training_from_the_folder(tmp_path, digits_shards, s3fs_):
    """`pdiff train` with data.path=s3://... ends with the same weights, bit for bit, and logs the same
    losses as the same run on the local folder (trainer subprocesses reach the server through AWS_*)."""
    from test_train import final_state, log_rows, run_train, write_config
    url = put_folder(s3fs_, digits_shards, f"s3://{new_bucket(s3fs_)}/digits")
    common = dict(train={"duration_images": 96, "ckpt_every_images": 96})
    local = write_config(tmp_path, digits_shards, run="local", **common)
    far = write_config(tmp_path, url, run="far", data={"cache_dir": str(tmp_path / "cache")}, **common)
    run_train(local)
    run_train(far)
    a, b = final_state(tmp_path / "local"), final_state(tmp_path / "far")
    assert a["images_seen"] == b["images_seen"] >= 96
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["loss"] for r in log_rows(tmp_path / "local")] == [r["loss"] for r in log_rows(tmp_path / "far")]


def test_resume_from_s3_continues_the_uninterrupted_run(dataset, bucket_data, tmp_path):
    """A state saved by a run on the local folder (or on s3://) resumes on s3:// with a fresh cache and
    gives the uninterrupted run's batches."""
    seed = int(np.random.default_rng().integers(1 << 30))
    ref = make(dataset / "png", seed=seed)
    want = [next(ref) for _ in range(12)]
    ref.close()
    first = make(bucket_data["png"], seed=seed, cache_dir=tmp_path / "a")
    for _ in range(5):
        next(first)
    state = first.state_dict()
    first.close()
    first.source.close()
    resumed = make(bucket_data["png"], seed=seed, cache_dir=tmp_path / "b")
    resumed.load_state_dict(state)
    for w in want[5:]:
        same_batches(next(resumed), w)
    resumed.close()
    resumed.source.close()


def test_prefetch_window_is_the_plans_order_of_first_use(dataset, bucket_data, tmp_path):
    """The prefetcher's window lists the shards the plan's next steps read, in the order they are first
    read, as many as the limit holds; it fetches them with no read asked for."""
    source = open_source(bucket_data["raw"], cache_dir=tmp_path)
    seed, world, rank = int(np.random.default_rng().integers(1 << 30)), 2, 1
    sch = StochasticSchedule(R, 4, sizes=[8, 16], probs=[0.5, 0.5], seed=seed)
    plan = SamplePlan(source.count, source.labels, sch, seed, rank, world)
    start = 6 * world
    first_use = []
    for step, _ in zip(plan.steps(start), range(40)):
        for s in source.shard[step.indices]:
            if int(s) not in first_use:
                first_use.append(int(s))
    pre = Prefetcher(source.cache, source.shard)
    try:
        assert pre.window((source.count, seed, rank, world, start // world)) == first_use
        sizes = source.cache.tar_bytes
        source.cache.limit = int(sizes[first_use[0]] + sizes[first_use[1]])
        assert pre.window((source.count, seed, rank, world, start // world)) == first_use[:2]
        source.cache.limit = 0
        pre.follow(source.count, seed, rank, world, start // world)
        for s in first_use:
            source.cache.ensure(s)        # waits on the prefetcher's lock where it is fetching s
        assert source.cache.fetches == len(first_use)    # each once, all by the prefetcher
    finally:
        pre.stop()
        source.close()


def test_cache_stays_within_its_limit_and_evicts(dataset, bucket_data, tmp_path):
    """With room for 3 of the 4 shards, the fetched tars never exceed the limit on disk (checked after
    every step, and the most ever held or being fetched), shards are evicted and fetched again, and
    the batches still equal the local folder's."""
    manifest = json.loads((dataset / "raw" / MANIFEST).read_text())
    largest = max(rec["bytes"] for rec in manifest["shards"])
    limit = 3 * largest
    seed = int(np.random.default_rng().integers(1 << 30))
    local = make(dataset / "raw", seed=seed, batch=2, sizes=(8, 16), probs=(0.5, 0.5))
    far = make(bucket_data["raw"], seed=seed, batch=2, sizes=(8, 16), probs=(0.5, 0.5), cache_dir=tmp_path,
               limit=limit / 2 ** 30)
    cache = far.source.cache
    for _ in range(60):
        same_batches(next(far), next(local))
        assert tar_bytes(tmp_path) <= limit
    assert cache.peak <= limit
    assert cache.fetches > len(manifest["shards"])          # evicted, then needed again
    far.close()
    far.source.close()


def test_upload_writes_every_shard_then_the_manifest(tmp_path, dataset, s3fs_, monkeypatch):
    """`pdiff shard SRC s3://...` uploads each finished shard and the manifest last; the objects are the
    manifest's (sha256); the staging folder is gone; a second upload to the same prefix is refused; the
    uploaded shards train like the local ones."""
    order = []
    put = remote.ObjectStore.put
    monkeypatch.setattr(remote.ObjectStore, "put",
                        lambda self, local, name: (order.append(name), put(self, local, name)))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))      # the staging folder's default place
    url = f"s3://{new_bucket(s3fs_)}/up"
    assert main(["shard", str(dataset / "d.npz"), url, "--format", "raw", "--max-count", "10", "--workers", "1",
                 "--quiet"]) == 0
    manifest = json.loads(s3fs_.cat(f"{url}/{MANIFEST}"))
    files = [f for rec in manifest["shards"] for f in shard_files(rec)]
    assert order[-1] == MANIFEST and sorted(order[:-1]) == sorted(name for name, _, _ in files)
    for name, size, sha in files:
        assert hashlib.sha256(s3fs_.cat(f"{url}/{name}")).hexdigest() == sha
    assert manifest["count"] == 37 and not list(remote.default_cache_dir().glob("upload-*up-*"))
    with pytest.raises(RemoteError, match=f"{url}/manifest.json exists"):
        upload_shards(dataset / "d.npz", url, encoding="raw", max_count=10, workers=1, progress=False)
    nowhere = f"s3://{uuid.uuid4().hex[:12]}-missing/up"
    with pytest.raises(RemoteError, match=f"{nowhere}/data-000000.tar: no such bucket"):
        upload_shards(dataset / "d.npz", nowhere, encoding="raw", max_count=10, workers=1, progress=False)
    seed = int(np.random.default_rng().integers(1 << 30))
    a, b = make(url, seed=seed, cache_dir=tmp_path), make(dataset / "raw", seed=seed)
    for _ in range(4):
        same_batches(next(a), next(b))
    a.close()
    a.source.close()


# -- errors ----------------------------------------------------------------------------------------

@pytest.fixture
def one_off(dataset, s3fs_):
    """A fresh copy of the raw shards under its own bucket (the tests damage it)."""
    bucket = new_bucket(s3fs_)
    return bucket, put_folder(s3fs_, dataset / "raw", f"s3://{bucket}/raw")


def first_tar(url, fs) -> str:
    return json.loads(fs.cat(f"{url}/{MANIFEST}"))["shards"][0]["tar"]


def read_all(source):
    for i in range(source.count):
        source.read(i)


def no_partial_files(folder: Path):
    assert not [p for p in folder.rglob("*") if p.name.endswith(".part")]


def test_missing_object_is_named(one_off, s3fs_, tmp_path):
    bucket, url = one_off
    tar = first_tar(url, s3fs_)
    s3fs_.rm_file(f"{url}/{tar}")
    source = open_source(url, cache_dir=tmp_path)           # opening reads the manifest and indexes only
    with pytest.raises(RemoteError, match=f"{url}/{tar}: no such object, yet {url}/manifest.json lists it"):
        read_all(source)
    assert not (source.cache.root / tar).exists()
    no_partial_files(tmp_path)
    with pytest.raises(RemoteError, match=f"s3://{bucket}/nothing/manifest.json: no such object"):
        open_source(f"s3://{bucket}/nothing", cache_dir=tmp_path)


def test_access_denied_is_named(one_off, s3fs_, tmp_path):
    import boto3
    bucket, url = one_off
    tar = first_tar(url, s3fs_)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject",
                                                       "Resource": f"arn:aws:s3:::{bucket}/raw/{tar}"}]}
    boto3.client("s3").put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    source = open_source(url, cache_dir=tmp_path)
    with pytest.raises(RemoteError, match=f"{url}/{tar}: access denied"):
        read_all(source)
    no_partial_files(tmp_path)


def test_sha256_mismatch_is_named_and_nothing_is_kept(one_off, s3fs_, tmp_path):
    bucket, url = one_off
    tar = first_tar(url, s3fs_)
    data = bytearray(s3fs_.cat(f"{url}/{tar}"))
    data[len(data) // 2] ^= 0xFF                            # same size, one byte changed
    s3fs_.pipe(f"{url}/{tar}", bytes(data))
    source = open_source(url, cache_dir=tmp_path)
    with pytest.raises(RemoteError, match=f"{url}/{tar}: sha256 [0-9a-f]{{64}} differs from"):
        read_all(source)
    assert not (source.cache.root / tar).exists()
    no_partial_files(tmp_path)


def cut_streams(cuts):
    """An ObjectStore._open whose tar downloads break after half the object, the first ``cuts`` times."""
    left = [cuts]

    def _open(store, url):
        f = store.fs.open(url, "rb")
        if not url.endswith(".tar") or left[0] <= 0:
            return f
        left[0] -= 1
        half = f.size // 2

        class Broken:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def read(self, n):
                if f.tell() >= half:
                    raise ConnectionResetError("connection reset by peer")
                return f.read(min(n, half - f.tell()))
        return Broken()
    return _open


def test_cut_download_is_retried_and_never_used_half(one_off, s3fs_, tmp_path, monkeypatch, dataset):
    """A download cut halfway is retried (the reads then equal the local shards); cut every time, it is a
    clear error after the retries, and no file (partial or not) is left under the shard's name."""
    bucket, url = one_off
    monkeypatch.setattr(remote, "BACKOFF_S", 0.001)
    monkeypatch.setattr(remote.ObjectStore, "_open", cut_streams(2))
    source, local = open_source(url, cache_dir=tmp_path / "a"), open_source(dataset / "raw")
    for i in range(source.count):
        assert source.read(i) == local.read(i)
    no_partial_files(tmp_path)
    monkeypatch.setattr(remote.ObjectStore, "_open", cut_streams(10 ** 6))
    source = open_source(url, cache_dir=tmp_path / "b")
    tar = first_tar(url, s3fs_)
    cut = f"{url}/{tar}: download failed {remote.RETRIES} times .*ConnectionResetError"
    with pytest.raises(RemoteError, match=cut):
        read_all(source)
    assert not (source.cache.root / tar).exists()
    no_partial_files(tmp_path)


def test_https_style_url_reads_a_served_folder(dataset, tmp_path):
    """data.path=http://... (fsspec's HTTP file system) against a plain file server on 127.0.0.1."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(dataset)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        seed = int(np.random.default_rng().integers(1 << 30))
        far = make(f"http://127.0.0.1:{server.server_address[1]}/png", seed=seed, cache_dir=tmp_path)
        local = make(dataset / "png", seed=seed)
        for _ in range(5):
            same_batches(next(far), next(local))
        far.close()
        far.source.close()
    finally:
        server.shutdown()
        server.server_close()


def test_sources_sharing_a_cache_folder_fetch_each_shard_once(bucket_data, tmp_path):
    """Two sources on one data.cache_dir (as ranks of a node), fetching every shard at once from two
    threads: the lock per shard makes each download happen once in all."""
    import threading
    a, b = open_source(bucket_data["raw"], cache_dir=tmp_path), open_source(bucket_data["raw"], cache_dir=tmp_path)
    n = len(a.tars)
    jobs = [threading.Thread(target=lambda s=s: [s.cache.ensure(k) for k in range(n)]) for s in (a, b)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert a.cache.fetches + b.cache.fetches == n
    for i in range(a.count):
        assert a.read(i) == b.read(i)
    a.close()
    b.close()


def test_a_changed_remote_folder_is_not_read_from_stale_copies(one_off, s3fs_, dataset, tmp_path):
    """The remote shards replaced under the same names (another dataset): the next open drops the cached
    copies the new manifest does not list as they are, and reads the new samples."""
    bucket, url = one_off
    read_all(open_source(url, cache_dir=tmp_path))          # every shard of the raw set cached
    for p in sorted((dataset / "raw").iterdir()):
        s3fs_.rm_file(f"{url}/{p.name}")
    put_folder(s3fs_, dataset / "png", url)                 # same file names, other bytes
    source, local = open_source(url, cache_dir=tmp_path), open_source(dataset / "png")
    assert source.encoding == "png"
    for i in range(source.count):
        assert source.read(i) == local.read(i)
