"""Shards in object storage: ``data.path=s3://bucket/prefix`` (also gs:// and http(s)://), read
through fsspec (s3fs, gcsfs, aiohttp: the optional extras ``pdiff[s3]``, ``pdiff[gcs]``, ``pdiff[http]``).

Each process keeps a local copy of what it reads in a cache folder (``data.cache_dir``, one sub-folder
per URL), and the loaders (DALI, torch, the in-memory mode) read the copies exactly as they read a
local shard folder: `RemoteShardSet` is a `ShardSet` whose files arrive on demand.

* Opening fetches ``manifest.json`` and every shard's index (small); a shard's other files (its tar,
  and whatever else ``shard_files`` lists for it) are fetched when it is first needed. Each file is
  downloaded to a ``.part`` name, checked against the size and sha256 the manifest gives, and only
  then renamed: a file under its final name is always whole and verified. Transient failures (a
  connection cut halfway, a timeout) are retried with exponential backoff; a missing object, a denied
  access or a sha256 that differs are `RemoteError`s naming the object at once.
* The plan (pipelines/order.py) is a pure function of (seed, epoch, rank, world, images seen), so
  which shards come next is known: `Prefetcher`, a background thread of the main process, walks the
  rank's sample stream from the step the pipeline delivers next (``SampleSource.follow``) and fetches
  the shards in order of first use, as many as ``data.cache_limit_gb`` holds (the "window"). When a
  fetch needs room, shards outside the window go first (least recently fetched first), then window
  shards from the far end; the shard being fetched never. The limit counts the tars; indexes stay.
* A process that reads a shard the prefetcher has not fetched yet (a DataLoader worker, the in-memory
  mode, a prefetcher that fell behind) fetches it itself. A lock file per shard makes processes that
  share the folder download each shard once; only the process that opened the source evicts.
* Class labels live in the tars: a labelled dataset's first open reads every shard once and keeps
  the labels beside the cache (``labels-FINGERPRINT.npy``); an unlabelled one (``num_classes`` 0) needs none.

Upload: `upload_shards` (``pdiff shard SRC s3://...``) writes the shards into a local staging folder
(resumable, like any `pdiff shard` run) and uploads each shard as it is finished, the manifest last,
so a reader never sees a manifest whose shards are not all there.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pdiff.pipelines.order import rank_stream
from pdiff.pipelines.sample_source import SourceError
from pdiff.pipelines.shards.format import FORMAT, MANIFEST, load_manifest, shard_files
from pdiff.pipelines.shards.reader import ShardSet
from pdiff.pipelines.shards.write import write_shards

SCHEMES = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}   # URL scheme -> pdiff extra
RETRIES = 5                  # tries of one download
BACKOFF_S = 0.5              # wait before the second try; doubled before each further one
FETCH_THREADS = 8            # downloads the prefetcher runs at once
CHUNK = 1 << 22
_TABLES_LOCK = threading.Lock()


class RemoteError(SourceError):
    """An object that cannot be fetched or stored (missing, access denied, damaged, the network)."""


def is_url(path) -> bool:
    return isinstance(path, str) and "://" in path


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pdiff" / "shards"


def cache_root(cache_dir: str | Path, url: str, kind: str = "") -> Path:
    """The folder under ``cache_dir`` that holds the local copies of ``url`` (``kind``: a staging folder)."""
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1].strip("/"))[-60:]
    return base / f"{kind}{name}-{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:12]}"


class ObjectStore:
    """The objects under one URL prefix, through fsspec. Credentials and endpoint come from where the
    backend looks for them (for S3: AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ~/.aws, ...)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.scheme = self.url.split("://", 1)[0].lower()
        if self.scheme not in SCHEMES:
            raise RemoteError(f"{url}: unknown scheme {self.scheme}:// (data.path takes a folder, or an s3://, "
                              f"gs://, http:// or https:// URL)")
        self._fs, self._pid = None, -1

    def __getstate__(self):
        return {**self.__dict__, "_fs": None, "_pid": -1}

    @property
    def fs(self):
        if self._pid != os.getpid():            # a new process: the backend's event loop is not ours
            extra = SCHEMES[self.scheme]
            try:
                import fsspec  # optional: only object storage needs it
                self._fs = fsspec.filesystem(self.scheme, skip_instance_cache=True)
            except ImportError as e:
                raise RemoteError(f"{self.url}: reading {self.scheme}:// needs a package that is not installed "
                                  f"({e}); pip install 'pdiff[{extra}]'") from None
            self._pid = os.getpid()
        return self._fs

    def object(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _open(self, url: str):
        return self.fs.open(url, "rb")

    def _download(self, url: str, part: Path) -> tuple[int, str]:
        h, n = hashlib.sha256(), 0
        with self._open(url) as src, open(part, "wb") as out:
            while True:
                chunk = src.read(CHUNK)
                if not chunk:
                    return n, h.hexdigest()
                h.update(chunk)
                out.write(chunk)
                n += len(chunk)

    def _denied(self, url: str, e: Exception) -> RemoteError:
        return RemoteError(f"{url}: access denied ({e}); give these credentials read access to {self.url}/ "
                           f"(for S3: AWS_ACCESS_KEY_ID / AWS_PROFILE and the bucket policy)")

    def fetch(self, name: str, size: int | None, sha256: str | None, dest: Path) -> None:
        """Object ``name`` into ``dest``, whole and checked (``size``, ``sha256``: the manifest's, None
        for the manifest itself), or a RemoteError naming it. Never leaves a partial file under ``dest``."""
        url = self.object(name)
        part = dest.with_name(f".{dest.name}.{os.getpid()}-{threading.get_ident()}.part")
        last = ""
        try:
            for attempt in range(RETRIES):
                if attempt:
                    time.sleep(BACKOFF_S * 2 ** (attempt - 1))
                try:
                    got, digest = self._download(url, part)
                except FileNotFoundError:
                    if name == MANIFEST:
                        raise RemoteError(f"{url}: no such object: {self.url} is not a folder written by `pdiff "
                                          f"shard`, or its upload did not finish (the manifest goes last)") from None
                    raise RemoteError(f"{url}: no such object, yet {self.object(MANIFEST)} lists it (the shards "
                                      f"are incomplete: upload them again with `pdiff shard SRC {self.url} "
                                      f"--overwrite`)") from None
                except PermissionError as e:
                    raise self._denied(url, e) from None
                except Exception as e:      # network libraries raise many kinds: any other failure is retried
                    last = f"{type(e).__name__}: {e}"
                    continue
                if size is not None and got != size:
                    last = f"{got} bytes arrived, the manifest says {size}"
                    continue
                if sha256 is not None and digest != sha256:
                    raise RemoteError(f"{url}: sha256 {digest} differs from {sha256} in {self.object(MANIFEST)} "
                                      f"(the object was replaced or damaged after the manifest was written); "
                                      f"upload the shards again with `pdiff shard SRC {self.url} --overwrite`")
                os.replace(part, dest)
                return
        finally:
            part.unlink(missing_ok=True)
        raise RemoteError(f"{url}: download failed {RETRIES} times (last: {last}); check the network and the "
                          f"endpoint, then start again (what was fetched stays in the cache)")

    def exists(self, name: str) -> bool:
        try:
            return bool(self.fs.exists(self.object(name)))
        except PermissionError as e:
            raise self._denied(self.object(name), e) from None

    def put(self, local: Path, name: str) -> None:
        url = self.object(name)
        last = ""
        for attempt in range(RETRIES):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                self.fs.put_file(str(local), url)
                return
            except PermissionError as e:
                raise RemoteError(f"{url}: access denied ({e}); give these credentials write access to "
                                  f"{self.url}/") from None
            except NotImplementedError:
                raise RemoteError(f"{url}: {self.scheme}:// is read-only here; upload to s3:// or gs://") from None
            except FileNotFoundError as e:
                raise RemoteError(f"{url}: no such bucket ({e}); create it first") from None
            except Exception as e:          # retried, as for downloads
                last = f"{type(e).__name__}: {e}"
        raise RemoteError(f"{url}: upload failed {RETRIES} times (last: {last}); check the network and run the "
                          f"same `pdiff shard` command again (it resumes)")

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self.object(name))
        except FileNotFoundError:
            pass


class ShardCache:
    """The local copies of one remote shard folder: which shards are here, fetching a shard's files,
    and keeping the tars within ``limit`` bytes (0: no limit) by evicting. Thread-safe; usable from
    several processes (each shard's fetch holds a lock file; only the process that made the cache evicts)."""

    def __init__(self, store: ObjectStore, root: Path, manifest: dict, limit: int):
        self.store, self.root, self.limit = store, root, int(limit)
        self.files = [shard_files(rec) for rec in manifest["shards"]]
        self.tar_bytes = np.array([f[0][1] for f in self.files], np.int64)
        self.window: dict[int, int] = {}       # the prefetcher's shards -> order of first use
        self.present: dict[int, int] = {}      # tars here -> bytes, least recently fetched first
        self.reserved = 0                      # bytes of tars being fetched
        self.peak = 0                          # most bytes held or reserved at once (tests, stats)
        self.fetches = 0                       # tars fetched by this process
        self.failed: dict[int, RemoteError] = {}
        self._owner = os.getpid()
        self._new_locks()
        (root / ".locks").mkdir(parents=True, exist_ok=True)
        for s, files in enumerate(self.files):
            p = root / files[0][0]
            if p.exists() and p.stat().st_size == files[0][1]:
                self.present[s] = files[0][1]

    def _new_locks(self):
        self._mutex = threading.Lock()
        self._settled = threading.Condition(self._mutex)     # a fetch ended: room may be made now
        self._shard_locks: dict[int, threading.Lock] = {}
        self._pid = os.getpid()

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("_mutex", "_settled", "_shard_locks", "failed"):
            state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.failed = {}
        self._new_locks()

    @property
    def used(self) -> int:
        return sum(self.present.values()) + self.reserved

    def has(self, shard: int) -> bool:
        return all((self.root / name).exists() for name, _, _ in self.files[shard])

    @contextmanager
    def _locked(self, shard: int):
        if self._pid != os.getpid():          # forked: locks held by another thread of the parent are not ours
            self._new_locks()
        with self._mutex:
            lock = self._shard_locks.setdefault(shard, threading.Lock())
        with lock, open(self.root / ".locks" / f"{self.files[shard][0][0]}.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)      # other processes sharing the folder
            yield

    def ensure(self, shard: int) -> None:
        """Shard ``shard``'s files are here, whole and checked (fetched if not)."""
        if self.has(shard):
            if shard not in self.present and os.getpid() == self._owner:    # fetched by another process
                with self._mutex:
                    self.present[shard] = self.files[shard][0][1]
            return
        with self._locked(shard):
            missing = [f for f in self.files[shard] if not (self.root / f[0]).exists()]
            if not missing:
                return
            tar = missing[0][0] == self.files[shard][0][0]
            need = self.files[shard][0][1] if tar else 0
            self._reserve(shard, need)
            try:
                for name, size, sha in missing:
                    self.store.fetch(name, size, sha, self.root / name)
            finally:
                with self._mutex:
                    self.reserved -= need
                    if tar and (self.root / self.files[shard][0][0]).exists():
                        self.present.pop(shard, None)
                        self.present[shard] = need
                        self.fetches += 1
                    self._settled.notify_all()

    def _reserve(self, shard: int, need: int) -> None:
        """Room for ``need`` bytes of ``shard``: evict what is needed later than it (or not at all);
        while other fetches are under way, wait for them rather than evict what is needed sooner."""
        with self._mutex:
            if self.limit and os.getpid() == self._owner:
                while self.used + need > self.limit:
                    victim = self._victim(shard, sooner=False)
                    if victim is None and self.reserved:
                        self._settled.wait()
                        continue
                    victim = victim if victim is not None else self._victim(shard, sooner=True)
                    if victim is None:
                        break             # the shard alone is larger than the limit
                    self._evict(victim)
            self.reserved += need
            self.peak = max(self.peak, self.used)

    def _victim(self, shard: int, sooner: bool) -> int | None:
        """A shard outside the window (least recently fetched first), else the window's farthest, if it
        is needed after ``shard`` or ``sooner`` allows it."""
        here = self.window.get(shard, len(self.window))
        far = None
        for s in self.present:
            if s == shard:
                continue
            where = self.window.get(s)
            if where is None:
                return s
            if (sooner or where > here) and (far is None or where > self.window[far]):
                far = s
        return far

    def _evict(self, shard: int) -> None:
        self.present.pop(shard)
        (self.root / self.files[shard][0][0]).unlink(missing_ok=True)   # a reader's open descriptor stays valid


class Prefetcher:
    """A background thread of the main process: fetches, ahead of the pipeline, the shards the rank's
    plan reads next, in order of first use, as many as the cache's limit holds."""

    def __init__(self, cache: ShardCache, shard_of: np.ndarray):
        self.cache, self.shard_of = cache, shard_of
        self.pid = os.getpid()
        self._cond = threading.Condition()
        self._where: tuple | None = None
        self._stopping = False
        self._parts: dict[int, np.ndarray] = {}     # order.rank_stream's cache
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="pdiff-fetch")
        self._thread = threading.Thread(target=self._run, name="pdiff-prefetch", daemon=True)
        self._thread.start()

    def follow(self, num_samples: int, seed: int, rank: int, world: int, position: int) -> None:
        """The pipeline's next step starts at ``position`` of the rank's sample stream."""
        with self._cond:
            self._where = (num_samples, seed, rank, world, position)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _stream(self, num: int, seed: int, rank: int, world: int, start: int, count: int) -> np.ndarray:
        """Entries start..start+count-1 of the rank's stream (pipelines/order.py's rank_stream), keeping
        the two newest epochs' permutations."""
        return rank_stream(num, seed, rank, world, start, count, self._parts)

    def window(self, where: tuple) -> list[int]:
        """The shards read from ``where`` on, in order of first use, as many as the limit holds (at least one)."""
        num, seed, rank, world, position = where
        per_rank = -(-num // world)
        limit, sizes = self.cache.limit, self.cache.tar_bytes
        order: list[int] = []
        seen = np.zeros(len(sizes), bool)
        total, walked, chunk = 0, 0, 256
        while walked < per_rank and len(order) < len(sizes):        # one epoch's part reaches every shard it reads
            count = min(chunk, per_rank - walked)
            shards = self.shard_of[self._stream(num, seed, rank, world, position + walked, count)]
            first = np.unique(shards, return_index=True)[1]
            for s in shards[np.sort(first)]:
                if seen[s]:
                    continue
                if limit and order and total + sizes[s] > limit:
                    return order
                seen[s] = True
                order.append(int(s))
                total += int(sizes[s])
            walked += chunk
            chunk *= 2
        return order

    def _fetch(self, shard: int) -> None:
        try:
            self.cache.ensure(shard)
        except RemoteError as e:              # not tried again here: the reader that needs it tries and raises it
            self.cache.failed[shard] = e

    def _run(self) -> None:
        done_for = None
        while True:
            with self._cond:
                while not self._stopping and (self._where is None or self._where == done_for):
                    self._cond.wait()
                if self._stopping:
                    return
                where = self._where
            if not self.cache.limit and len(self.cache.present) == len(self.cache.files):
                done_for = where      # all here and nothing is ever evicted
                continue
            order = self.window(where)
            with self.cache._mutex:
                self.cache.window = {s: k for k, s in enumerate(order)}
            missing = [s for s in order if s not in self.cache.failed and s not in self.cache.present]
            if not missing:
                done_for = where
                continue
            running: set[Future] = set()
            for s in missing:
                if self._stopping or self._where != where:
                    break                     # the pipeline moved on: the window moves too
                if len(running) >= FETCH_THREADS:
                    running = wait(running, return_when=FIRST_COMPLETED).not_done
                running.add(self._pool.submit(self._fetch, s))
            wait(running)


class RemoteShardSet(ShardSet):
    """A `ShardSet` whose folder is the local cache of ``url``: the manifest and indexes are fetched on
    opening, a shard's other files when it is first read (or before, by the prefetcher)."""

    def __init__(self, url: str, checksums: bool = False, cache_dir: str | Path = "", cache_limit_gb: float = 0.0):
        self.url = url.rstrip("/")
        self.store = ObjectStore(self.url)
        root = cache_root(cache_dir, self.url)
        root.mkdir(parents=True, exist_ok=True)
        manifest = self._fetch_manifest(root)
        if manifest.get("format") != FORMAT:
            raise RemoteError(f"{self.store.object(MANIFEST)}: format {manifest.get('format')!r}; only shard "
                              f"folders written by `pdiff shard` ({FORMAT!r}) are read from object storage")
        self.cache = ShardCache(self.store, root, load_manifest(root), int(cache_limit_gb * 2 ** 30))
        small = {f for files in self.cache.files for f in files[1:] if not (root / f[0]).exists()}   # indexes
        with ThreadPoolExecutor(FETCH_THREADS) as pool:                                        # (opening reads them)
            for job in [pool.submit(self.store.fetch, name, size, sha, root / name) for name, size, sha in small]:
                job.result()
        self._prefetcher: Prefetcher | None = None
        self._warned = False
        self._local, self._tables = threading.local(), []
        super().__init__(root, checksums)    # checksums: every fetched file is checked against its sha256 anyway

    def _fetch_manifest(self, root: Path) -> dict:
        """The remote manifest into ``root``; cached files it no longer lists as they are are removed."""
        fresh = root / f".{MANIFEST}.{os.getpid()}.new"      # ranks sharing the folder each fetch their own
        self.store.fetch(MANIFEST, None, None, fresh)
        try:
            new = json.loads(fresh.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            fresh.unlink()
            raise RemoteError(f"{self.store.object(MANIFEST)}: not valid JSON ({e}); upload the shards again") from None
        old_path = root / MANIFEST
        if old_path.exists():
            try:
                old = json.loads(old_path.read_text(encoding="utf-8"))
                keep = {f for rec in new.get("shards", []) for f in shard_files(rec)}
                for rec in old.get("shards", []):
                    for f in shard_files(rec):
                        if f not in keep:
                            (root / f[0]).unlink(missing_ok=True)
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                shutil.rmtree(root)      # an unreadable old manifest: nothing in the folder can be trusted
                root.mkdir(parents=True)
                (root / ".locks").mkdir()
                fresh.write_text(json.dumps(new))
        for part in root.glob(".*.part"):     # left by a process that died while downloading
            if not _alive(part.name.rsplit(".", 2)[-2].split("-")[0]):
                part.unlink(missing_ok=True)
        os.replace(fresh, old_path)
        return new

    def _check_files(self, checksums: bool) -> None:
        """Nothing to check before reading: each file is checked against its size and sha256 when it is fetched."""

    def _check_tar(self, shard: int) -> None:
        """Nothing to check when a CRC file is opened: the tar is checked when it is fetched."""

    def __getstate__(self):
        return {**super().__getstate__(), "_prefetcher": None, "_local": None, "_tables": []}

    def _table(self) -> dict[int, int]:
        """This thread's descriptors: a thread closes only its own (an evicted shard's), never one
        another thread may be reading through."""
        if self._pid != os.getpid():           # forked or unpickled: descriptors are not ours
            self._local, self._tables, self._pid = threading.local(), [], os.getpid()
        table = getattr(self._local, "fds", None)
        if table is None:
            table = self._local.fds = {}
            with _TABLES_LOCK:
                self._tables.append(table)
        return table

    def _fd(self, shard: int) -> int:
        """Like ShardSet's, fetching the shard first where it is not here (or was evicted since)."""
        table = self._table()
        fd = table.get(shard)
        if fd is not None:
            if os.fstat(fd).st_nlink:
                return fd
            os.close(fd)                       # evicted: the space comes back once closed
            del table[shard]
        while True:
            self.cache.ensure(shard)
            try:
                fd = os.open(self.tars[shard], os.O_RDONLY)
                break
            except FileNotFoundError:          # evicted between the two: fetch it again
                continue
        for s, other in list(table.items()):
            if not os.fstat(other).st_nlink:
                os.close(other)
                del table[s]
        table[shard] = fd
        return fd

    def follow(self, plan, images_seen: int) -> None:
        if self._prefetcher is None or self._prefetcher.pid != os.getpid():
            self._prefetcher = Prefetcher(self.cache, self.shard)
            self._warn_small_cache(plan, images_seen)
        self._prefetcher.follow(plan.num_samples, plan.seed, plan.rank, plan.world_size, images_seen // plan.world_size)

    def _warn_small_cache(self, plan, images_seen: int) -> None:
        limit, total = self.cache.limit, int(self.cache.tar_bytes.sum())
        if not limit or limit >= total or self._warned or plan.rank:
            return
        self._warned = True
        gb = 2 ** 30
        step = self._prefetcher._stream(plan.num_samples, plan.seed, plan.rank, plan.world_size,
                                        images_seen // plan.world_size, plan.max_per_rank)
        one = int(self.cache.tar_bytes[np.unique(self.shard[step])].sum())
        if one > limit:
            print(f"pdiff: WARNING data.cache_limit_gb={limit / gb:g} holds less than the shards one step reads "
                  f"({one / gb:.3g} GB): shards are fetched again and again; raise it", file=sys.stderr)
        else:
            print(f"pdiff: WARNING data.cache_limit_gb={limit / gb:g} is below the {total / gb:.3g} GB of {self.url}: "
                  f"every sample is drawn from a shuffle of the whole set, so shards are fetched again within an "
                  f"epoch; a limit that holds them all fetches each once", file=sys.stderr)

    @property
    def labels(self) -> np.ndarray:
        """As ShardSet's, without a read where the dataset has no classes, and kept in the cache folder
        (the first open of a labelled dataset reads every shard once)."""
        if self._labels is None:
            if not self.num_classes:
                self._labels = np.full(self.count, -1, np.int64)
                return self._labels
            path = self.cache.root / f"labels-{self.fingerprint()}.npy"
            if path.exists():
                self._labels = np.load(path)
                return self._labels
            n, fit = len(self.tars), self.cache.limit // max(1, int(self.cache.tar_bytes.max()))
            ahead = min(2 * FETCH_THREADS, max(1, fit)) if self.cache.limit else 2 * FETCH_THREADS
            labels = np.empty(self.count, np.int64)
            with ThreadPoolExecutor(FETCH_THREADS) as pool:      # fetch ahead of the reads, in shard order
                jobs = {s: pool.submit(self.cache.ensure, s) for s in range(min(ahead, n))}
                for s in range(n):
                    with self.cache._mutex:
                        self.cache.window = {k: k - s for k in range(s, s + ahead)}
                    if s + ahead < n:
                        jobs[s + ahead] = pool.submit(self.cache.ensure, s + ahead)
                    jobs.pop(s).result()
                    first = int(self.first[s])
                    for i in range(first, first + int(self.manifest["shards"][s]["count"])):
                        labels[i] = self._label(i)
            with self.cache._mutex:
                self.cache.window = {}
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, labels)
            os.replace(tmp, path)
            self._labels = labels
        return self._labels

    @property
    def plan_labels(self) -> np.ndarray:
        """``labels``, as before shard format version 4: reading them at opening also fills the cache (the
        DataLoader workers' fetches hang otherwise, in tests/test_remote.py)."""
        return self.labels

    def close(self) -> None:
        if self._prefetcher is not None and self._prefetcher.pid == os.getpid():
            self._prefetcher.stop()
        self._prefetcher = None
        if self._pid == os.getpid():
            with _TABLES_LOCK:
                for table in self._tables:
                    for fd in table.values():
                        os.close(fd)
                    table.clear()
        super().close()


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def upload_shards(source, url: str, cache_dir: str | Path = "", overwrite: bool = False, **options) -> dict:
    """`pdiff shard SOURCE URL`: write the shards into a local staging folder (under ``cache_dir``;
    a run that stops resumes there) and upload each as it is finished, then the manifest; returns the
    manifest. The staging folder is removed once everything is uploaded."""
    store = ObjectStore(url)
    if store.exists(MANIFEST):
        if not overwrite:
            raise RemoteError(f"{store.object(MANIFEST)} exists: {store.url} already holds shards; pass --overwrite "
                              f"to replace them, or choose another prefix")
        store.remove(MANIFEST)          # first: no reader takes the old manifest with new shards
    stage = cache_root(cache_dir, store.url, "upload-")
    sent: dict[str, Future] = {}
    with ThreadPoolExecutor(2, thread_name_prefix="pdiff-upload") as pool:
        def send(folder: Path, rec: dict) -> None:
            for name, _, _ in shard_files(rec):
                sent[name] = pool.submit(store.put, folder / name, name)
        manifest = write_shards(source, stage, overwrite=overwrite, on_shard=send, **options)
        for rec in manifest["shards"]:  # shards finished before a restart were not sent by this run
            if rec["tar"] not in sent:
                send(stage, rec)
        for job in sent.values():
            job.result()
    store.put(stage / MANIFEST, MANIFEST)
    shutil.rmtree(stage)
    return manifest
