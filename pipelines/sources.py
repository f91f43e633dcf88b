"""The one place where sample sources are registered: ``build_pipeline`` (and `pdiff fid`) open
``data.path`` with ``open_source``, which looks the path's kind up in ``SOURCES``.

The kind of a path is the ``format`` field of its ``manifest.json`` when it is a folder with one
(``pdiff shard`` writes ``"pdiff-webdataset"``), else its suffix (``".npy"``). A source for a new kind
is a `SampleSource` subclass in its own module (see pipelines/sample_source.py) whose constructor takes
``(path, verify_checksums)``; add one line for it to ``SOURCES`` below. Code outside the package
registers with ``register_source``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pdiff.pipelines.sample_source import SampleSource, SourceError
from pdiff.pipelines.shards.format import FORMAT, MANIFEST, read_manifest
from pdiff.pipelines.shards.reader import ShardSet

SOURCES: dict[str, Callable[[Path, bool], SampleSource]] = {
    FORMAT: ShardSet,           # a folder written by `pdiff shard`
}


def register_source(kind: str, opener: Callable[[Path, bool], SampleSource]) -> None:
    """Add a source from outside this package (a plugin, a test) to SOURCES under ``kind``."""
    if kind in SOURCES:
        raise ValueError(f"a sample source for {kind!r} is already registered (to {SOURCES[kind].__module__}); "
                         "pick another kind")
    SOURCES[kind] = opener


def source_kind(path: Path) -> str:
    if path.is_dir() and (path / MANIFEST).exists():
        return str(read_manifest(path).get("format"))
    return path.suffix.lower()


def open_source(path: str | Path, verify_checksums: bool = False) -> SampleSource:
    """The registered source for ``path``, opened (``verify_checksums``: check the stored data
    against its checksums first, where the source keeps any)."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder (data.path should name a folder written by "
                          f"`pdiff shard`)")
    kind = source_kind(path)
    if kind not in SOURCES:
        known = ", ".join(repr(k) for k in SOURCES)
        if path.is_dir() and not (path / MANIFEST).exists():
            read_manifest(path)         # raises: the folder lacks the manifest `pdiff shard` writes last
        raise SourceError(f"{path}: no sample source is registered for {kind!r} (registered: {known}; "
                          f"see pipelines/sources.py)")
    return SOURCES[kind](path, verify_checksums)
